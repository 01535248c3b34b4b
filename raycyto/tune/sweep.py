"""Sweep driver: data -> feature cache -> ONE Tuner over all grid cells -> experiment dir.

Example::

    exp_dir = run_sweep(load_config("jobs/configs/demo.yaml"), out=Path("experiments/demo"))
    exp_dir = resume_sweep(exp_dir)     # continue an interrupted sweep
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

import raycyto
from raycyto.config import METRICS, SweepConfig, dump_config, load_config
from raycyto.data.decode import is_uri
from raycyto.errors import ConfigError, RaycytoError
from raycyto.storage import copy_tree, path_exists

TUNE_NAME = "tune"            # Tune's run directory: EXP_DIR/tune/
ARTIFACT_DIRS = ("histories", "predictions", "checkpoints")  # what trials write per fold
FAIL_ONCE_ENV = "RAYCYTO_FAIL_ONCE"   # test hook, see raycyto.tune.trainable
CELL = ("backbone", "finetune", "head")
STATE_PERIOD_S = 2  # Tune's experiment-state snapshot period (TUNE_GLOBAL_CHECKPOINT_S)


def _log(progress: bool, msg: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True).print(msg)


def prepare_data(cfg: SweepConfig, exp_dir: Path, progress: bool = True) -> tuple[Any, pd.DataFrame]:
    """Read the source (generating synthetic data into EXP_DIR/data), drop unreadable files.

    Returns:
        (SourceTable of readable images, bad-file report DataFrame path, reason).
    """
    from raycyto.data.pipeline import image_dataset, scan_images
    from raycyto.data.sources import SourceTable, read_source

    source = cfg.data.source
    if source == "synthetic":
        from raycyto.synth import generate

        syn = cfg.data.synthetic
        out = exp_dir / "data"
        if not (out / "manifest.csv").is_file():
            generate(syn.task, out, progress=progress, **syn.generate_kwargs())
        source = str(out)
    table = read_source(source)
    if cfg.data.classes is not None:
        missing = [c for c in cfg.data.classes if c not in table.class_names]
        if missing:
            raise ConfigError("data.classes", f"{missing} not in the data at {source} (its classes: "
                                              f"{table.class_names}); pass --set 'data.classes=[{', '.join(table.class_names)}]' "
                                              "(or a subset), or --set data.classes=null to use every class")
        table = read_source(source, cfg.data.classes)
    bad, fingerprints = scan_images(image_dataset(table, cfg.data.image_size))  # one decode pass, originals only
    ok = table.df[~table.df["path"].astype(str).isin(set(bad["path"]))].reset_index(drop=True)
    if ok.empty:
        raise RaycytoError(f"data.source {cfg.data.source!r}: no readable images ({len(bad)} bad files)")
    ok = ok.assign(fingerprint=ok["path"].astype(str).map(fingerprints))
    return SourceTable(df=ok, class_names=list(table.class_names)), bad


def resolve_positive(cfg: SweepConfig, class_names: list[str]) -> Optional[int]:
    """Index of ``data.positive_class``; required for binary tasks, optional otherwise."""
    name = cfg.data.positive_class
    how = f"pass --positive-class {class_names[-1]} (or --set data.positive_class={class_names[-1]})"
    if name is None:
        if len(class_names) == 2:
            raise ConfigError("data.positive_class", f"required for a binary task (the class whose recall "
                                                     f"matters most), one of {class_names}: {how}")
        return None
    if name not in class_names:
        raise ConfigError("data.positive_class", f"{name!r} is not a class of the data {class_names}; "
                                                 + (how if len(class_names) == 2 else
                                                    "set it to one of them, or --set data.positive_class=null"))
    return class_names.index(name) if len(class_names) == 2 else None


def check_resources(cfg: SweepConfig, started_here: bool) -> None:
    """Fail at once when a trial asks for more than the Ray cluster has (Tune would wait forever).

    On a Ray this process started, resources are fixed: more GPUs (or CPUs) per trial than it
    has is a ConfigError naming the field. On a cluster (``RAY_ADDRESS``) an autoscaler may
    still add such nodes, so the sweep only warns.
    """
    import ray

    have = ray.cluster_resources()
    res = cfg.resources
    for name, field_name, want in (("GPU", "resources.gpus_per_trial", res.gpus_per_trial),
                                   ("CPU", "resources.cpus_per_trial", res.cpus_per_trial)):
        if want > have.get(name, 0) + 1e-9:
            msg = (f"each trial asks for {want:g} {name}(s) and the Ray cluster has {have.get(name, 0):g}; "
                   f"pass --set {field_name}={'0' if name == 'GPU' else '1'}")
            if started_here:
                raise ConfigError(field_name, msg)
            _log(True, f"[yellow]warning:[/yellow] {field_name}: {msg}, or trials wait until the autoscaler "
                       f"adds such nodes")


def build_context(cfg: SweepConfig, exp_dir: Path, progress: bool = True,
                  cache_features: bool = True) -> tuple[Any, dict]:
    """Data, splits and the feature cache; returns (TrialContext, experiment.json data section).

    ``cache_features=False`` is the benchmark baseline: no cache, frozen trials re-run the
    backbone in every fold."""
    import ray

    from raycyto.data.splits import kfold_splits
    from raycyto.tune.features import compute_feature_sets, feature_key
    from raycyto.tune.trainable import TrialContext

    from raycyto.data.quality import describe_duplicates, group_warning, near_duplicates, test_folds_of

    table, bad = prepare_data(cfg, exp_dir, progress)
    positive = resolve_positive(cfg, list(table.class_names))
    labels, groups = table.df["label"].to_numpy(), table.df["group"].astype(str).to_numpy()
    splits = kfold_splits(labels, groups, k=cfg.cv.folds, val_fraction=cfg.cv.val_fraction, seed=cfg.cv.seed,
                          class_names=table.class_names)
    pairs = near_duplicates(table.df["path"].astype(str), table.df["fingerprint"], groups,
                            test_folds_of(len(groups), splits))
    warnings = [w for w in (group_warning(table), describe_duplicates(pairs)) if w]
    for w in warnings:
        _log(progress, f"[yellow]warning:[/yellow] {w}")
    refs = {}
    for backbone in cfg.grid.backbones:
        cuts = feature_cuts(cfg, backbone, len(table.df), cache_features, progress)
        if not cuts:
            continue
        t0 = time.time()
        sets = compute_feature_sets(table, backbone, cfg.data, cfg.resources, seed=cfg.cv.seed, cuts=cuts)
        for cut, fs in sets.items():
            refs[feature_key(backbone, cut)] = ray.put(fs)
        shapes = ", ".join(f"{cut} {tuple(fs.features.shape)} {fs.features.dtype}" for cut, fs in sets.items())
        _log(progress, f"features {backbone}: {shapes} in {time.time() - t0:.1f}s (cached)")
    ctx = TrialContext(cfg=cfg, exp_dir=str(exp_dir), table=table, splits=splits, positive=positive,
                       feature_refs=refs, fail_once=os.environ.get(FAIL_ONCE_ENV) or None,
                       hold=os.environ.get("RAYCYTO_HOLD") or None, barrier=os.environ.get("RAYCYTO_BARRIER") or None,
                       cache_features=cache_features, artifact_uri=artifact_uri(cfg, exp_dir))
    paths = table.df["path"].astype(str).to_numpy()
    data = {
        "source": cfg.data.source,
        "n_images": int(len(table.df)),
        "class_counts": {table.class_names[i]: int(n) for i, n in enumerate(np.bincount(labels, minlength=len(table.class_names)))},
        "n_groups": int(len(set(groups))),
        "folds": [{"fold": s.fold, "train": paths[s.train].tolist(), "val": paths[s.val].tolist(),
                   "test": paths[s.test].tolist()} for s in splits],
        "bad_files": bad.to_dict("records"),
        "near_duplicates": pairs.head(100).to_dict("records"),
        "warnings": warnings,
    }
    return ctx, data


def feature_cuts(cfg: SweepConfig, backbone: str, n_images: int, cache_features: bool = True,
                 progress: bool = True) -> tuple[str, ...]:
    """What to cache for ``backbone`` in one pass: the pooled features for frozen cells (and the
    probe), and the frozen prefix of every lastN mode when ``train.cache_prefix`` and its fp16 size
    fits ``resources.cache_gb`` (else those trials stream images, with a warning)."""
    import math

    from raycyto.models.registry import get_spec
    from raycyto.errors import ConfigError, RaycytoError
    from raycyto.models.split import SequentialView, sequence_names
    from raycyto.tune.features import POOLED, cut_index

    from raycyto.models.heads import head_spec

    cuts = [POOLED] if "frozen" in cfg.grid.finetune and cache_features else []
    modes = [m for m in cfg.grid.finetune if m in ("last1", "last2")] if cfg.train.cache_prefix and cache_features else []
    spatial = any(f == "frozen" and head_spec(h).reads_map for _, f, h in cfg.grid.cells())
    if spatial and not cache_features:
        raise RaycytoError("spatial heads (s) train on cached feature maps; run without --no-cache")
    if modes or spatial:
        import torch

        from raycyto.models.registry import build_backbone

        spec, side = get_spec(backbone), cfg.data.input_size or get_spec(backbone).input_size
        model, names = build_backbone(backbone, pretrained=False).eval(), sequence_names(spec)
        for mode in modes + ([spec.feature_map.layer] if spatial else []):
            # the prefix's output shape, from a random-weight pass at the input size
            with torch.no_grad():
                shape = SequentialView(model, names[:cut_index(spec, mode)], pooled=False)(torch.zeros(1, 3, side, side)).shape[1:]
            gb = n_images * cfg.data.copies * math.prod(shape) * 2 / 1e9
            if gb <= cfg.resources.cache_gb:
                cuts.append(mode)
            elif mode not in modes:  # a feature map: spatial heads have no streamed path
                raise ConfigError("resources.cache_gb", f"{backbone} feature maps {tuple(shape)} of {n_images} images x "
                                                        f"{cfg.data.copies} copies need {gb:.1f} GB (float16) for the "
                                                        "spatial heads; raise it, or lower data.copies / input_size")
            else:
                _log(progress, f"[yellow]warning:[/yellow] {backbone} {mode}: its frozen prefix would take {gb:.1f} GB "
                               f"(> resources.cache_gb {cfg.resources.cache_gb:g}); those trials stream images instead")
    return tuple(cuts)


def _tuner(cfg: SweepConfig, ctx: Any, exp_dir: Path, progress: bool, restore: bool):
    from ray import tune

    from raycyto.tune.search import CellSearcher
    from raycyto.tune.trainable import cv_trainable

    res = cfg.resources
    trainable = tune.with_resources(tune.with_parameters(cv_trainable, ctx=ctx),
                                    {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial})
    cells = [dict(zip(CELL, c)) for c in cfg.grid.cells()]
    from raycyto.tune.progress import RichProgress

    callback = RichProgress(len(cells) * cfg.search.samples * cfg.cv.folds, cfg.search.metric, progress)
    # RichProgress is the sweep's output; Tune's own banner and TensorBoard hints would repeat it
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune snapshots its experiment state (which trials finished) every 10 s or more ("auto"); a
    # trial that finished since the last snapshot is lost to --resume and its budget re-drawn.
    # Every STATE_PERIOD_S instead: a small file, uploaded in the background.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(STATE_PERIOD_S))
    tune_path = tune_storage(cfg, exp_dir)
    if restore:
        return tune.Tuner.restore(tune_path, trainable=trainable, resume_errored=True), callback
    searcher = CellSearcher(cells, cfg.search, log_path=str(exp_dir / "search_log.jsonl"))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=searcher.total_samples,
                                    metric=cfg.search.metric, mode=cfg.search.resolved_mode,
                                    max_concurrent_trials=res.max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name=TUNE_NAME, storage_path=tune_path.rsplit("/", 1)[0],
                                  failure_config=tune.FailureConfig(max_failures=res.max_failures),
                                  # checkpoints are tiny (finished folds' metrics); keeping them
                                  # all avoids forced experiment snapshots on every report
                                  callbacks=[callback], verbose=0),
    ), callback


def artifact_uri(cfg: SweepConfig, exp_dir: Path) -> Optional[str]:
    """``<storage URI>/<EXP_DIR name>`` for object storage (s3://, gs://, file://...), else None.

    With object storage every trial, on whichever node it runs, publishes its fold files
    there and the driver fetches them; Tune keeps its state there too. Without it, trials
    write straight into EXP_DIR, which must then be on a filesystem every node mounts.
    """
    return f"{cfg.storage.rstrip('/')}/{exp_dir.name}" if is_uri(cfg.storage) else None


def tune_storage(cfg: SweepConfig, exp_dir: Path) -> str:
    """Tune's run directory: EXP_DIR/tune, or <storage URI>/<EXP_DIR name>/tune for object stores."""
    uri = artifact_uri(cfg, exp_dir)
    return f"{uri}/{TUNE_NAME}" if uri else str((exp_dir / TUNE_NAME).resolve())


def has_tune_state(cfg: SweepConfig, exp_dir: Path) -> bool:
    """Whether a sweep already ran (or started) for EXP_DIR: its Tune directory exists."""
    try:
        return path_exists(tune_storage(cfg, exp_dir))
    except (OSError, ValueError) as exc:  # unreachable bucket, no credentials, bad URI
        raise ConfigError("storage", f"cannot open {cfg.storage!r}: {exc}") from None


def _fetch_artifacts(uri: str, exp_dir: Path) -> None:
    """Copy the fold files the trials published to ``uri`` into EXP_DIR (merging)."""
    for name in ARTIFACT_DIRS:
        if path_exists(f"{uri}/{name}"):
            copy_tree(f"{uri}/{name}", str(exp_dir / name))


def _warn_if_not_shared(cfg: SweepConfig, exp_dir: Path) -> None:
    import ray

    nodes = sum(bool(n["Alive"]) for n in ray.nodes())
    if not is_uri(cfg.storage) and nodes > 1:
        _log(True, f"[yellow]warning:[/yellow] {nodes} nodes and local storage: trials on "
                   f"other nodes write to {exp_dir} on their own disk. Put EXP_DIR on a filesystem every "
                   "node mounts, or set storage: s3://bucket/prefix (or --storage).")


def _trial_id(result: Any) -> str:
    import re

    if result.metrics and result.metrics.get("trial_id"):
        return str(result.metrics["trial_id"])
    match = re.search(r"_([0-9a-f]{5}_\d{5})", Path(result.path).name)
    return match.group(1) if match else Path(result.path).name


def head_has_dropout(cfg: SweepConfig, head: str) -> bool:
    """Whether a grid head's MC passes can differ (it holds dropout with p > 0)."""
    from raycyto.models.heads import build_head
    from raycyto.models.mc import has_mc_dropout

    return has_mc_dropout(build_head(head, 8, 2, **cfg.grid.head_kwargs.get(head, {})))


def trial_failures(tune_path: str) -> dict[str, int]:
    """Failures per Tune trial id over the whole run, restores included (Tune keeps the count in
    its experiment state): each one cost a restart, from the last finished fold or from scratch."""
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id: int(t.num_failures) for t in ExperimentAnalysis(tune_path).trials}
    except Exception as exc:  # diagnostics only: a sweep's results never depend on it
        warnings.warn(f"could not read Tune's failure counts at {tune_path}: {exc}")
        return {}


def collect(grid: Any, cfg: SweepConfig, exp_dir: Path, baselines: Optional[list[dict]] = None,
            failures: Optional[dict[str, int]] = None) -> pd.DataFrame:
    """Write results.csv and predictions.parquet from a ResultGrid, the baseline rows and the
    per-fold files; ``failures`` (Tune trial id -> count) fills the ``restarts`` column."""
    rows = []
    for r in grid:
        c, m = r.config or {}, r.metrics or {}
        tid = _trial_id(r)
        complete = r.error is None and int(m.get("folds_done", 0)) == cfg.cv.folds
        row = {"trial_id": tid, **{k: c.get(k) for k in CELL}, "lr": c.get("lr"), "batch_size": c.get("batch_size"),
               "status": "TERMINATED" if complete else "ERROR", "folds_done": int(m.get("folds_done", 0)),
               "node_id": m.get("node_id", ""), "restarts": (failures or {}).get(tid, 0)}
        for split in ("val", "test"):
            row.update({f"{split}_{k}": m.get(f"{split}_{k}", np.nan) for k in METRICS})
        row.update({"time_s": m.get("time_total_s", np.nan), "history_dir": f"histories/{tid}",
                    "checkpoint_dir": f"checkpoints/{tid}", "error": "" if r.error is None else str(r.error)[:500],
                    "baseline": False, "mc_dropout": head_has_dropout(cfg, c.get("head"))})
        rows.append(row)
    for b in baselines or []:
        rows.append({**b, "history_dir": f"histories/{b['trial_id']}", "checkpoint_dir": f"checkpoints/{b['trial_id']}",
                     "error": ""})
    results = pd.DataFrame(rows).sort_values(["backbone", "finetune", "head", "trial_id"]).reset_index(drop=True)
    results.to_csv(exp_dir / "results.csv", index=False)
    parts = sorted((exp_dir / "predictions").glob("*/fold*.parquet"))
    parts = [p for p in parts if p.parent.name in set(results["trial_id"])]
    preds = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else pd.DataFrame()
    if not preds.empty:
        lead = ["trial_id", *CELL, "fold", "split", "path", "group", "label", "label_name", "pred"]
        preds = preds[lead + [c for c in preds.columns if c not in lead]]
        preds = preds.sort_values(["trial_id", "fold", "split", "path"]).reset_index(drop=True)
    preds.to_parquet(exp_dir / "predictions.parquet", index=False)
    return results


def _write_experiment(cfg: SweepConfig, ctx: Any, data: dict, exp_dir: Path, started: float,
                      finished: Optional[float], tune_wall_s: Optional[float] = None,
                      restarts: Optional[dict[str, int]] = None) -> None:
    doc = {
        "name": cfg.name,
        "task": cfg.data.synthetic.task if cfg.data.source == "synthetic" else (
            "binary" if len(ctx.class_names) == 2 else "multiclass"),
        "class_names": ctx.class_names,
        "positive_class": None if ctx.positive is None else ctx.class_names[ctx.positive],
        "mc": {"passes": cfg.mc.passes, "threshold": cfg.mc.threshold},
        "select_metric": cfg.train.select_metric,
        "search_metric": cfg.search.metric,
        "data": data,
        "tune_dir": tune_storage(cfg, exp_dir),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "finished": None if finished is None else time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(finished)),
        "wall_s": None if finished is None else round(finished - started, 2),
        "tune_wall_s": None if tune_wall_s is None else round(tune_wall_s, 2),
        # trials that failed (a lost node, an error) and were restarted: Tune trial id -> count
        "restarts": {tid: n for tid, n in sorted((restarts or {}).items()) if n},
        "raycyto_version": raycyto.__version__,
    }
    (exp_dir / "experiment.json").write_text(json.dumps(doc, indent=2, default=str))


def default_exp_dir(cfg: SweepConfig) -> Path:
    """``<storage>/<name>-<YYYYmmdd-HHMMSS>`` (local storage) or ./experiments/... for URIs."""
    root = Path("./experiments") if is_uri(cfg.storage) else Path(cfg.storage)
    return root / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_sweep(cfg: SweepConfig, out: Optional[Path] = None, progress: bool = True,
              resume: bool = False, cache_features: bool = True) -> Path:
    """Run (or, with ``resume``, continue) a sweep and fill the experiment directory.

    Args:
        cfg: the sweep config (ignored fields none; see raycyto.config).
        out: EXP_DIR (default: ``default_exp_dir(cfg)``).
        progress: rich progress output.
        resume: continue the Tune run in ``out``; finished trials are not re-run.
        cache_features: False only for the benchmark baseline (backbone re-run per fold).

    Returns:
        The experiment directory.
    """
    exp_dir = Path(out or default_exp_dir(cfg)).resolve()
    if not resume and has_tune_state(cfg, exp_dir):
        raise RaycytoError(f"{exp_dir} already holds a sweep; use --resume {exp_dir} or another --out")
    exp_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        dump_config(cfg, exp_dir / "config.yaml")
    import ray

    from raycyto.data.pipeline import ensure_ray

    started_here = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    ensure_ray()
    check_resources(cfg, started_here)
    _warn_if_not_shared(cfg, exp_dir)
    started = time.time()
    ctx, data = build_context(cfg, exp_dir, progress, cache_features=cache_features)
    _write_experiment(cfg, ctx, data, exp_dir, started, None)
    from raycyto.tune.probe import run_probes

    baselines = run_probes(ctx, progress)  # seconds: the linear probe of every cached backbone
    if ctx.artifact_uri:
        _fetch_artifacts(ctx.artifact_uri, exp_dir)
    tuner, _ = _tuner(cfg, ctx, exp_dir, progress, restore=resume)
    t_fit = time.time()
    grid = tuner.fit()
    tune_wall = time.time() - t_fit
    if ctx.artifact_uri:
        _fetch_artifacts(ctx.artifact_uri, exp_dir)
    failures = trial_failures(tune_storage(cfg, exp_dir))
    collect(grid, cfg, exp_dir, baselines, failures)
    _write_experiment(cfg, ctx, data, exp_dir, started, time.time(), tune_wall, failures)
    if ctx.artifact_uri:
        _upload(exp_dir, ctx.artifact_uri)
    check_finished(exp_dir)
    if progress:
        print_summary(exp_dir, data["warnings"])
    return exp_dir


def check_finished(exp_dir: Path) -> None:
    """Raise when no trained trial finished (every one failed): the sweep's files stay in
    ``exp_dir`` for a look, and ``raycyto sweep`` exits non-zero instead of reporting success.

    Raises:
        RaycytoError: naming the count and the first trial's error.
    """
    from raycyto.analysis.load import read_csv

    res = read_csv(exp_dir / "results.csv")
    trained = res[~res["baseline"].astype(bool)]
    if len(trained) and not (trained["status"] == "TERMINATED").any():
        first = trained.iloc[0]
        error = str(first.get("error") or "no error recorded").strip().splitlines()
        raise RaycytoError(f"none of the {len(trained)} trials finished; trial {first['trial_id']}: "
                           f"{error[-1] if error else ''} (every trial's error: {exp_dir / 'results.csv'}, "
                           f"logs: the Tune storage's trial folders)")


def resume_sweep(exp_dir: Path, progress: bool = True) -> Path:
    """Continue the sweep in ``exp_dir`` (its config.yaml); finished trials are kept as they are."""
    exp_dir = Path(exp_dir)
    if not (exp_dir / "config.yaml").is_file():
        raise RaycytoError(f"{exp_dir} is not a sweep directory (needs config.yaml and {TUNE_NAME}/)")
    cfg = load_config(exp_dir / "config.yaml")
    if not has_tune_state(cfg, exp_dir):
        raise RaycytoError(f"{exp_dir}: no Tune state at {tune_storage(cfg, exp_dir)}; nothing to resume")
    return run_sweep(cfg, out=exp_dir, progress=progress, resume=True)


def _upload(exp_dir: Path, uri: str) -> None:
    """EXP_DIR's own files to ``uri`` (the trials' fold files are there already)."""
    for entry in sorted(exp_dir.iterdir()):
        if entry.name not in ARTIFACT_DIRS:
            copy_tree(str(entry), f"{uri}/{entry.name}")


def print_summary(exp_dir: Path, warnings: Optional[list[str]] = None, top: int = 10) -> None:
    """Rich table of the configurations ranked by the one selection rule (the report's and
    export's), baselines included and marked, then the data warnings again."""
    from rich.console import Console
    from rich.table import Table

    from raycyto.analysis.load import load_experiment
    from raycyto.analysis.tables import resolve_rule, selection_table

    exp = load_experiment(exp_dir)
    rule = resolve_rule(exp)
    sel = selection_table(exp, rule)
    res = exp.results.set_index("trial_id")
    shown = pd.concat([sel[~sel["baseline"]].head(top), sel[sel["baseline"]]])
    ok = (exp.results["status"] == "TERMINATED").sum()
    table = Table(title=f"configurations by {rule.describe()}; {ok}/{len(exp.results)} trials finished")
    cols = ("config", "trial_id", "lr", "batch_size", f"val {rule}", "test_accuracy", "test_auc", "")
    for col in cols:
        table.add_column(col)
    for _, r in shown.iterrows():
        t = res.loc[r["trial_id"]]
        mark = "best (exported)" if r["best"] else ("baseline" if r["baseline"] else "")
        table.add_row(r["config"], str(r["trial_id"]), *(f"{v:.4g}" if pd.notna(v) else "-" for v in
                      (t["lr"], t["batch_size"], r["val_score"], t["test_accuracy"], t["test_auc"])), mark)
    console = Console(width=None if sys.stdout.isatty() else 160)  # logs: no 80-column cut
    console.print(table)
    for w in warnings or []:
        console.print(f"[yellow]warning:[/yellow] {w}")


def configure(config: Path, data: Optional[str] = None, storage: Optional[str] = None,
              positive_class: Optional[str] = None, sets: tuple[str, ...] = ()) -> SweepConfig:
    """Load a sweep config and apply the command-line overrides, each through the typed checks.

    Args:
        config: YAML config.
        data: overrides ``data.source``; storage: overrides ``storage``;
        positive_class: overrides ``data.positive_class`` (the one option a two-class folder needs).
        sets: ``section.field=value`` assignments (``--set``), applied last.
    Raises:
        ConfigError: naming the field.
    """
    cfg = load_config(config)
    updates = {k: v for k, v in (("data.source", data), ("storage", storage),
                                 ("data.positive_class", positive_class)) if v is not None}
    if updates:
        cfg = cfg.replace(**updates)
    return cfg.override(sets)


def sweep_main(config: Optional[Path] = None, data: Optional[str] = None, out: Optional[Path] = None,
               resume: Optional[Path] = None, progress: bool = True, storage: Optional[str] = None,
               positive_class: Optional[str] = None, sets: tuple[str, ...] = ()) -> Path:
    """What ``raycyto sweep`` and ``jobs/sweep.py`` run: load, override, sweep or resume.

    Args:
        config: YAML config (required unless ``resume``).
        data: overrides ``data.source`` (path, manifest, URI or "synthetic").
        out: EXP_DIR (default ``<storage>/<name>-<timestamp>``).
        resume: an interrupted EXP_DIR to continue.
        progress: rich progress and the summary table.
        storage: overrides ``storage`` (a folder, or an object-store URI such as s3://bucket/prefix).
        positive_class: overrides ``data.positive_class``.
        sets: ``--set section.field=value`` overrides.

    Returns:
        The experiment directory.
    """
    if resume is not None:
        if config is not None or data is not None or storage is not None or positive_class or sets:
            raise ConfigError("--resume", "takes no --config/--data/--storage/--positive-class/--set: "
                                          "the sweep's own config.yaml is used")
        return resume_sweep(resume, progress=progress)
    if config is None:
        raise ConfigError("--config", "a sweep config YAML is required (e.g. jobs/configs/demo.yaml)")
    return run_sweep(configure(config, data, storage, positive_class, tuple(sets)), out=out, progress=progress)
