"""Selective classification: risk-coverage curves and AURC for several confidence scores.

A confidence score ranks cases; keeping the most confident share ``c`` (coverage) and
referring the rest, the selective risk is the error rate on the kept cases. The
risk-coverage curve traces it over all thresholds and AURC is the area under it (Geifman
& El-Yaniv 2017; Geifman, Uziel & El-Yaniv 2019): lower is better. AURC mixes how often
the model is wrong with how well the score ranks its errors last; E-AURC subtracts the
AURC of a perfect ranking of the same errors, leaving the ranking part.

Ties: many cases share a score (MC vote confidence is k/T; conformal set size is an
integer), so the order inside a tie is undefined. :func:`aurc` is the expectation over a
uniformly random order within ties: ``mean_{k=1..N} E[errors among the k kept] / k``,
where inside a tie group of m cases with e errors each extra kept case adds e/m errors.

Scores compared (:func:`selective_scores`), each with the prediction it ranks:
MC vote confidence (MC vote), MC mean softmax max (its argmax), single-pass softmax max
(``pred``), temperature-scaled softmax max (``pred``; for two classes the ranking, hence
the AURC, equals the softmax one), conformal set size negated (``pred``), MC predictive
entropy negated (MC mean argmax), and max logit (``pred``) when real logits are at hand
(stored probabilities give log-probabilities, whose max is not the max logit).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

SCORE_NAMES = ("MC vote confidence", "MC mean softmax", "softmax", "temperature-scaled softmax",
               "conformal set size", "MC predictive entropy", "max logit")


def _groups(correct: np.ndarray, confidence: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tie groups in decreasing confidence: (confidence [G], size [G], errors [G])."""
    conf = np.asarray(confidence, dtype=float)
    err = ~np.asarray(correct, dtype=bool)
    values, inverse = np.unique(-conf, return_inverse=True)      # ascending -conf
    size = np.bincount(inverse, minlength=len(values))
    errors = np.bincount(inverse, weights=err, minlength=len(values))
    return -values, size, errors


def risk_coverage(correct: np.ndarray, confidence: np.ndarray) -> pd.DataFrame:
    """Selective risk at every reachable threshold (keep cases with confidence >= it).

    Args:
        correct: [N] bool, the prediction is right.
        confidence: [N] higher = more confident.

    Returns:
        DataFrame with columns threshold, coverage, risk, kept; coverage ascending.
    """
    values, size, errors = _groups(correct, confidence)
    n = int(size.sum())
    kept = np.cumsum(size)
    return pd.DataFrame({"threshold": values, "coverage": kept / n if n else kept * np.nan,
                         "risk": np.cumsum(errors) / np.maximum(kept, 1), "kept": kept})


def aurc(correct: np.ndarray, confidence: np.ndarray) -> float:
    """Area under the risk-coverage curve, averaged over random orders within ties.

    Args:
        correct: [N] bool; confidence: [N].

    Returns:
        AURC in [0, 1] (NaN for no cases).
    """
    values, size, errors = _groups(correct, confidence)
    n = int(size.sum())
    if n == 0:
        return float("nan")
    start = np.repeat(np.cumsum(size) - size, size)              # [N] cases kept before the group
    err_before = np.repeat(np.cumsum(errors) - errors, size)     # [N] errors kept before the group
    rate = np.repeat(errors / size, size)                        # [N] errors per case in the group
    j = np.arange(n) - start + 1                                  # [N] position inside the group
    k = np.arange(1, n + 1)                                       # [N] cases kept
    return float(np.mean((err_before + j * rate) / k))


def aurc_optimal(correct: np.ndarray) -> float:
    """AURC of a perfect ranking (every error referred first) of the same predictions."""
    correct = np.asarray(correct, dtype=bool)
    return aurc(correct, correct.astype(float))


def excess_aurc(correct: np.ndarray, confidence: np.ndarray) -> float:
    """E-AURC = AURC - AURC of the perfect ranking (0 = the score ranks errors perfectly)."""
    return aurc(correct, confidence) - aurc_optimal(correct)


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)


def selective_scores(labels: np.ndarray, pred: np.ndarray, probs: np.ndarray, *,
                     mc_label: np.ndarray | None = None, mc_confidence: np.ndarray | None = None,
                     mc_mean: np.ndarray | None = None, temperature: float | None = None,
                     set_size: np.ndarray | None = None, logits: np.ndarray | None = None
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every available confidence score with the correctness of the prediction it ranks.

    Args:
        labels: [N] true classes; pred: [N] single-pass argmax; probs: [N, C] softmax.
        mc_label, mc_confidence: [N] MC vote and its share of passes.
        mc_mean: [N, C] MC mean softmax.
        temperature: fitted T (on validation) for the temperature-scaled softmax.
        set_size: [N] conformal prediction-set sizes.
        logits: [N, C] real logits (max logit).

    Returns:
        {name in SCORE_NAMES: (correct [N] bool, confidence [N])}, only the available ones.
    """
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=float)
    ok = np.asarray(pred) == y
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if mc_label is not None and mc_confidence is not None:
        out["MC vote confidence"] = (np.asarray(mc_label) == y, np.asarray(mc_confidence, float))
    if mc_mean is not None:
        m = np.asarray(mc_mean, dtype=float)
        out["MC mean softmax"] = (m.argmax(1) == y, m.max(1))
    out["softmax"] = (ok, p.max(1))
    if temperature is not None:
        from raycyto.referral.temperature import logits_from_probs, scaled_softmax

        scaled = scaled_softmax(logits_from_probs(p), temperature)      # [N, C]
        out["temperature-scaled softmax"] = (ok, scaled.max(1))
    if set_size is not None:
        out["conformal set size"] = (ok, -np.asarray(set_size, dtype=float))
    if mc_mean is not None:
        m = np.asarray(mc_mean, dtype=float)
        out["MC predictive entropy"] = (m.argmax(1) == y, -_entropy(m))
    if logits is not None:
        out["max logit"] = (ok, np.asarray(logits, dtype=float).max(1))
    return out


def selective_summary(scores: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """One row per score: score, aurc, e_aurc, risk (at full coverage), n."""
    rows = [{"score": name, "aurc": aurc(c, s), "e_aurc": excess_aurc(c, s),
             "risk": float(np.mean(~np.asarray(c, bool))) if len(c) else float("nan"), "n": len(c)}
            for name, (c, s) in scores.items()]
    return pd.DataFrame(rows, columns=["score", "aurc", "e_aurc", "risk", "n"])


def selective_curves(scores: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Figure-ready long table: score, coverage, risk, threshold, kept (one curve per score)."""
    parts = [risk_coverage(c, s).assign(score=name) for name, (c, s) in scores.items()]
    cols = ["score", "coverage", "risk", "threshold", "kept"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def selective_folds(predictions: pd.DataFrame, prob_columns: Sequence[str],
                    mc_mean_columns: Sequence[str] | None = None,
                    by: Sequence[str] = ("trial_id", "fold"), conformal_level: float = 0.9,
                    conformal_score: str = "lac") -> pd.DataFrame:
    """Per (trial, fold): fit the temperature and the conformal sets on the validation rows,
    then score every confidence on the test rows.

    Args:
        predictions: predictions.parquet rows (``by``, split, label, pred, prob columns,
            mc_label, mc_confidence, mc_mean columns when present).
        prob_columns: [C] single-pass probability columns in class order.
        mc_mean_columns: [C] MC mean columns (None or missing: MC scores left out).
        conformal_level, conformal_score: the sets whose size is scored.

    Returns:
        Long table, one row per (group, score, test case): the ``by`` columns, score,
        correct, confidence. Feed groups to :func:`aurc` / :func:`risk_coverage`.
    """
    from raycyto.referral.temperature import fit_temperature
    from raycyto.referral.conformal import calibrate_conformal, prediction_sets

    cols = list(prob_columns)
    mc_cols = list(mc_mean_columns or [])
    has_mc = bool(mc_cols) and set(mc_cols) <= set(predictions.columns)
    parts = []
    for key, g in predictions.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        val, test = g[g["split"] == "val"], g[g["split"] == "test"]
        if test.empty:
            continue
        p = test[cols].to_numpy(dtype=float)                        # [N, C]
        temperature = set_size = None
        if len(val):
            yv = val["label"].to_numpy()
            temperature = fit_temperature(yv, probs=val[cols].to_numpy(dtype=float)).temperature
            cal = calibrate_conformal(val[cols].to_numpy(dtype=float), yv, [conformal_level],
                                      [conformal_score])
            set_size = prediction_sets(p, cal, conformal_score, conformal_level).sum(1)
        scores = selective_scores(
            test["label"].to_numpy(), test["pred"].to_numpy(), p,
            mc_label=test["mc_label"].to_numpy() if "mc_label" in test else None,
            mc_confidence=test["mc_confidence"].to_numpy() if "mc_confidence" in test else None,
            mc_mean=test[mc_cols].to_numpy(dtype=float) if has_mc else None,
            temperature=temperature, set_size=set_size)
        for name, (correct, conf) in scores.items():
            parts.append(pd.DataFrame({**dict(zip(by, key)), "score": name,
                                       "correct": correct, "confidence": conf}))
    cols_out = [*by, "score", "correct", "confidence"]
    if not parts:
        return pd.DataFrame(columns=cols_out)
    return pd.concat(parts, ignore_index=True)[cols_out]
