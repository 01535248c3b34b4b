"""``raycyto run``: the main job end to end, as a newcomer meets it.

generate the synthetic set -> sweep (demo config) -> report -> export the best model ->
start the endpoint -> send it a few images (two classes and one broken file) -> print the
answers and where everything is -> shut down.

Every step calls the same functions as its own sub-command (``raycyto synth``, ``sweep``,
``report``, ``export``, ``serve``); nothing here is specific to the demo except the choice
of inputs.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

#: task -> the demo config shipped in jobs/configs (relative to the repository root).
DEMO_CONFIGS = {"karyogram": "demo.yaml", "leukemia": "demo_leukemia.yaml"}
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RunOutputs:
    """Where the main job left its results."""

    data: Path
    experiment: Path
    report: Path
    model: Path
    answers: list[dict]


def demo_config_path(task: str) -> Path:
    """The shipped demo config of ``task``; a clear error when the checkout lacks it."""
    from raycyto.errors import ConfigError

    if task not in DEMO_CONFIGS:
        raise ConfigError("--task", f"unknown task {task!r}; known: {', '.join(DEMO_CONFIGS)}")
    path = REPO_ROOT / "jobs" / "configs" / DEMO_CONFIGS[task]
    if not path.is_file():
        raise ConfigError("--config", f"{path} not found (raycyto installed outside its repository?); "
                                      "pass --config jobs/configs/demo.yaml from a checkout")
    return path


def _sample_images(data_dir: Path, positive: Optional[str]) -> list[tuple[str, str, bytes, str]]:
    """One image of the positive class, one of another class, and one broken file.

    Returns:
        (name, true label, bytes, content type) per request.
    """
    import pandas as pd

    manifest = pd.read_csv(data_dir / "manifest.csv").sort_values("path")
    labels = list(dict.fromkeys(manifest["label"]))
    first = positive if positive in labels else labels[0]
    second = next(lab for lab in labels if lab != first)
    picks = []
    for label in (second, first):
        rel = manifest.loc[manifest["label"] == label, "path"].iloc[0]
        picks.append((rel, label, (data_dir / rel).read_bytes(), "image/png"))
    broken = picks[0][2][: len(picks[0][2]) // 3]  # a truncated PNG, as an interrupted upload leaves it
    picks.append(("broken.png (truncated)", "-", broken, "image/png"))
    return picks


def query_endpoint(url: str, images: list[tuple[str, str, bytes, str]], timeout: float = 120.0) -> list[dict]:
    """POST each image to ``url`` as multipart and collect status + JSON answers."""
    import httpx

    answers = []
    with httpx.Client(timeout=timeout) as client:
        for name, truth, data, ctype in images:
            r = client.post(url, files={"file": (Path(name).name, data, ctype)})
            answers.append({"image": name, "true": truth, "status": r.status_code, "body": r.json()})
    return answers


def _print_answers(answers: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)  # logs: no 80-column cut
    table = Table(title="answers from POST /predict")
    for col in ("image", "true", "HTTP", "label", "conf.", "refer", "passes", "replicas"):
        table.add_column(col)
    for a in answers:
        b = a["body"]
        ok = a["status"] == 200
        table.add_row(Path(a["image"]).name, a["true"], str(a["status"]),
                      *((b["label"], f"{b['confidence']:.2f}", str(b["refer"]), str(b["passes"]),
                         str(b["replicas"]["count"])) if ok else ("-",) * 5))
    console.print(table)
    for a in answers:
        if a["status"] != 200:
            console.print(f"{a['image']}: HTTP {a['status']}: {a['body'].get('message') or a['body']}")


def raycyto_command() -> str:
    """How to call this ``raycyto`` from the current folder: ``raycyto`` when that is on PATH,
    else the script beside this Python (``.venv/bin/raycyto`` after the README's set-up)."""
    import shutil

    here = Path(sys.executable).parent / "raycyto"
    found = shutil.which("raycyto")
    if found and (not here.exists() or Path(found).resolve() == here.resolve()):
        return "raycyto"
    try:
        return str(here.relative_to(Path.cwd()))
    except ValueError:
        return str(here)


def closing_summary(report_dir: Path, model_dir: Path) -> tuple[list[list[str]], list[str], list[list[str]]]:
    """The main job's last word: the exported configuration and the probe, on test folds.

    Returns:
        (rows [what, configuration, test accuracy, balanced accuracy, AUC, referral] for the
        exported model and each baseline, plain warnings (not better than chance, or than the
        probe), per-stratum recall rows of the exported model when the data has strata).
    """
    import json

    import pandas as pd

    from raycyto.analysis.html import chance_warnings
    from raycyto.analysis.load import read_csv

    summary = read_csv(report_dir / "summary.csv")
    meta = json.loads((model_dir / "model.json").read_text())
    best = summary[summary["best"].astype(bool)].iloc[0]
    fmt = lambda r, m: "-" if pd.isna(r[f"{m}_mean"]) else f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}"  # noqa: E731
    metrics = ("accuracy", "balanced_accuracy", "auc", "referral_rate")
    rows = [["exported", best["config"], *(fmt(best, m) for m in metrics)]]
    probes = summary[summary["baseline"].astype(bool)]
    rows += [["baseline", r["config"], *(fmt(r, m) for m in metrics)] for _, r in probes.iterrows()]
    stats = lambda r: {m: (float(r[f"{m}_mean"]), float(r[f"{m}_std"])) for m in ("accuracy", "auc")}  # noqa: E731
    best_probe = probes.sort_values("val_score", ascending=False).head(1)
    warnings = chance_warnings(stats(best), int(best["folds"]),
                               baseline=stats(best_probe.iloc[0]) if len(best_probe) else None,
                               baseline_name="linear probe")
    if bool(best["baseline"]):
        warnings.insert(0, "no trained head beats the linear probe beyond noise on validation (one-SE rule): "
                           "the probe is the exported model")
    if meta.get("selection", {}).get("trial_id") != best["trial_id"]:
        warnings.append(f"the exported trial {meta.get('selection', {}).get('trial_id')} is not the report's "
                        f"best ({best['trial_id']}): export and report were run with different --select rules")
    strata = []
    if (report_dir / "strata.csv").is_file():
        st = read_csv(report_dir / "strata.csv")
        st = st[st["config"] == best["config"]] if "config" in st else st.iloc[:0]
        for _, r in st.iterrows():
            strata.append([str(r.get("column", "")), str(r.get("value", "")), str(r.get("n", "")),
                           "-" if pd.isna(r.get("recall_mean")) else f"{r['recall_mean']:.3f} ± {r.get('recall_std', float('nan')):.3f}"])
    return rows, warnings, strata


def run_main_job(task: str = "karyogram", out: Path = Path("runs/demo"), config: Optional[Path] = None,
                 port: int = 8000, seed: Optional[int] = None, sets: tuple[str, ...] = ()) -> RunOutputs:
    """Run the whole pipeline once and return where its outputs are.

    Args:
        task: "karyogram" (default) or "leukemia".
        out: folder for data/, experiment/, report/ and model/ (earlier results there are replaced).
        config: sweep config (default: the task's demo config in jobs/configs).
        port: HTTP port of the temporary endpoint.
        seed: overrides the data, cross-validation and search seeds of the config.
        sets: ``--set section.field=value`` overrides.
    Returns:
        The output paths and the endpoint's answers.
    """
    import ray
    from ray import serve
    from rich.console import Console

    from raycyto.analysis.report import write_report
    from raycyto.config import load_config
    from raycyto.serve.app import AppArgs, build_app
    from raycyto.export.core import export_model
    from raycyto.synth import generate
    from raycyto.data.pipeline import ensure_ray
    from raycyto.tune.sweep import run_sweep

    console = Console()
    out = Path(out).resolve()
    cfg = load_config(config or demo_config_path(task))
    if seed is not None:
        cfg = cfg.replace(**{"data.synthetic.seed": seed, "cv.seed": seed, "search.seed": seed})
    cfg = cfg.override(sets)
    syn = cfg.data.synthetic
    paths = {name: out / name for name in ("data", "experiment", "report", "model")}
    for name in ("experiment", "report", "model"):
        if paths[name].exists():
            console.print(f"[dim]replacing the earlier {paths[name]}[/dim]")
            shutil.rmtree(paths[name])
    t0 = time.time()

    from raycyto.serve.app import serve_env

    serve_env()  # step 5's endpoint runs on the Ray started here
    ensure_ray()  # the synthetic images are drawn on Ray workers too
    console.rule(f"1/5 synthetic {syn.task} images")
    generate(syn.task, paths["data"], progress=True, **syn.generate_kwargs())
    cfg = cfg.replace(**{"data.source": str(paths["data"]), "storage": str(out)})

    console.rule("2/5 sweep on Ray Tune")
    run_sweep(cfg, out=paths["experiment"], progress=True)

    console.rule("3/5 report")
    html = write_report(paths["experiment"], paths["report"], progress=True)

    console.rule("4/5 export the best model (chosen on validation folds)")
    export_model(paths["experiment"], paths["model"])

    console.rule("5/5 endpoint on Ray Serve")
    app = build_app(AppArgs(model_dir=str(paths["model"]), backbone_num_cpus=0.5, mc_num_cpus=0.25,
                            ingress_num_cpus=0.1))
    import logging

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's start-up INFO lines: its log files
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    try:
        serve.run(app, name="raycyto", route_prefix="/", logging_config=quiet)
        answers = query_endpoint(f"http://127.0.0.1:{port}/predict",
                                 _sample_images(paths["data"], cfg.data.positive_class))
    finally:
        # on a Ray this job started, ray.shutdown() takes Serve with it (serve.shutdown()
        # first only adds Ray 2.60's "graceful_shutdown failed" noise); on a cluster, tidy up
        if os.environ.get("RAY_ADDRESS"):
            serve.shutdown()
        ray.shutdown()
    _print_answers(answers)
    _print_closing(console, Path(html).parent, paths["model"])

    console.rule(f"done in {time.time() - t0:.0f} s")
    for name, path in (("data", paths["data"]), ("experiment", paths["experiment"]),
                       ("report", html), ("model", paths["model"])):
        console.print(f"{name:>10}: {path}")
    exe, rel = raycyto_command(), _relative(out)
    console.print(f"{'serve it':>10}: {exe} serve {rel}/model   (or: RAY_SERVE_THROUGHPUT_OPTIMIZED=1 .venv/bin/serve run serve_configs/local.yaml)")
    console.print(f"{'predict':>10}: {exe} predict {rel} IMAGE.png")
    console.print(f"{'report':>10}: {exe} report {rel} --select 'recall@specificity>=0.8'")
    return RunOutputs(paths["data"], paths["experiment"], Path(html), paths["model"], answers)


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _print_closing(console, report_dir: Path, model_dir: Path) -> None:
    """Exported configuration vs the probe on test folds, per-stratum recall, plain warnings."""
    from rich.table import Table

    rows, warnings, strata = closing_summary(report_dir, model_dir)
    table = Table(title="exported model vs the linear-probe baseline (test folds, mean ± std)")
    for col in ("", "configuration", "accuracy", "balanced acc.", "AUC", "referral rate"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if strata:
        st = Table(title="exported model: recall per stratum (test folds)")
        for col in ("column", "value", "n", "recall"):
            st.add_column(col)
        for row in strata:
            st.add_row(*row)
        console.print(st)
    for w in warnings:
        console.print(f"[bold red]warning:[/bold red] {w}")


def run(
    task: str = typer.Option("karyogram", "--task", help="karyogram | leukemia"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default runs/demo or runs/leukemia)"),
    config: Optional[Path] = typer.Option(None, "--config", help="sweep config (default: the task's demo config)"),
    port: int = typer.Option(8000, "--port", help="port of the temporary endpoint"),
    seed: Optional[int] = typer.Option(None, "--seed", help="override the data / CV / search seeds"),
    set_: list[str] = typer.Option([], "--set", help="override a config field (repeatable), e.g. --set train.epochs=20"),
) -> None:
    """The main job: synthetic data -> sweep -> report -> export -> endpoint -> answers.

    Example: raycyto run            (karyograms, outputs in runs/demo)
    Example: raycyto run --task leukemia
    """
    from raycyto.errors import exit_on_user_error

    default_out = Path("runs/demo") if task == "karyogram" else Path(f"runs/{task}")
    with exit_on_user_error():  # "error: ..." on one line and exit 2, also when raised in a Ray task
        result = run_main_job(task, out or default_out, config, port, seed, tuple(set_))
    if any(a["status"] >= 500 for a in result.answers):
        raise typer.Exit(1)
