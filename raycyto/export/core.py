"""``raycyto export``: write the configuration the report calls best as a servable bundle.

Selection is :mod:`raycyto.analysis.selection`'s one rule, the same the report highlights
(``--select`` on both commands; default ``brier+1se``), on validation data only:
1. the trial: the configuration the rule picks: under the default one-SE rule the linear probe
   when no trained head beats it beyond noise (a probe bundle serves like any other);
2. the fold: among that trial's folds, the best validation value under the same rule (ties:
   lower validation loss, then the lowest fold). The fold checkpoint *is* its best epoch.

``model.json["referral"]`` is what Serve refers by (:func:`referral_for_export`): the rule
(``mc.refer_rule``: ``vote``, ``set`` or ``risk``), the split-conformal thresholds of the
prediction set and, for binary tasks, the risk-controlled threshold with its guarantee and the
highest certifiable recall, all calibrated on the trial's out-of-fold test rows
(:mod:`raycyto.referral.fit`: rows that took no part in training, early stopping, temperature
fitting or selection), on the MC mean probabilities Serve returns; the temperature (reported
only) on the exported fold's validation rows.

``model.json["reference"]`` is the validation reference of ``raycyto monitor`` and Serve's drift
gauge (:func:`validation_reference`): the exported bundle's own answers on the exported fold's
test images (class counts, referral and out-of-distribution counts, sorted confidences and
guard distances).

``layout.json`` (checksummed in model.json ``files``) is the karyogram layout that turns the
evidence map into chromosome names (:func:`raycyto.evidence.layout.config_layout`): the file
given as ``--layout``, else the sweep config's ``data.layout``, else the built-in one when the
sweep trained on raycyto.synth karyograms, else none (Serve then gives the map only).

``model.json["metrics"]`` carries the exported fold's own validation and test metrics
(recomputed from predictions.parquet), and the trial's fold means labelled as such. The
checkpoint bundle is loaded (its checksums verified), enriched and saved again with
``raycyto.models.bundle.save_bundle``, so ``model.json`` carries the SHA-256 of each weights
file and ``load_bundle`` refuses a tampered copy.
"""

from __future__ import annotations

import math
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raycyto.config import METRICS
from raycyto.data.decode import is_uri
from raycyto.errors import ConfigError, RaycytoError
from raycyto.evidence.layout import config_layout, write_to_bundle
from raycyto.referral.fit import CalibrationError, calibrate_trial, mc_config, with_rule
from raycyto.storage import copy_tree


def _metrics(row: pd.Series, prefix: str) -> dict[str, float]:
    out = {}
    for m in METRICS:
        v = pd.to_numeric(pd.Series([row.get(f"{prefix}_{m}")]), errors="coerce").iloc[0]
        if not (isinstance(v, float) and math.isnan(v)):
            out[m] = float(v)
    return out


def fold_metrics(exp: Any, trial_id: str, fold: int) -> dict[str, dict[str, float]]:
    """Validation and test metrics of one fold of one trial, from predictions.parquet.

    Returns:
        {"val": {accuracy, balanced_accuracy, precision, recall, f1, auc, loss, n}, "test": {...}}
    """
    from raycyto.analysis.metrics import SELECT_METRICS, classification_metrics

    p = exp.predictions
    out = {}
    for split in ("val", "test"):
        g = p[(p["trial_id"] == str(trial_id)) & (p["fold"] == int(fold)) & (p["split"] == split)]
        if g.empty:
            continue
        y, pred = g["label"].to_numpy(), g["pred"].to_numpy()
        probs = g[exp.prob_columns].to_numpy(dtype=float)
        values, _ = classification_metrics(y, pred, probs, exp.positive)
        for name in ("balanced_accuracy", "loss"):
            values[name] = SELECT_METRICS[name][0](y, pred, probs, exp.positive)
        out[split] = {k: (None if isinstance(v, float) and np.isnan(v) else float(v)) for k, v in values.items()}
        out[split]["n"] = int(len(g))
    return out


def default_model_dir(exp_dir: str | Path) -> Path:
    """``runs/demo/model`` beside a main job's experiment folder, else ``EXP_DIR/model``."""
    from raycyto.analysis.load import main_job_root

    return (main_job_root(exp_dir) or Path(exp_dir)) / "model"


def referral_for_export(exp: Any, trial_id: str, fold: int, target_recall: float | None = None,
                        refer_rule: str | None = None) -> dict[str, Any] | None:
    """model.json ``referral`` of one trial (fold ``fold`` exported): the rule, the conformal
    thresholds of the served set and (binary tasks) the risk-controlled threshold with its
    guarantee, calibrated on the trial's out-of-fold test rows; the temperature on ``fold``'s
    validation rows (:mod:`raycyto.referral.fit`).

    Args:
        target_recall: overrides ``mc.target_recall`` (``--target-recall``, as on ``report``).
        refer_rule: overrides ``mc.refer_rule`` (``--refer-rule``).

    Returns:
        The JSON; None when the trial has no test rows and the rule is ``vote`` (the bundle
        then serves without prediction sets).

    Raises:
        ConfigError: a rule the task cannot use (``risk`` on a multiclass task), or a rule
            that needs a calibration the fold cannot give.
    """
    mc = mc_config(exp, target_recall if exp.binary else None)
    if refer_rule is not None:
        try:
            mc = with_rule(mc, refer_rule=refer_rule)
        except ConfigError as e:
            raise ConfigError("--refer-rule", str(e)) from None
    if mc.refer_rule == "risk" and not exp.binary:
        raise ConfigError("--refer-rule" if refer_rule else "mc.refer_rule",
                          f"'risk' needs a binary task (this one has {exp.num_classes} classes); "
                          "use 'set' or 'vote'")
    if target_recall is not None and not exp.binary:
        raise ConfigError("--target-recall", "the risk-controlled threshold needs a binary task")
    if mc.set_keep == "negative" and not exp.binary:
        raise ConfigError("mc.set_keep", "'negative' needs a binary task with a positive class; use 'single'")
    try:
        cal = calibrate_trial(exp, trial_id, mc, temperature_fold=fold)
    except CalibrationError:
        if mc.refer_rule == "vote":
            return None
        raise
    positive = exp.class_names[exp.positive] if exp.positive is not None else "positive"
    return cal.to_json(mc, positive)


def calibrate_guard(guard: Any, model: Any, meta: dict, exp: Any, trial_id: str, fold: int,
                    rate: float | None) -> Any:
    """Threshold the guard on the exported fold's test images and the copies the model tolerates.

    The per-image guard refers what the model cannot read (another task's images, photographs,
    noise); a mildly shifted image of its own task (another scanner: JPEG re-save, blur,
    contrast, a small rotation or rescale) is the drift monitor's business, not a referral.
    So the threshold is set here, whatever the sweep set, on the exported fold's *test* images
    (predictions.parquet ``split == "test"`` rows of this trial and fold: they chose nothing,
    neither training, early stopping nor selection), each scored as the original, as shifted
    copies (:data:`raycyto.referral.ood.GUARD_SHIFTS`, :mod:`raycyto.data.shift`, seeded) and,
    when the sweep trained on augmented copies (``data.copies > 1``), as a copy of its
    augmentation policy, embedded exactly as Serve does;
    :func:`raycyto.referral.ood.calibrate_on_images` takes the largest per-family conformal
    threshold at ``rate`` (or the largest score when too few images) and records
    ``calibrated_by``, ``n_calibration`` (images) and ``calibration`` in the guard's meta.

    Returns:
        ``guard`` (changed in place), or unchanged when there is none or the images cannot be
        read here.
    """
    import yaml

    from raycyto.referral.ood import GUARD_POLICY_COPIES, GUARD_SEED, GUARD_SHIFTS, calibrate_on_images
    from raycyto.serve.validation import ClientError, decode_upload

    if guard is None:
        return guard
    p = exp.predictions
    paths = p.loc[(p["trial_id"].astype(str) == str(trial_id)) & (p["fold"] == int(fold))
                  & (p["split"] == "test"), "path"]
    try:
        images = [decode_upload(Path(str(x)).read_bytes()) for x in sorted(set(paths))]
    except (OSError, ValueError, RaycytoError, ClientError):
        return guard
    if len(images) < 2:
        return guard
    data = (yaml.safe_load(exp.config_text) or {}).get("data") or {}
    policy = data.get("policy")
    trained_on_copies = policy not in (None, "none") and int(data.get("copies") or 1) > 1
    return calibrate_on_images(guard, model, meta, images, 0.05 if rate is None else float(rate),
                               shifts=GUARD_SHIFTS, policy=policy if trained_on_copies else None,
                               policy_copies=GUARD_POLICY_COPIES if trained_on_copies else 0,
                               seed=GUARD_SEED, source=f"test images of trial {trial_id} fold {fold}")


def validation_reference(bundle_dir: Path, exp: Any, trial_id: str, fold: int) -> dict[str, Any] | None:
    """model.json ``reference`` (:mod:`raycyto.monitor`): what the bundle in ``bundle_dir`` answers,
    exactly as Serve does (:class:`raycyto.serve.predict.LocalPredictor`: its seed, passes and
    rule), for the exported fold's test images, the images that chose nothing and that the guard
    was calibrated on (:func:`calibrate_guard`).

    Returns:
        :func:`raycyto.monitor.drift.reference_json` of those answers; None when the images
        cannot be read here (the bundle then has no reference, and ``raycyto monitor`` says so).
    """
    from raycyto.monitor.drift import answer_of, reference_json
    from raycyto.serve.predict import LocalPredictor
    from raycyto.serve.validation import ClientError

    p = exp.predictions
    paths = p.loc[(p["trial_id"].astype(str) == str(trial_id)) & (p["fold"] == int(fold))
                  & (p["split"] == "test"), "path"]
    try:
        data = [Path(str(x)).read_bytes() for x in sorted(set(paths))]
    except OSError:
        return None
    predictor = LocalPredictor(bundle_dir)
    answers = []
    for d in data:
        try:
            answers.append(answer_of(predictor.predict_bytes(d)))
        except ClientError:
            continue
    if not answers:
        return None
    return reference_json(answers, f"the {len(answers)} test images of trial {trial_id} fold {fold} "
                                   "(predictions.parquet split == test: no training, early stopping or "
                                   "selection; the guard's calibration images)")


def export_model(exp_dir: str | Path, out: str | Path | None = None, select: str | None = None,
                 trial: str | None = None, target_recall: float | None = None,
                 threshold: float | None = None, refer_rule: str | None = None,
                 layout: str | Path | None = None) -> Path | str:
    """Export the configuration the selection rule calls best (or a named trial) as a bundle.

    Args:
        exp_dir: experiment folder written by ``raycyto sweep``, or a main-job folder
            (``runs/demo``) holding one in ``experiment/``.
        out: destination folder (replaced if it already holds a bundle; default
            ``runs/demo/model`` for a main-job folder, else ``EXP_DIR/model``), or an
            object-store URI (``s3://bucket/models/x``, as a string): the verified bundle is
            written locally, then copied there.
        select: the selection rule (default ``brier+1se``); the report's ``--select``.
        trial: export this trial id instead (e.g. a probe ``probe-<backbone>`` the rule did not pick).
        target_recall: recall target of the risk-controlled threshold (binary tasks; default
            ``mc.target_recall``), the report's ``--target-recall``.
        threshold: the vote threshold Serve applies (default: the sweep's ``mc.threshold``).
        refer_rule: ``vote``, ``set`` or ``risk`` (default ``mc.refer_rule``).
        layout: a karyogram layout file (JSON or CSV, :func:`raycyto.evidence.layout.load_layout`)
            stored in the bundle; default: the built-in one for raycyto.synth karyograms, else none.
    Returns:
        ``out`` (holding model.json + weight files).
    """
    import yaml

    from raycyto.analysis.load import load_experiment, resolve_experiment_dir
    from raycyto.analysis.selection import best_fold
    from raycyto.analysis.tables import resolve_rule, select_best
    from raycyto.models.bundle import load_bundle, load_guard, save_bundle

    exp_dir = resolve_experiment_dir(exp_dir)
    if out is None:
        out = default_model_dir(Path(exp_dir))
    if is_uri(str(out)):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="raycyto-export-") as tmp:
            copy_tree(str(export_model(exp_dir, Path(tmp) / "model", select, trial, target_recall,
                                       threshold, refer_rule, layout)), str(out))
        return out
    out = Path(out)
    exp = load_experiment(exp_dir)
    rule = resolve_rule(exp, select)
    if trial is not None:
        rows = exp.results[exp.results["trial_id"].astype(str) == str(trial)]
        if rows.empty:
            raise ConfigError("--trial", f"trial {trial!r} not in results.csv; "
                                         f"known: {exp.results['trial_id'].astype(str).tolist()[:20]}")
        row = rows.iloc[0]
    else:
        best = select_best(exp, rule)
        row = exp.results[exp.results["trial_id"] == best["trial_id"]].iloc[0]
    trial_id = str(row["trial_id"])
    fold, fold_val = best_fold(exp, rule, trial_id)
    ckpt = exp_dir / "checkpoints" / trial_id / f"fold{fold}"
    model, meta = load_bundle(ckpt)  # verifies the checkpoint's checksums

    experiment = exp.meta
    config = yaml.safe_load(exp.config_text) or {}
    chosen_layout = config_layout(config, layout)
    mc = {**(meta.get("mc") or {}), **(experiment.get("mc") or {})}
    mc.setdefault("scope", "head")
    if threshold is not None:
        if not 0 < threshold <= 1:
            raise ConfigError("--threshold", f"expected 0 < value <= 1, got {threshold}")
        mc["threshold"] = float(threshold)
    referral = referral_for_export(exp, trial_id, fold, target_recall, refer_rule)
    enriched = {k: v for k, v in meta.items() if k != "files"}
    enriched.update({
        "name": f"{experiment.get('task') or config.get('name') or 'raycyto'}-{row['backbone']}-{row['head']}",
        "class_names": exp.class_names,
        "positive_class": experiment.get("positive_class", meta.get("positive_class")),
        "mc": mc,
        "config": config,
        "metrics": {**fold_metrics(exp, trial_id, fold),
                    "trial_mean_val": _metrics(row, "val"), "trial_mean_test": _metrics(row, "test"),
                    "note": f"val/test: fold {fold}'s own predictions (the exported weights); "
                            "trial_mean_*: the trial's means over all folds"},
        "selection": {"rule": str(rule), "describe": rule.describe(), "trial_id": trial_id, "fold": fold,
                      "fold_val": fold_val, "source": str(Path(exp_dir).resolve()),
                      "named": trial is not None},
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    if referral is not None:
        enriched["referral"] = referral
    else:
        enriched.pop("referral", None)

    if out.exists() and any(out.iterdir()) and not (out / "model.json").is_file():
        raise ConfigError("--out", f"{out} exists and is not a model bundle; choose an empty folder")
    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    guard = calibrate_guard(load_guard(ckpt, meta), model, meta, exp, trial_id, fold,
                            (config.get("mc") or {}).get("ood_false_alarm", 0.05))
    save_bundle(tmp, model, enriched, guard=guard)
    reference = validation_reference(tmp, exp, trial_id, fold)
    if reference is not None:  # answered by the saved bundle itself, then stored in it
        save_bundle(tmp, model, {**enriched, "reference": reference}, guard=guard)
    if chosen_layout is not None:
        write_to_bundle(tmp, chosen_layout)
    load_bundle(tmp)  # refuse to publish a bundle that does not verify
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
