"""Every guarantee of a sweep, calibrated on rows that chose nothing.

A sweep's validation rows do a lot: they stop each fold's training at its best epoch, pick
the probe's regularisation, fit the temperature and rank the configurations. Rows that chose
something are no longer exchangeable with new cases, so no guarantee is calibrated on them.

The rows that chose nothing are the *out-of-fold* ones: fold k's test rows, predicted by fold
k's model, which never trained, stopped or fitted anything on them. (The selection rule reads
other folds' validation predictions of the same images: a different model each time; see
docs/ARCHITECTURE.md.) Hence, for one trial (one configuration, K fold models):

- **measured** (the report): for each fold k, every guarantee is calibrated on the test rows of
  the other K-1 folds and measured on fold k's test rows (cross-fitting);
- **served** (``raycyto export``): calibrated on the test rows of all K folds, which is what
  the measurement checks with one fold fewer. With 266 images that is 266 calibration cases,
  where a fold's validation split held about 40.

What is calibrated there: the conformal sets (LAC, APS; marginal and Mondrian), the
risk-controlled threshold and the highest certifiable recall (binary tasks). The temperature
is not a guarantee: it is fitted on the exported fold's validation rows and only reported
(ECE before / after); the sets use the MC mean probabilities that Serve returns. The OOD
guard's threshold comes from the exported fold's test images (``raycyto.export.core``).

APS sets are randomized per image: each row's uniform is :func:`image_uniform` of the image's
bytes, read here from its path (:func:`with_uniforms`), exactly as Serve draws it from the
uploaded bytes, so a served set equals the one the report measured for the same file.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import pandas as pd

from raycyto.config import ConfigError, MCConfig, load_config, to_dict
from raycyto.errors import RaycytoError
from raycyto.referral.conformal import SCORES, ConformalCalibration, calibrate_conformal, image_uniform
from raycyto.referral.risk import RecallGuarantee, certifiable_recall, risk_controlled_threshold
from raycyto.referral.temperature import TemperatureScaling, fit_temperature
from raycyto.storage import read_bytes

if TYPE_CHECKING:  # pragma: no cover
    from raycyto.analysis.load import Experiment

#: Which rows calibrate the guarantees, in words (report and model.json).
ROWS = "out-of-fold test rows"


class CalibrationError(RaycytoError):
    """Nothing to calibrate on (no test rows), or rows that chose something were handed in."""


def mc_config(exp: "Experiment", target_recall: Optional[float] = None) -> MCConfig:
    """The sweep's ``mc`` section (config.yaml), with ``--target-recall`` applied and
    ``conformal_mondrian: null`` resolved (per class on binary tasks).

    Experiments written before a field existed get its default; ``mc.threshold`` comes from
    experiment.json (what the sweep applied).

    Raises:
        CalibrationError: config.yaml's ``mc`` section is invalid (the field named).
    """
    import yaml

    try:
        raw = (yaml.safe_load(exp.config_text) or {}).get("mc") or {}
    except yaml.YAMLError as exc:
        raise CalibrationError(f"{exp.exp_dir}/config.yaml: not valid YAML ({exc})") from None
    known = {f.name for f in dataclasses.fields(MCConfig)}
    raw = {k: v for k, v in dict(raw).items() if k in known}
    raw["threshold"] = float(exp.threshold)
    if target_recall is not None:
        raw["target_recall"] = float(target_recall)
    if raw.get("conformal_mondrian") is None:
        raw["conformal_mondrian"] = bool(exp.binary)
    try:
        return load_config({"mc": raw}).mc
    except ConfigError as exc:
        field = "--target-recall" if target_recall is not None and "target_recall" in str(exc) else "config.yaml"
        raise CalibrationError(f"{exp.exp_dir}: {field}: {exc}") from None


def with_rule(mc: MCConfig, **changes: Any) -> MCConfig:
    """``mc`` with fields replaced and checked (``refer_rule``, ``threshold``...)."""
    return load_config({"mc": {**to_dict(mc), **changes}}).mc if changes else dataclasses.replace(mc)


def levels_of(mc: MCConfig) -> tuple[float, ...]:
    """Conformal levels to calibrate: ``mc.conformal_levels`` plus the served ``mc.coverage``."""
    return tuple(sorted({*map(float, mc.conformal_levels), float(mc.coverage)}))


def probability_columns(exp: "Experiment") -> tuple[list[str], str]:
    """(columns, name) of the probabilities conformal sets use: the MC mean when the file has it."""
    if set(exp.mc_mean_columns) <= set(exp.predictions.columns):
        return exp.mc_mean_columns, "mc_mean"
    return exp.prob_columns, "softmax"


def min_positives(target: float, delta: float) -> int:
    """Fewest positive calibration cases that can certify ``target`` at all (no miss among them):
    the smallest n with ``target ** n <= delta``."""
    return int(math.ceil(math.log(delta) / math.log(target) - 1e-12))


def _path_uniform(path: str) -> float:
    """:func:`image_uniform` of the file's bytes; of the path text when it cannot be read here."""
    try:
        return image_uniform(read_bytes(path))
    except (OSError, ValueError, RaycytoError):
        return image_uniform(path.encode())


def with_uniforms(exp: "Experiment", rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with a column ``u``: each image's APS uniform (cached per path on ``exp``)."""
    cache = exp.cache.setdefault("image_uniforms", {})
    paths = rows["path"].astype(str)
    for p in set(paths) - set(cache):
        cache[p] = _path_uniform(p)
    return rows.assign(u=paths.map(cache).to_numpy(dtype=float))


def oof_rows(exp: "Experiment", trial_id: str, exclude_fold: Optional[int] = None) -> pd.DataFrame:
    """The out-of-fold rows of one trial (each fold's test rows), without ``exclude_fold``'s,
    with their uniforms."""
    p = exp.predictions
    rows = p[(p["trial_id"] == str(trial_id)) & (p["split"] == "test")]
    if exclude_fold is not None:
        rows = rows[rows["fold"] != int(exclude_fold)]
    return with_uniforms(exp, rows)


@dataclass(frozen=True)
class Calibration:
    """What the calibration rows of one trial fix (stored by export as model.json ``referral``).

    Attributes:
        trial_id: the configuration.
        folds: folds whose test rows calibrated it.
        n: calibration rows.
        probabilities: ``mc_mean`` or ``softmax`` (what the sets use).
        conformal: split-conformal thresholds (both scores, every level).
        temperature: fitted temperature with NLL/ECE before and after (reported, not applied).
        temperature_on: where the temperature was fitted.
        risk: binary tasks with a target: the learn-then-test recall guarantee, else None.
        certifiable: binary tasks: the highest recall certifiable at ``mc.risk_delta`` (None: none).
    """

    trial_id: str
    folds: tuple[int, ...]
    n: int
    probabilities: str
    conformal: ConformalCalibration
    temperature: TemperatureScaling
    temperature_on: str = ""
    risk: Optional[RecallGuarantee] = None
    certifiable: Optional[RecallGuarantee] = None

    @property
    def rows(self) -> str:
        """Which rows calibrated the guarantees, in words."""
        return (f"{self.n} {ROWS} of trial {self.trial_id} (folds {', '.join(map(str, self.folds))}: "
                "each predicted by the fold model that never trained, stopped or was calibrated on it)")

    def to_json(self, mc: MCConfig, positive_name: str = "positive") -> dict[str, Any]:
        """model.json ``referral``: the rule, the served set, the temperature and the guarantees."""
        doc: dict[str, Any] = {
            "rule": mc.refer_rule, "set_keep": mc.set_keep,
            "calibrated_on": {"trial_id": self.trial_id, "split": "test", "rows": ROWS,
                              "folds": list(self.folds), "n": self.n,
                              "probabilities": self.probabilities, "confidence": "mc_vote",
                              "describe": self.rows},
            "conformal": {"score": mc.conformal_score, "level": float(mc.coverage),
                          "calibration": self.conformal.to_json()},
            "temperature": {**self.temperature.to_json(), "fitted_on": self.temperature_on},
        }
        if self.risk is not None:
            doc["risk"] = {"threshold": None if not self.risk.certified else float(self.risk.threshold),
                           "statement": self.risk.statement(positive_name),
                           "guarantee": self.risk.to_json()}
            c = self.certifiable
            doc["risk"]["certifiable"] = None if c is None else {
                "target": c.target, "delta": c.delta, "threshold": float(c.threshold),
                "referral_rate": c.referral_rate, "statement": c.statement(positive_name)}
        return doc


def calibrate_rows(exp: "Experiment", rows: pd.DataFrame, mc: MCConfig, trial_id: str,
                   temperature_rows: Optional[pd.DataFrame] = None, temperature_on: str = "") -> Calibration:
    """Calibrate sets and (binary) the risk threshold on out-of-fold rows ``rows``.

    Args:
        rows: test rows (with ``u``, :func:`with_uniforms`) of one trial's folds.
        temperature_rows: rows the temperature is fitted on (a fold's validation rows); None:
            T = 1 (not fitted).

    Raises:
        CalibrationError: no rows, or a row that is not a test row.
    """
    if rows.empty:
        raise CalibrationError(f"{exp.exp_dir}: trial {trial_id} has no test predictions to calibrate on")
    if (rows["split"] != "test").any():
        raise CalibrationError("calibration was handed rows that chose something (not out-of-fold test rows)")
    cols, source = probability_columns(exp)
    probs = rows[cols].to_numpy(dtype=float)                     # [N, C]
    y = rows["label"].to_numpy()
    folds = tuple(sorted(int(f) for f in rows["fold"].unique()))
    cal = calibrate_conformal(probs, y, levels_of(mc), SCORES, mondrian=bool(mc.conformal_mondrian),
                              u=rows["u"].to_numpy(dtype=float),
                              source=f"{source} of trial {trial_id}, {len(rows)} {ROWS} (folds {list(folds)})")
    if temperature_rows is not None and len(temperature_rows):
        temp = fit_temperature(temperature_rows["label"].to_numpy(),
                               probs=temperature_rows[cols].to_numpy(dtype=float))
    else:
        temp = fit_temperature(y[:0], probs=probs[:0])
    risk = certifiable = None
    if exp.binary and mc.target_recall is not None:
        args = (y, rows["mc_label"].to_numpy(), rows["mc_confidence"].to_numpy(dtype=float), exp.positive)
        risk = risk_controlled_threshold(*args, mc.target_recall, mc.risk_delta)
        certifiable = certifiable_recall(*args, mc.risk_delta)
    return Calibration(str(trial_id), folds, len(rows), source, cal, temp, temperature_on, risk, certifiable)


def calibrate_trial(exp: "Experiment", trial_id: str, mc: MCConfig,
                    temperature_fold: Optional[int] = None) -> Calibration:
    """What ``raycyto export`` stores: :func:`calibrate_rows` on every fold's test rows of
    ``trial_id``; the temperature on ``temperature_fold``'s validation rows (the exported fold)."""
    p = exp.predictions
    temp_rows = None
    if temperature_fold is not None:
        temp_rows = p[(p["trial_id"] == str(trial_id)) & (p["fold"] == int(temperature_fold))
                      & (p["split"] == "val")]
    return calibrate_rows(exp, oof_rows(exp, trial_id), mc, trial_id, temp_rows,
                          f"{len(temp_rows)} validation rows of fold {temperature_fold}" if temp_rows is not None else "")
