"""The Tune trainable: one (backbone, finetune, head) cell x one (lr, batch_size) sample.

Inside a trial the K folds run in turn. Each fold trains on its training split (every
augmented copy), keeps the best epoch by the validation ``select_metric``, then predicts
validation and test images (copy 0) deterministically and with MC dropout. After each
fold the trial reports the FOLD-AVERAGED metrics so far with a checkpoint holding the
finished folds, so a retried or restored trial skips them; the searcher only ever sees
validation averages (test metrics are reported for the record, never optimised).

Files written per fold into the experiment directory (see docs/ARCHITECTURE.md):
``histories/<trial>/fold<k>.csv``, ``histories/<trial>/fold<k>_data.json`` (the paths the
fold trained, validated and tested on), ``checkpoints/<trial>/fold<k>/`` (model bundle),
``predictions/<trial>/fold<k>.parquet`` (merged into predictions.parquet by the driver) and
``events/<trial>.jsonl`` (trial start and fold completion times: evidence for resume tests).
With object storage (``storage: s3://...``) the fold files go to ``<storage>/<EXP_DIR name>/``
instead, so trials on any node of a cluster reach the driver, which fetches them; events
stay on the trial's node (best effort, diagnostics only).

Test hooks (so tests wait on events, not on wall-clock time):
- ``TrialContext.fail_once`` (``RAYCYTO_FAIL_ONCE=<path>``): when the file does not exist yet,
  the trial creates it and raises once after its first fold;
- ``TrialContext.hold`` (``RAYCYTO_HOLD=<gate file>:<n>``): a trial that starts after n trials
  have finished waits until the gate file exists (an interrupt then finds unfinished work);
- ``TrialContext.barrier`` (``RAYCYTO_BARRIER=<folder>:<n>``): a trial waits at its start
  until n trials have started (proof that they run at the same time).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pandas as pd

from raycyto.config import METRICS, SweepConfig
from raycyto.tune.train import HParams, Task, classification_metrics

FOLDS_FILE = "folds.json"


@dataclass
class TrialContext:
    """Everything a trial needs besides its (cell, lr, batch_size) config.

    Shipped once through the object store (``tune.with_parameters``); ``feature_refs``
    holds one ObjectRef per frozen backbone so a trial fetches only its own features.
    """

    cfg: SweepConfig
    exp_dir: str
    table: Any                     # raycyto.data.sources.SourceTable, readable images only
    splits: list                   # list[raycyto.data.splits.Split]
    positive: Optional[int]        # positive class index (binary) or None (multiclass)
    feature_refs: dict[str, Any] = field(default_factory=dict)
    fail_once: Optional[str] = None
    hold: Optional[str] = None      # test hook "<gate file>:<n>"
    barrier: Optional[str] = None   # test hook "<folder>:<n>"
    cache_features: bool = True    # False: benchmark baseline, the backbone re-runs in every fold
    artifact_uri: Optional[str] = None  # object storage for the fold files; None: EXP_DIR itself

    @property
    def class_names(self) -> list[str]:
        return list(self.table.class_names)

    @property
    def task(self) -> Task:
        return Task(num_classes=len(self.table.class_names), positive=self.positive)

    @property
    def metadata(self) -> pd.DataFrame:
        """``path`` + the source's metadata columns (manifest columns such as ``subtype``)."""
        keep = [c for c in self.table.df.columns if c not in ("label", "label_name", "group", "fingerprint")]
        return self.table.df[keep].assign(path=lambda d: d["path"].astype(str))

    def preprocess(self, backbone: str) -> Any:
        """The preprocessing contract of ``backbone`` under this sweep's data config."""
        from raycyto.models.preprocessing import Preprocess

        return Preprocess.build(backbone, self.cfg.data.image_size, self.cfg.data.input_size)

    @property
    def paths(self) -> np.ndarray:
        return self.table.df["path"].astype(str).to_numpy()


def _event(exp_dir: str, trial_id: str, event: str, **kw: Any) -> None:
    path = Path(exp_dir) / "events" / f"{trial_id}.jsonl"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, "time": time.time(), "pid": os.getpid(), **kw}) + "\n")
    except OSError:  # a worker node without EXP_DIR's path: events are diagnostics only
        pass


@contextmanager
def fold_output(ctx: TrialContext) -> Iterator[Path]:
    """The folder a fold writes its files into: EXP_DIR itself, or (object storage) a
    temporary folder published to ``ctx.artifact_uri`` when the fold is done."""
    if ctx.artifact_uri is None:
        yield Path(ctx.exp_dir)
        return
    from raycyto.storage import copy_tree

    with tempfile.TemporaryDirectory(prefix="raycyto-fold-") as tmp:
        yield Path(tmp)
        copy_tree(tmp, ctx.artifact_uri)


def read_events(exp_dir: str | Path, trial_id: str) -> list[dict]:
    """The JSON-lines events of one trial (``start`` and ``fold_done`` rows)."""
    path = Path(exp_dir) / "events" / f"{trial_id}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def fold_means(done: dict[int, dict]) -> dict[str, float]:
    """Average ``val_<m>`` and ``test_<m>`` over finished folds (NaN-aware)."""
    out = {}
    for split in ("val", "test"):
        for m in METRICS:
            values = np.array([d[split][m] for d in done.values()], dtype=np.float64)
            out[f"{split}_{m}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return out


def _prediction_frame(probs: np.ndarray, mc: dict, meta: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    """One row per image: deterministic probs + MC summary columns."""
    df = meta.copy()
    df["pred"] = probs.argmax(1)
    for i, name in enumerate(class_names):
        df[f"prob_{name}"] = probs[:, i]
    df["mc_label"] = mc["vote"]
    df["mc_confidence"] = mc["confidence"]
    for i, name in enumerate(class_names):
        df[f"mc_mean_{name}"] = mc["mean"][:, i]
    df["entropy"] = mc["entropy"]
    df["mutual_information"] = mc["mutual_information"]
    df["refer"] = mc["refer"].astype(bool)
    return df


@dataclass
class FoldOutput:
    """What a runner hands to :func:`run_fold` for one fold.

    Attributes:
        model: the Classifier holding the best epoch.
        history: one row per epoch.
        evals: {"val", "test": (features [N, ...], labels [N], row meta with path, group)}.
        used: the data-used record (paths trained, validated and tested on, best epoch).
        train: (features [M, ...], labels [M]) of the training rows, for the OOD guard.
    """

    model: Any
    history: pd.DataFrame
    evals: dict[str, tuple]
    used: dict
    train: tuple[np.ndarray, np.ndarray]


def mc_seed(cfg: SweepConfig, fold: int) -> int:
    """The MC-dropout seed of a fold's predictions (stored in its bundle, the served default)."""
    return cfg.cv.seed * 1000 + fold


def predict_split(head: Any, features: np.ndarray, labels: np.ndarray, ctx: TrialContext, seed: int,
                  name: str) -> tuple[np.ndarray, dict, dict[str, float]]:
    """Deterministic probs [N, C], MC summary and metrics of head ``name`` (registry) on features [N, ...]."""
    import torch

    from raycyto.models.heads import head_spec
    from raycyto.models.mc import summarize
    from raycyto.tune.train import array_batches, predict_probs

    probs, _ = predict_probs(head, array_batches(features, labels, 256)(0))  # [N, C]
    x = torch.as_tensor(features, dtype=torch.float32)
    # the registry's MC path (a map head's passes without T copies of every map)
    passes = head_spec(name).mc(head, x, ctx.cfg.mc.passes, seed=seed)
    mc = summarize(passes, ctx.cfg.mc.threshold)  # [N, T, C] -> per-image summary
    return probs, mc, classification_metrics(labels, probs, ctx.positive)


def _subtable(table: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of a SourceTable, in the given order."""
    return type(table)(df=table.df.iloc[np.asarray(idx)].reset_index(drop=True), class_names=list(table.class_names))


class FoldRunner:
    """Trains and evaluates one fold for a trial; the frozen/fine-tune difference is only
    where features come from (cache vs. streamed images through a trainable backbone)."""

    def __init__(self, config: dict, ctx: TrialContext) -> None:
        import ray

        from raycyto.models.classifier import build_classifier

        self.config, self.ctx, self.cfg = config, ctx, ctx.cfg
        self.frozen = config["finetune"] == "frozen"
        self.head_kwargs = dict(self.cfg.grid.head_kwargs.get(config["head"], {}))
        from raycyto.tune.features import feature_key

        from raycyto.models.heads import head_spec
        from raycyto.models.registry import get_spec

        self.hp = HParams.from_trial(config)
        self.pre = ctx.preprocess(config["backbone"])
        # frozen: the cached pooled features (spatial heads: the feature map of spec.feature_map);
        # lastN: the cached output of the frozen prefix, if any
        spatial = head_spec(config["head"]).reads_map
        cut = get_spec(config["backbone"]).feature_map.layer if spatial else "pooled" if self.frozen else config["finetune"]
        key = feature_key(config["backbone"], cut)
        self.features = ray.get(ctx.feature_refs[key]) if key in ctx.feature_refs else None
        if spatial:  # the head is built for the cached map's grid; binary: the negative class is its reference
            self.head_kwargs.setdefault("grid", [int(v) for v in self.features.features.shape[2:]])
            if ctx.positive is not None and ctx.task.num_classes == 2:
                self.head_kwargs.setdefault("reference", 1 - int(ctx.positive))
        self._build = lambda seed: build_classifier(config["backbone"], config["head"], ctx.task.num_classes,
                                                    config["finetune"], pretrained=True,
                                                    head_kwargs=self.head_kwargs, seed=seed)
        self.bundle_model = self._build(0) if self.frozen else None  # frozen: backbone shared by folds

    @property
    def hparams(self) -> dict:
        """What the bundle records about the search sample."""
        return {"lr": self.hp.lr, "batch_size": self.hp.batch_size}

    def _class_weight(self, labels: np.ndarray) -> Optional[np.ndarray]:
        from raycyto.data.splits import class_weights

        return class_weights(labels, self.ctx.task.num_classes) if self.cfg.data.class_weights else None

    def run(self, split: Any) -> FoldOutput:
        """Train and evaluate one fold."""
        if self.frozen:
            return self._run_frozen(split)
        return self._run_finetune(split) if self.features is None else self._run_cached_prefix(split)

    def _run_frozen(self, split: Any):
        from raycyto.tune.train import HeadData, train_head

        fs, rows = fold_features(self.ctx, self.config["backbone"], self.features, split)
        train = rows["train"]
        data = HeadData(fs.features[train], fs.label[train], fs.eval_features(rows["val"]), fs.label[rows["val"]],
                        groups_train=fs.group[train])
        result = train_head(self.config["head"], data, task=self.ctx.task, train=self.cfg.train, hp=self.hp,
                            seed=mc_seed(self.cfg, split.fold), head_kwargs=self.head_kwargs,
                            class_weight=self._class_weight(fs.label[train]))
        self.bundle_model.head = result.model
        return FoldOutput(self.bundle_model, result.history, _evals(fs, rows), _used(fs, rows, result.best_epoch),
                          (data.x_train, data.y_train))

    def _run_cached_prefix(self, split: Any) -> FoldOutput:
        """lastN fine-tuning on the cached output of the frozen prefix: each epoch runs only the
        trainable tail and the head (the prefix, in eval mode without gradient, would compute the
        same activations every epoch; fp16 cache)."""
        from raycyto.models.split import prefix_tail
        from raycyto.tune.train import array_batches, extract_features, fit, seed_everything

        fs, rows = fold_features(self.ctx, self.config["backbone"], self.features, split)
        seed = mc_seed(self.cfg, split.fold)
        seed_everything(seed)
        model = self._build(seed)
        tail = prefix_tail(model.backbone, model.spec, self.config["finetune"])[1]
        forward = lambda m, x: m.classify_features(tail(x.float()))  # noqa: E731 - [B, C, H, W] fp16 -> logits
        train, val = rows["train"], rows["val"]
        result = fit(model, array_batches(fs.features[train], fs.label[train], self.hp.batch_size, seed),
                     lambda: array_batches(fs.eval_features(val), fs.label[val], 64)(0), task=self.ctx.task,
                     train=self.cfg.train, hp=self.hp, class_weight=self._class_weight(fs.label[train]),
                     forward=forward)
        model = result.model

        def tail_features(x: np.ndarray, y: np.ndarray) -> np.ndarray:  # [n, D] pooled features
            return extract_features(model, array_batches(x, y, 64)(0), features=lambda m, b: tail(b.float()))[0]

        train_feats = tail_features(fs.features[train], fs.label[train])
        from raycyto.models.heads import head_spec

        post_fit = head_spec(self.config["head"]).post_fit
        if post_fit is not None:
            post_fit(model.head, train_feats, fs.label[train], fs.group[train])
        evals = {name: (tail_features(fs.eval_features(rows[name]), fs.label[rows[name]]), fs.label[rows[name]],
                        pd.DataFrame({"path": fs.path[rows[name]], "group": fs.group[rows[name]]}))
                 for name in ("val", "test")}
        used = {**_used(fs, rows, result.best_epoch), "cached_prefix": True}
        return FoldOutput(model, result.history, evals, used, (train_feats, fs.label[train]))

    def _run_finetune(self, split: Any):
        from raycyto.data.pipeline import image_dataset, load_arrays
        from raycyto.data.splits import equalize
        from raycyto.tune.train import extract_features, image_array_batches, train_finetune

        table, data, seed = self.ctx.table, self.cfg.data, mc_seed(self.cfg, split.fold)
        labels = table.df["label"].to_numpy()
        train_idx = equalize(split.train, labels, seed) if data.equalize else split.train
        train_ds = image_dataset(_subtable(table, train_idx), data.image_size, policy=data.policy,
                                 copies=data.copies, seed=self.cfg.cv.seed)
        arrays = {name: load_arrays(image_dataset(_subtable(table, idx), data.image_size))
                  for name, idx in (("val", split.val), ("test", split.test))}
        model = self._build(seed)
        result = train_finetune(model, train_ds, arrays["val"]["image"], arrays["val"]["label"], pre=self.pre,
                                task=self.ctx.task, train=self.cfg.train, hp=self.hp, seed=seed,
                                class_weight=self._class_weight(labels[train_idx]))
        evals = {}
        for name, a in arrays.items():
            feats, y = extract_features(result.model, image_array_batches(a["image"], a["label"], self.pre, 64))
            evals[name] = (feats, y, pd.DataFrame({"path": a["path"], "group": a["group"]}))
        from raycyto.tune.train import dataset_features

        paths = self.ctx.paths
        used = {"best_epoch": result.best_epoch, "train": sorted(set(paths[train_idx])), "train_rows": int(len(train_idx) * data.copies),
                "val": sorted(set(arrays["val"]["path"])), "test": sorted(set(arrays["test"]["path"])),
                "cached_prefix": False}
        train_feats, train_labels, _ = dataset_features(result.model, train_ds, self.pre)
        return FoldOutput(result.model, result.history, evals, used, (train_feats, train_labels))


def fold_features(ctx: TrialContext, backbone: str, features: Any, split: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """(FeatureSet, {"train", "val", "test": row indices}) of one fold; train rows equalised
    when the config asks for it.

    Args:
        features: the backbone's cached FeatureSet, or None (benchmark baseline: the backbone
            runs over this fold's images here).
    """
    from raycyto.data.splits import equalize
    from raycyto.tune.features import feature_rows_for_split

    cfg = ctx.cfg
    if features is None:
        from raycyto.tune.features import compute_features_local

        used_idx = np.concatenate([split.train, split.val, split.test])
        features = compute_features_local(_subtable(ctx.table, used_idx), backbone, cfg.data,
                                          cfg.resources.feature_batch_size, seed=cfg.cv.seed)
    rows = feature_rows_for_split(features, ctx.paths, split)
    if cfg.data.equalize:
        rows["train"] = equalize(rows["train"], features.label, mc_seed(cfg, split.fold))
    return features, rows


def _evals(fs: Any, rows: dict[str, np.ndarray]) -> dict[str, tuple]:
    """{val, test: (features, labels, row meta)} of a fold from a FeatureSet."""
    return {name: (fs.eval_features(rows[name]), fs.label[rows[name]],
                   pd.DataFrame({"path": fs.path[rows[name]], "group": fs.group[rows[name]]}))
            for name in ("val", "test")}


def _used(fs: Any, rows: dict[str, np.ndarray], best_epoch: int) -> dict:
    """The data-used record of a fold (paths trained, validated and tested on)."""
    return {"best_epoch": best_epoch, "train": sorted(set(fs.path[rows["train"]])),
            "train_rows": int(len(rows["train"])), "val": sorted(set(fs.path[rows["val"]])),
            "test": sorted(set(fs.path[rows["test"]]))}


def pooled(features: np.ndarray) -> np.ndarray:
    """[N, D] features as they are; [N, C, H, W] maps averaged over positions -> [N, C]."""
    f = np.asarray(features, dtype=np.float32)
    return f.mean(axis=(2, 3)) if f.ndim == 4 else f


def fit_guard(train: tuple[np.ndarray, np.ndarray], val_features: np.ndarray,
              false_alarm: Optional[float]) -> Any:
    """The fold's out-of-distribution guard: class-conditional Mahalanobis distance fitted on the
    training rows' (pooled, L2-normalised) features, thresholded on the validation images at
    ``false_alarm`` (``raycyto export`` rethresholds it on test images and their shifted copies).
    L2 normalisation drops the overall feature magnitude, which JPEG, blur and contrast move: with
    it the closest other-task image, photograph or noise image scores 5.8x (blood-smear demo) /
    4.7x (karyogram demo) the shift-calibrated threshold, without it 0.7x (a quarter of the noise
    images pass) / 3.3x (``benchmarks/ood_guard.py --variants``). None when disabled or when too
    few images."""
    if false_alarm is None or len(train[1]) < 3 or len(val_features) < 2:
        return None
    from raycyto.referral.ood import fit_mahalanobis

    return fit_mahalanobis(pooled(train[0]), train[1], normalize=True).calibrate(pooled(val_features), false_alarm)


def run_fold(runner: FoldRunner, split: Any, trial_id: str) -> dict:
    """Train one fold, write its history, bundle and predictions; return its metrics."""
    from raycyto.models.bundle import save_bundle

    from raycyto.models.mc import has_mc_dropout

    ctx, cfg, config = runner.ctx, runner.cfg, runner.config
    k = split.fold
    out = runner.run(split)
    model, history, evals, used = out.model, out.history, out.evals, out.used
    seed = mc_seed(cfg, k)
    guard = fit_guard(out.train, evals["val"][0], cfg.mc.ood_false_alarm)
    with fold_output(ctx) as exp:
        hist_dir = exp / "histories" / trial_id
        hist_dir.mkdir(parents=True, exist_ok=True)
        history.to_csv(hist_dir / f"fold{k}.csv", index=False)
        (hist_dir / f"fold{k}_data.json").write_text(json.dumps(used))
        frames, metrics = [], {}
        class_names = ctx.class_names
        for name, (feats, labels, meta) in evals.items():
            probs, mc, metrics[name] = predict_split(model.head, feats, labels, ctx, seed=seed, name=config["head"])
            meta = meta.assign(label=labels, label_name=[class_names[i] for i in labels])
            meta = meta.merge(ctx.metadata, on="path", how="left")  # manifest columns (subtype, site...)
            frame = _prediction_frame(probs, mc, meta, class_names)
            frames.append(frame.assign(trial_id=trial_id, backbone=config["backbone"], finetune=config["finetune"],
                                       head=config["head"], fold=k, split=name))
        pred_dir = exp / "predictions" / trial_id
        pred_dir.mkdir(parents=True, exist_ok=True)
        pd.concat(frames, ignore_index=True).to_parquet(pred_dir / f"fold{k}.parquet", index=False)
        save_bundle(exp / "checkpoints" / trial_id / f"fold{k}", model, meta={
            "class_names": class_names,
            "positive_class": None if ctx.positive is None else class_names[ctx.positive],
            "preprocess": runner.pre.to_dict(),
            "mc": {"passes": cfg.mc.passes, "threshold": cfg.mc.threshold, "scope": "head", "seed": seed,
                   "dropout": has_mc_dropout(model.head)},
            "trial_id": trial_id, "fold": k, **runner.hparams,
            "best_epoch": used["best_epoch"],
            "metrics": {f"{s}_{m}": v for s, d in metrics.items() for m, v in d.items()},
        }, guard=guard)
    return metrics


def _wait_hooks(ctx: TrialContext, trial_id: str, timeout_s: float = 600.0) -> None:
    """The ``hold`` and ``barrier`` test hooks (see the module docstring); no-ops otherwise."""
    from raycyto.tune.search import read_search_log

    def wait(ready, what: str) -> None:
        deadline = time.time() + timeout_s
        while not ready():
            if time.time() > deadline:
                raise RuntimeError(f"test hook: trial {trial_id} waited {timeout_s:.0f}s for {what}")
            time.sleep(0.2)

    if ctx.hold:
        gate, n = ctx.hold.rsplit(":", 1)
        if len(read_search_log(Path(ctx.exp_dir) / "search_log.jsonl")) >= int(n):
            wait(lambda: Path(gate).exists(), f"the gate file {gate}")
    if ctx.barrier:
        folder, n = ctx.barrier.rsplit(":", 1)
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / trial_id).touch()
        wait(lambda: len(list(Path(folder).iterdir())) >= int(n), f"{n} trials to start")


def cv_trainable(config: dict, ctx: TrialContext) -> None:
    """Tune function trainable: run every fold not already in the checkpoint.

    Args:
        config: {backbone, finetune, head, lr, batch_size, cell} from the searcher.
        ctx: shared TrialContext (``tune.with_parameters``).
    """
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    done: dict[int, dict] = {}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            done = {int(k): v for k, v in json.loads((Path(d) / FOLDS_FILE).read_text()).items()}
    import ray

    from raycyto.device import worker_device

    node_id = ray.get_runtime_context().get_node_id()  # results.csv: which node ran the trial
    _event(ctx.exp_dir, trial_id, "start", restored_folds=sorted(done), gpu_ids=[str(g) for g in ray.get_gpu_ids()],
           device=worker_device(), node_id=node_id)
    _wait_hooks(ctx, trial_id)
    runner = FoldRunner(config, ctx)
    for split in ctx.splits:
        if split.fold in done:
            continue
        t0 = time.time()
        done[split.fold] = run_fold(runner, split, trial_id)
        _event(ctx.exp_dir, trial_id, "fold_done", fold=split.fold, seconds=time.time() - t0,
               val=done[split.fold]["val"])
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / FOLDS_FILE).write_text(json.dumps({str(k): v for k, v in done.items()}))
            tune.report({**fold_means(done), "folds_done": len(done), "node_id": node_id},
                        checkpoint=tune.Checkpoint.from_directory(tmp))
        if ctx.fail_once and not Path(ctx.fail_once).exists():
            Path(ctx.fail_once).write_text(trial_id)
            raise RuntimeError(f"RAYCYTO_FAIL_ONCE test hook: trial {trial_id} fails once after fold {split.fold}")
