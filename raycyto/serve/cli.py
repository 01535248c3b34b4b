"""``raycyto serve`` / ``predict`` (registered as commands by the root CLI)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer


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
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Ray's and Serve's own log lines"),
) -> None:
    """Serve model bundles on a local Ray Serve (blocking; Ctrl-C to stop).

    Quiet by default: it prints where it serves once ready; Ray's own lines go to its log
    files (/tmp/ray/session_latest/logs), --verbose brings them back to the terminal.

    Example: raycyto serve runs/demo/model runs/leukemia/model --port 8000 --passes 100
    """
    import logging

    import ray
    from pydantic import ValidationError
    from ray import serve as rs

    from raycyto.errors import RaycytoError
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
    if not ray.is_initialized():
        from raycyto.serve.app import serve_env

        serve_env()
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=verbose, logging_level=level,
                 _metrics_export_port=metrics_port)
    quiet = {"log_level": "INFO" if verbose else "WARNING", "enable_access_log": verbose}
    rs.start(http_options={"host": host, "port": port}, logging_config=quiet)
    rs.run(app, name="raycyto", route_prefix="/", logging_config=quiet)
    node = ray._private.worker.global_worker.node
    base = f"http://{host}:{port}"
    typer.echo(f"ready: {base}/predict  (models: {base}/models, OIP v2: {base}/v2, docs: {base}/docs)")
    typer.echo(f"metrics: http://{node.node_ip_address}:{node.metrics_export_port}/metrics   "
               f"Ray logs: {node.get_logs_dir_path()}   Ctrl-C to stop")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        typer.echo("stopping")
    finally:
        rs.shutdown()


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
            result = predictor.predict_bytes(path.read_bytes(), passes=passes, threshold=threshold)
            record = {"path": str(path), **result}
        except (ClientError, OSError) as e:
            failed += 1
            record = {"path": str(path), "error": getattr(e, "message", str(e))}
        sys.stdout.write(json.dumps(record) + "\n")
    if failed:
        raise typer.Exit(1)
