"""A constructed experiment directory that follows the contract exactly (docs/ARCHITECTURE.md,
"experiment directory"), with known answers; plus tests that it does.

Other test_analysis_* modules import :func:`fabricate_experiment` from here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from raycyto.analysis.load import read_csv

BINARY = ("normal", "abnormal")
FIVE = ("ALL", "AML", "CLL", "CML", "HLT")
CELLS = (("effnet_lite0", "frozen", "a"), ("effnet_lite0", "last1", "d"))
HISTORY_METRICS = ("loss", "accuracy", "precision", "recall", "auc")


def _predictions(rng: np.random.Generator, labels: np.ndarray, num_classes: int, skill: float,
                 passes: int, perfect: bool) -> dict[str, np.ndarray]:
    """Probabilities [N, C], argmax pred, MC vote / confidence / mean for one trial fold split."""
    n = len(labels)
    if perfect:
        probs = np.eye(num_classes)[labels]
        votes = np.full(n, passes)
        mc_label = labels.copy()
    else:
        right = rng.random(n) < skill
        wrong = (labels + rng.integers(1, num_classes, n)) % num_classes
        target = np.where(right, labels, wrong)
        logits = rng.normal(0, 1, (n, num_classes))
        logits[np.arange(n), target] += rng.uniform(0.5, 4.0, n)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        votes = rng.integers(passes // 2 + 1, passes + 1, n)   # majority for the argmax
        mc_label = probs.argmax(axis=1)
    mc_mean = 0.9 * probs + 0.1 / num_classes                     # rows still sum to 1
    return {"probs": probs, "pred": probs.argmax(axis=1), "mc_label": mc_label,
            "mc_confidence": votes / passes, "mc_mean": mc_mean}


def fabricate_experiment(out: Path, classes: tuple[str, ...] = BINARY,
                         positive: str | None = "abnormal", cells=CELLS, samples: int = 2,
                         folds: int = 3, per_fold: int = 12, seed: int = 0,
                         perfect: bool = False, threshold: float = 0.8, passes: int = 20,
                         row_group_size: int | None = None) -> Path:
    """Write EXP_DIR with config.yaml, experiment.json, results.csv, predictions.parquet,
    histories/ and checkpoints/ for ``len(cells) * samples`` trials over ``folds`` folds.

    Every fold's val and test split holds ``per_fold`` images cycling through the classes,
    so every class is present. results.csv val_/test_ columns are fold means of scikit-learn
    metrics on the written predictions.
    """
    from sklearn.metrics import (accuracy_score, f1_score, log_loss, precision_score,
                                 recall_score, roc_auc_score)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    c = len(classes)
    pos = classes.index(positive) if positive is not None else None
    avg = dict(average="binary", pos_label=pos) if c == 2 else dict(average="macro")

    def scores(g: pd.DataFrame) -> dict[str, float]:
        y, yp, pr = g["label"].to_numpy(), g["pred"].to_numpy(), g[[f"prob_{k}" for k in classes]].to_numpy()
        auc = roc_auc_score(y == pos, pr[:, pos]) if c == 2 else \
            roc_auc_score(y, pr, multi_class="ovr", labels=list(range(c)))
        return {"loss": log_loss(y, pr, labels=list(range(c))),
                "accuracy": accuracy_score(y, yp),
                "precision": precision_score(y, yp, zero_division=0, **avg),
                "recall": recall_score(y, yp, zero_division=0, **avg),
                "f1": f1_score(y, yp, zero_division=0, **avg), "auc": auc}

    pred_frames, results = [], []
    lrs = [1e-4, 1e-3, 3e-3, 1e-2]
    batches = [16, 32, 64]
    for ci, (backbone, finetune, head) in enumerate(cells):
        for s in range(samples):
            # Ray-shaped 8-hex-digit ids that look like numbers ("1e000000", "2e000001"):
            # every reader must keep them as text
            trial_id = f"{ci + 1}e{s:06d}"
            skill = {"val": rng.uniform(0.55, 0.95), "test": rng.uniform(0.55, 0.95)}
            for fold in range(folds):
                for split in ("val", "test"):
                    labels = (np.arange(per_fold) + fold) % c
                    p = _predictions(rng, labels, c, skill[split], passes, perfect)
                    frame = pd.DataFrame({
                        "trial_id": trial_id, "backbone": backbone, "finetune": finetune,
                        "head": head, "fold": fold, "split": split,
                        "path": [f"/data/{classes[k]}/f{fold}_{split}_{i}.png" for i, k in enumerate(labels)],
                        "group": [f"p{fold}_{i // 2}" for i in range(per_fold)],
                        "label": labels, "label_name": [classes[k] for k in labels],
                        "pred": p["pred"],
                        **{f"prob_{k}": p["probs"][:, j] for j, k in enumerate(classes)},
                        "mc_label": p["mc_label"], "mc_confidence": p["mc_confidence"],
                        **{f"mc_mean_{k}": p["mc_mean"][:, j] for j, k in enumerate(classes)},
                        "entropy": -(p["mc_mean"] * np.log(p["mc_mean"])).sum(axis=1),
                        "mutual_information": rng.uniform(0, 0.1, per_fold),
                        "refer": p["mc_confidence"] < threshold,
                    })
                    pred_frames.append(frame)
            trial_preds = pd.concat(pred_frames[-2 * folds:])
            row = {"trial_id": trial_id, "backbone": backbone, "finetune": finetune, "head": head,
                   "lr": lrs[(ci + s) % len(lrs)], "batch_size": batches[s % len(batches)],
                   "status": "TERMINATED"}
            for split in ("val", "test"):
                per = [scores(g) for _, g in trial_preds[trial_preds["split"] == split].groupby("fold")]
                row.update({f"{split}_{m}": float(np.mean([d[m] for d in per])) for m in per[0]})
            row.update({"time_s": 1.5, "history_dir": f"histories/{trial_id}",
                        "checkpoint_dir": f"checkpoints/{trial_id}", "baseline": False, "mc_dropout": True})
            results.append(row)
            hist_dir = out / "histories" / trial_id
            hist_dir.mkdir(parents=True, exist_ok=True)
            for fold in range(folds):
                epochs = np.arange(1, 4)
                hist = {"epoch": epochs}
                for split in ("train", "val"):
                    for m in HISTORY_METRICS:
                        base = 1.0 / epochs if m == "loss" else 1 - 0.3 / epochs
                        hist[f"{split}_{m}"] = base + rng.uniform(0, 0.05, len(epochs))
                pd.DataFrame(hist).to_csv(hist_dir / f"fold{fold}.csv", index=False)
                (out / "checkpoints" / trial_id / f"fold{fold}").mkdir(parents=True, exist_ok=True)

    preds = pd.concat(pred_frames, ignore_index=True)
    preds.to_parquet(out / "predictions.parquet", index=False, row_group_size=row_group_size)
    pd.DataFrame(results).to_csv(out / "results.csv", index=False)
    (out / "config.yaml").write_text(
        f"name: fabricated\ndata:\n  classes: {list(classes)}\n  positive_class: {positive}\n"
        f"cv:\n  folds: {folds}\nmc:\n  passes: {passes}\n  threshold: {threshold}\n")
    n_images = folds * per_fold
    meta = {
        "task": "binary" if c == 2 else "multiclass", "class_names": list(classes),
        "positive_class": positive, "mc": {"passes": passes, "threshold": threshold},
        "select_metric": "val_accuracy", "search_metric": "val_accuracy",
        "data": {"n_images": n_images,
                 "class_counts": {k: int(n_images / c) for k in classes}, "n_groups": n_images // 2,
                 "folds": [{"fold": f, "train": 2 * per_fold, "val": per_fold, "test": per_fold}
                           for f in range(folds)],
                 "bad_files": [{"path": "/data/normal/broken.png", "reason": "truncated PNG"}]},
        "started": "2026-11-22T10:00:00", "finished": "2026-11-22T10:05:00",
        "raycyto_version": "0.1.0",
    }
    (out / "experiment.json").write_text(json.dumps(meta, indent=2))
    return out


def rewrite_predictions(exp_dir: Path, fn: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    """Apply ``fn`` to predictions.parquet in place."""
    path = Path(exp_dir) / "predictions.parquet"
    fn(pd.read_parquet(path)).to_parquet(path, index=False)


def test_fabricated_experiment_follows_the_contract(tmp_path):
    exp = fabricate_experiment(tmp_path / "e", folds=2, per_fold=6)
    for name in ("config.yaml", "experiment.json", "results.csv", "predictions.parquet"):
        assert (exp / name).is_file()
    preds = pd.read_parquet(exp / "predictions.parquet")
    assert set(preds["split"]) == {"val", "test"}
    assert np.allclose(preds[["prob_normal", "prob_abnormal"]].sum(axis=1), 1)
    results = read_csv(exp / "results.csv")
    assert len(results) == len(CELLS) * 2
    assert {f"val_{m}" for m in ("loss", "accuracy", "precision", "recall", "f1", "auc")} <= set(results)
    assert (exp / "histories" / results["trial_id"][0] / "fold1.csv").is_file()
