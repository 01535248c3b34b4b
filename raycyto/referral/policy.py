"""The served referral rule of a bundle: which cases go to a human, and why.

``model.json["referral"]`` (written by ``raycyto export`` from :mod:`raycyto.referral.fit`)
holds the rule, the conformal calibration of the served prediction set and, for binary
tasks, the risk-controlled threshold; :class:`ReferralPolicy` applies them to one image's MC
mean probabilities. Serve and ``raycyto predict`` import it from here, the report the same
calibration code, so the threshold a report shows is the one Serve applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from raycyto.config import REFER_RULES
from raycyto.errors import ConfigError
from raycyto.referral.conformal import ConformalCalibration, prediction_set

#: Why a case is referred when the out-of-distribution guard flags it.
OOD_REASON = "out_of_distribution"


@dataclass(frozen=True)
class ReferralPolicy:
    """How a bundle refers a case, from model.json ``referral`` (written by ``raycyto export``).

    Rules (``rule``): ``vote``: the MC vote confidence is below ``threshold`` (the studies);
    ``set``: the conformal prediction set is not exactly one class; ``risk``: the vote
    confidence is below the risk-controlled threshold (binary tasks; ``None`` = not certified:
    every case is referred). Whatever the rule, an input the out-of-distribution guard flags
    is referred with reason ``out_of_distribution``.

    Attributes:
        rule: the configured rule.
        conformal: the calibration of the prediction set (None: no set; the fields are omitted).
        score, level: which calibrated set is returned (``aps``/``lac``, e.g. 0.9).
        risk_threshold: risk-controlled threshold (NaN: none certified); None: not calibrated.
        guarantee: the risk threshold's guarantee in one sentence.
        set_keep: rule ``set`` keeps a case whose set is one class (``single``) or only
            ``{negative}`` (``negative``, binary tasks: a sensitivity guarantee).
        negative: the negative class index (binary tasks), for ``set_keep: negative``.
    """

    rule: str = "vote"
    conformal: Any = None
    score: str = "aps"
    level: float = 0.9
    risk_threshold: Optional[float] = None
    guarantee: str = ""
    set_keep: str = "single"
    negative: Optional[int] = None

    @classmethod
    def from_meta(cls, meta: dict[str, Any], rule: Optional[str] = None) -> "ReferralPolicy":
        """The policy of a bundle (``rule`` overrides the stored one).

        Raises:
            ConfigError: unknown rule, or a rule the bundle has no calibration for.
        """
        doc = meta.get("referral") or {}
        chosen = rule or doc.get("rule") or "vote"
        where = "refer_rule" if rule else "model.json referral.rule"
        if chosen not in REFER_RULES:
            raise ConfigError(where, f"expected one of {list(REFER_RULES)}, got {chosen!r}")
        conformal, score, level = None, "aps", 0.9
        if doc.get("conformal"):
            c = doc["conformal"]
            conformal = ConformalCalibration.from_json(c["calibration"])
            score, level = str(c["score"]), float(c["level"])
            conformal.threshold(score, level)  # refuses a set the calibration does not hold
        risk = doc.get("risk")
        risk_threshold = None if risk is None else (
            float("nan") if risk.get("threshold") is None else float(risk["threshold"]))
        if chosen == "set" and conformal is None:
            raise ConfigError(where, "rule 'set' needs a conformal calibration; this bundle has none "
                                     "(export it again with `raycyto export`)")
        if chosen == "risk" and risk_threshold is None:
            raise ConfigError(where, "rule 'risk' needs a risk-controlled threshold; this bundle has none "
                                     "(a binary task exported by `raycyto export`)")
        keep = str(doc.get("set_keep") or "single")
        negative = None
        names, positive = list(meta.get("class_names") or []), meta.get("positive_class")
        if len(names) == 2 and positive in names:
            negative = 1 - names.index(positive)
        if keep == "negative" and negative is None:
            raise ConfigError("model.json referral.set_keep", "'negative' needs a binary task with a positive class")
        return cls(chosen, conformal, score, level, risk_threshold,
                   str((risk or {}).get("statement") or ""), keep, negative)

    def prediction_set(self, mean: np.ndarray, u: Optional[float] = None) -> Optional[list[int]]:
        """Class indices of the set for MC mean probabilities ``[C]`` (None without calibration).

        Args:
            u: the image's uniform (:func:`raycyto.referral.conformal.image_uniform` of its bytes),
                which randomized APS sets need.
        """
        if self.conformal is None:
            return None
        return prediction_set(mean, self.conformal, self.score, self.level, u)

    def refers(self, members: Optional[list[int]], confidence: float, vote_refers: bool) -> bool:
        """Whether the rule refers a case: ``set``: its set is not exactly one class; ``risk``:
        its vote confidence is below the risk-controlled threshold (none certified: always);
        ``vote``: ``vote_refers`` (confidence below the vote threshold)."""
        if self.rule == "set":
            if self.set_keep == "negative":
                return members != [self.negative]
            return members is None or len(members) != 1
        if self.rule == "risk":
            t = self.risk_threshold
            return True if t is None or np.isnan(t) else confidence < t
        return bool(vote_refers)

    def describe(self, threshold: float) -> str:
        """The rule in words, e.g. ``confidence < 0.8`` (what the audit log records)."""
        if self.rule == "set":
            if self.set_keep == "negative":
                return f"{self.score.upper()} prediction set at {self.level:g} is not exactly the negative class"
            return f"{self.score.upper()} prediction set at {self.level:g} is not a single class"
        if self.rule == "risk":
            t = self.risk_threshold
            return "refer every case (no risk-controlled threshold certified)" if t is None or np.isnan(t) \
                else f"confidence < {t:g} (risk-controlled)"
        return f"confidence < {threshold:g}"
