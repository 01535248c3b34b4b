"""Drift statistics: a window of served answers against the model's own validation reference.

The reference (``model.json["reference"]``, written by ``raycyto export``,
:func:`reference_json`) is what the exported model answered, exactly as Serve answers
(:class:`raycyto.serve.predict.LocalPredictor`), for images that chose nothing: the exported
fold's test images. It keeps the predicted class counts, the referral and out-of-distribution
counts, and the sorted confidences and guard distances (a few KB).

A window (:class:`Sample`, from audit records or ``/predict`` answers) is compared with it by
one two-sample test per statistic (:data:`STATISTICS`):

==============  ================================================  ==========================
statistic        value                                             test (two-sided)
==============  ================================================  ==========================
class_mix        shares of the predicted labels                    chi-square homogeneity
referral_rate    share of answers referred                         Fisher exact
ood_rate         share flagged out of distribution                 Fisher exact
confidence       MC vote confidence distribution                   Kolmogorov-Smirnov
ood_score        the guard's Mahalanobis distances                 Kolmogorov-Smirnov
==============  ================================================  ==========================

Under no drift the window's images and the reference images are draws from one distribution,
so every p-value is valid whatever the reference's size (two-sample tests: the reference's
own sampling noise is accounted for). Ties (confidences are shares of T passes) make the KS
and Fisher p-values conservative; the chi-square pools classes expected fewer than
:data:`MIN_EXPECTED` times in the reference row. :func:`bound` is Bonferroni's: an alarm when
``p < alpha / m`` over the ``m`` tests run, so a log without drift alarms with probability
<= alpha (``benchmarks/drift_monitor.py`` measures it).

A statistic is not tested (``n/a``) when it cannot be compared: no guard on either side, or
answers given under another referral rule or another number of MC passes than the
reference's (a per-request ``threshold`` or ``passes``), which changes referral and confidence
without any drift.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
from scipy import stats

from raycyto.monitor import DEFAULT_ALPHA, DEFAULT_MIN_WINDOW, DEFAULT_WINDOW
from raycyto.serve.audit import referral_rule

__all__ = ["DEFAULT_ALPHA", "DEFAULT_MIN_WINDOW", "DEFAULT_WINDOW", "STATISTICS", "BundleReferenceError", "Check",
           "DriftWatch", "Sample", "Statistic", "answer_of", "bound", "compare", "drift_level", "load_reference",
           "reference_json", "reference_of", "window_slices"]

REFERENCE_KEY = "reference"
"""model.json key of the validation reference."""
REFERENCE_VERSION = 1
MAX_VALUES = 2000
"""Largest number of confidences / distances stored (more: this many evenly spaced order statistics)."""
MIN_EXPECTED = 5.0
"""The chi-square pools classes whose expected count in the reference row is below this."""

ANSWER_FIELDS = ("label", "confidence", "refer", "out_of_distribution", "ood_score", "rule", "passes")
"""The fields of an answer (audit record or ``/predict`` JSON) a window reads."""


class BundleReferenceError(ValueError):
    """A bundle has no usable validation reference."""


# ----------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Sample:
    """What the statistics read from a set of answers (a window, or the reference).

    Attributes:
        n: answers.
        class_counts: predicted label -> answers.
        referred: answers referred (for any reason).
        ood: answers flagged out of distribution (None: no guard).
        ood_n: answers with a guard verdict.
        confidence: sorted vote confidences ``[n]``.
        ood_score: sorted guard distances ``[ood_n]`` (None: no guard).
        rules: the referral rules (in words) the answers were given under.
        passes: the MC passes they were given with.
    """

    n: int
    class_counts: dict[str, int]
    referred: int
    ood: Optional[int]
    ood_n: int
    confidence: np.ndarray
    ood_score: Optional[np.ndarray]
    rules: frozenset[str]
    passes: frozenset[int]

    @classmethod
    def from_answers(cls, answers: Iterable[Mapping[str, Any]]) -> "Sample":
        """A sample of answers: audit records, or ``/predict`` JSON through :func:`answer_of`."""
        rows = list(answers)
        counts: dict[str, int] = {}
        for r in rows:
            counts[str(r["label"])] = counts.get(str(r["label"]), 0) + 1
        guarded = [r for r in rows if r.get("ood_score") is not None and r.get("out_of_distribution") is not None]
        return cls(n=len(rows), class_counts=counts, referred=sum(bool(r["refer"]) for r in rows),
                   ood=sum(bool(r["out_of_distribution"]) for r in guarded) if guarded else None,
                   ood_n=len(guarded),
                   confidence=np.sort(np.array([float(r["confidence"]) for r in rows], dtype=float)),
                   ood_score=np.sort(np.array([float(r["ood_score"]) for r in guarded], dtype=float))
                   if guarded else None,
                   rules=frozenset(str(r["rule"]) for r in rows),
                   passes=frozenset(int(r["passes"]) for r in rows))

    @classmethod
    def from_reference(cls, ref: Mapping[str, Any]) -> "Sample":
        """The sample stored in model.json ``reference`` (:func:`reference_json`).

        Raises:
            BundleReferenceError: not a reference this version can read.
        """
        try:
            if int(ref["version"]) != REFERENCE_VERSION:
                raise BundleReferenceError(f"reference version {ref['version']} (this raycyto reads {REFERENCE_VERSION})")
            score = ref.get("ood_score")
            return cls(n=int(ref["n"]), class_counts={str(k): int(v) for k, v in ref["class_counts"].items()},
                       referred=int(ref["referred"]), ood=None if ref.get("ood") is None else int(ref["ood"]),
                       ood_n=int(ref.get("ood_n") or 0),
                       confidence=np.sort(np.asarray(ref["confidence"], dtype=float)),
                       ood_score=None if score is None else np.sort(np.asarray(score, dtype=float)),
                       rules=frozenset([str(ref["rule"])]), passes=frozenset([int(ref["passes"])]))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, BundleReferenceError):
                raise
            raise BundleReferenceError(f"model.json reference is malformed ({type(e).__name__}: {e})") from None


def answer_of(result: Mapping[str, Any]) -> dict[str, Any]:
    """The answer fields of a ``/predict`` JSON (``build_result``), as an audit record holds them."""
    return {"label": result["label"], "confidence": result["confidence"], "refer": result["refer"],
            "out_of_distribution": result.get("out_of_distribution"), "ood_score": result.get("ood_score"),
            "rule": referral_rule(result), "passes": result["passes"]}


def _stored(values: np.ndarray) -> list[float]:
    v = np.sort(np.asarray(values, dtype=float))
    if len(v) > MAX_VALUES:  # evenly spaced order statistics, ends kept
        v = v[np.rint(np.linspace(0, len(v) - 1, MAX_VALUES)).astype(int)]
    return [float(f"{x:.6g}") for x in v]


def reference_json(answers: Iterable[Mapping[str, Any]], source: str) -> dict[str, Any]:
    """model.json ``reference`` of answers (audit-record fields, :func:`answer_of`).

    Args:
        answers: what the bundle answered for its reference images.
        source: which images they are, in words.

    Raises:
        BundleReferenceError: answers given under more than one rule or number of passes, or none.
    """
    s = Sample.from_answers(answers)
    if s.n == 0 or len(s.rules) != 1 or len(s.passes) != 1:
        raise BundleReferenceError(f"a reference needs answers under one rule and one number of passes; got "
                             f"{s.n} answers, rules {sorted(s.rules)}, passes {sorted(s.passes)}")
    return {"version": REFERENCE_VERSION, "source": source, "n": s.n,
            "class_counts": dict(sorted(s.class_counts.items())), "referred": s.referred,
            "ood": s.ood, "ood_n": s.ood_n, "rule": next(iter(s.rules)), "passes": next(iter(s.passes)),
            "confidence": _stored(s.confidence),
            "ood_score": None if s.ood_score is None else _stored(s.ood_score),
            "note": "what the exported bundle answered (raycyto.serve.predict.LocalPredictor, the endpoint's "
                    "seeds and rule) for these images; confidence and ood_score sorted"
                    + (f", {MAX_VALUES} evenly spaced order statistics" if s.n > MAX_VALUES else "")}


def reference_of(meta: Mapping[str, Any], where: str = "model.json") -> Sample:
    """The validation reference of a bundle's model.json.

    Raises:
        BundleReferenceError: none stored (a bundle exported before references existed), or unreadable.
    """
    ref = meta.get(REFERENCE_KEY)
    if not ref:
        raise BundleReferenceError(f"{where} has no validation reference ('{REFERENCE_KEY}'): the bundle was "
                             "exported before raycyto stored one; re-export it (raycyto export EXP_DIR "
                             "--out NEW_DIR) and monitor against the new bundle")
    return Sample.from_reference(ref)


def load_reference(model_dir: str, sha256: Optional[str] = None) -> Sample:
    """The validation reference of the bundle at ``model_dir`` (a folder or a URI).

    Args:
        sha256: the SHA-256 of the model.json that is served; a different file there (the
            bundle was replaced on disk) is refused.

    Raises:
        BundleReferenceError: no model.json, another one than served, or no usable reference in it.
    """
    import hashlib
    import json

    from raycyto.storage import read_bytes

    try:
        raw = read_bytes(f"{str(model_dir).rstrip('/')}/model.json")
    except (OSError, ValueError) as e:
        raise BundleReferenceError(f"cannot read {model_dir}/model.json ({e})") from None
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise BundleReferenceError(f"{model_dir}/model.json is not the one served (sha256 {sha256[:12]})")
    return reference_of(json.loads(raw), f"{model_dir}/model.json")


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Check:
    """One statistic of one window against the reference.

    Attributes:
        statistic: a key of :data:`STATISTICS`.
        value, reference: the window's and the reference's value, in words.
        test: the test and its statistic, in words.
        effect: the size of the difference (total variation, rate difference, KS D).
        p: the test's p-value (None: not tested; ``note`` says why).
        note: why not tested.
    """

    statistic: str
    value: str
    reference: str
    test: str
    effect: float = float("nan")
    p: Optional[float] = None
    note: str = ""

    @property
    def tested(self) -> bool:
        return self.p is not None

    def alarm(self, bound: float) -> bool:
        """Whether this check is beyond ``bound`` (p below it)."""
        return self.p is not None and self.p < bound


def _shares(counts: Mapping[str, int], names: list[str]) -> str:
    n = max(sum(counts.values()), 1)
    return ", ".join(f"{c} {counts.get(c, 0) / n:.2f}" for c in names)


def _pooled_table(win: Mapping[str, int], ref: Mapping[str, int], names: list[str]) -> np.ndarray:
    """``[2, K]`` counts (reference row first), the classes rarest in total merged into one column
    until the reference row expects each at least MIN_EXPECTED times (or two columns remain)."""
    table = np.array([[ref.get(c, 0) for c in names], [win.get(c, 0) for c in names]], dtype=float)
    table = table[:, table.sum(0) > 0]
    table = table[:, np.argsort(-table.sum(0), kind="stable")]   # most common first
    n_ref = table[0].sum()

    def expected_ref(t: np.ndarray) -> np.ndarray:
        return n_ref * t.sum(0) / t.sum()

    while table.shape[1] > 2 and expected_ref(table).min() < MIN_EXPECTED:
        table = np.c_[table[:, :-2], table[:, -2:].sum(1)]
    return table


def class_mix(w: Sample, r: Sample) -> Check:
    """Predicted-label shares; chi-square test of homogeneity of the 2 x classes table."""
    names = sorted(set(r.class_counts) | set(w.class_counts))
    tv = 0.5 * sum(abs(w.class_counts.get(c, 0) / max(w.n, 1) - r.class_counts.get(c, 0) / max(r.n, 1))
                   for c in names)
    table = _pooled_table(w.class_counts, r.class_counts, names)
    if table.shape[1] < 2:   # one class on both sides
        p, chi2 = 1.0, 0.0
    else:
        chi2, p, _, _ = stats.chi2_contingency(table, correction=table.shape[1] == 2)
    return Check("class_mix", _shares(w.class_counts, names), _shares(r.class_counts, names),
                 f"chi-square {float(chi2):.1f} ({table.shape[1] - 1} df), TV {tv:.2f}", tv, float(p))


def _rate_check(name: str, k_w: int, n_w: int, k_r: int, n_r: int) -> Check:
    _, p = stats.fisher_exact([[k_r, n_r - k_r], [k_w, n_w - k_w]])
    rw, rr = k_w / max(n_w, 1), k_r / max(n_r, 1)
    return Check(name, f"{rw:.3f} ({k_w}/{n_w})", f"{rr:.3f} ({k_r}/{n_r})",
                 f"Fisher exact, diff {rw - rr:+.3f}", rw - rr, float(min(1.0, p)))


def _same_serving(w: Sample, r: Sample, what: str) -> str:
    if what == "rule" and w.rules != r.rules:
        return f"answered under {sorted(w.rules)}, the reference under {sorted(r.rules)}"
    if w.passes != r.passes:
        return f"answered with {sorted(w.passes)} MC passes, the reference with {sorted(r.passes)}"
    return ""


def referral_rate(w: Sample, r: Sample) -> Check:
    """Share referred; Fisher's exact test against the reference's count."""
    note = _same_serving(w, r, "rule")
    if note:
        return Check("referral_rate", f"{w.referred / max(w.n, 1):.3f}", f"{r.referred / max(r.n, 1):.3f}",
                     "Fisher exact", note=note)
    return _rate_check("referral_rate", w.referred, w.n, r.referred, r.n)


def ood_rate(w: Sample, r: Sample) -> Check:
    """Share flagged out of distribution; Fisher's exact test against the reference's count."""
    if w.ood is None or r.ood is None:
        return Check("ood_rate", "-" if w.ood is None else f"{w.ood / max(w.ood_n, 1):.3f}",
                     "-" if r.ood is None else f"{r.ood / max(r.ood_n, 1):.3f}", "Fisher exact",
                     note="no out-of-distribution guard " + ("in the answers" if w.ood is None else "in the reference"))
    return _rate_check("ood_rate", w.ood, w.ood_n, r.ood, r.ood_n)


def _ks(name: str, a: np.ndarray, b: np.ndarray, fmt: str) -> Check:
    res = stats.ks_2samp(a, b, alternative="two-sided", method="auto")
    return Check(name, f"median {np.median(a):{fmt}}", f"median {np.median(b):{fmt}}",
                 f"KS D {float(res.statistic):.2f}", float(res.statistic), float(res.pvalue))


def confidence(w: Sample, r: Sample) -> Check:
    """Vote-confidence distribution; two-sample Kolmogorov-Smirnov."""
    note = _same_serving(w, r, "passes")
    if note:
        return Check("confidence", f"median {np.median(w.confidence):.3f}",
                     f"median {np.median(r.confidence):.3f}", "KS", note=note)
    return _ks("confidence", w.confidence, r.confidence, ".3f")


def ood_score(w: Sample, r: Sample) -> Check:
    """The guard's distance distribution; two-sample Kolmogorov-Smirnov."""
    if w.ood_score is None or r.ood_score is None or len(w.ood_score) == 0 or len(r.ood_score) == 0:
        return Check("ood_score", "-" if w.ood_score is None else f"median {np.median(w.ood_score):.4g}",
                     "-" if r.ood_score is None else f"median {np.median(r.ood_score):.4g}", "KS",
                     note="no out-of-distribution guard " + ("in the answers" if w.ood_score is None
                                                              else "in the reference"))
    return _ks("ood_score", w.ood_score, r.ood_score, ".4g")


@dataclass(frozen=True)
class Statistic:
    """A drift statistic: what it compares and its two-sample test."""

    describe: str
    test: str
    check: Callable[[Sample, Sample], Check]


STATISTICS: dict[str, Statistic] = {
    "class_mix": Statistic("shares of the predicted labels", "chi-square homogeneity", class_mix),
    "referral_rate": Statistic("share of answers referred", "Fisher exact", referral_rate),
    "ood_rate": Statistic("share flagged out of distribution", "Fisher exact", ood_rate),
    "confidence": Statistic("MC vote confidence distribution", "two-sample Kolmogorov-Smirnov", confidence),
    "ood_score": Statistic("the guard's Mahalanobis distances", "two-sample Kolmogorov-Smirnov", ood_score),
}
"""Statistic name -> how a window is compared with the reference (see the module docstring)."""


def compare(window: Sample, reference: Sample) -> list[Check]:
    """Every statistic of :data:`STATISTICS` for one window."""
    return [s.check(window, reference) for s in STATISTICS.values()]


def bound(alpha: float, tests: int) -> float:
    """Bonferroni: per-test p-value bound that keeps the chance of any false alarm <= ``alpha``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha {alpha}: must be in (0, 1), e.g. 0.05")
    return alpha / max(int(tests), 1)


def window_slices(n: int, size: int, min_size: int) -> list[slice]:
    """Consecutive windows of ``size`` answers; the last, partial one only if it has >= ``min_size``."""
    if size < 1 or min_size < 1:
        raise ValueError(f"window {size} and minimum {min_size} must be >= 1")
    out = [slice(i, min(i + size, n)) for i in range(0, n, size)]
    return [s for s in out if s.stop - s.start >= min(size, min_size)]


# ----------------------------------------------------------------------------- served drift


def drift_level(p: float) -> float:
    """The gauge's value of a p-value: ``-log10 p`` (0: no evidence; 2: p = 0.01)."""
    return float(-math.log10(max(float(p), 1e-300)))


@dataclass
class DriftWatch:
    """A rolling window of one served model's answers, compared with its reference every ``every``
    answers once the window is full (the ``raycyto_drift`` gauge of :mod:`raycyto.serve.metrics`).

    Args:
        reference: the bundle's validation reference.
        window: answers in the rolling window.
        every: compare after this many new answers.
    """

    reference: Sample
    window: int = DEFAULT_WINDOW
    every: int = 50
    _recent: deque = field(init=False, repr=False)
    _since: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self._recent = deque(maxlen=int(self.window))

    def add(self, answer: Mapping[str, Any]) -> Optional[dict[str, float]]:
        """Add one answer (audit-record fields, :func:`answer_of`); every ``every`` answers with a
        full window, returns ``{statistic: -log10 p}`` for each tested statistic plus ``window``:
        ``-log10`` of the Bonferroni-adjusted smallest p (``min(1, S * min p)`` over the S tested);
        None otherwise."""
        self._recent.append({k: answer.get(k) for k in ANSWER_FIELDS})
        self._since += 1
        if len(self._recent) < self.window or self._since < self.every:
            return None
        self._since = 0
        checks = [c for c in compare(Sample.from_answers(self._recent), self.reference) if c.tested]
        out = {c.statistic: drift_level(c.p) for c in checks}
        if checks:
            out["window"] = drift_level(min(1.0, len(checks) * min(c.p for c in checks)))
        return out
