"""Data checks that decide whether a cross-validated number can be trusted.

- :func:`check_folds`: every class needs enough groups (patients, slides, source images)
  for k folds and a grouped validation split inside each training side; otherwise a clear
  error naming ``--folds`` / ``cv.folds``, the smallest class and its group count.
- :func:`group_warning`: with no ``group`` column each image counts as its own patient, so
  several images of one patient (or crops of one photograph) can sit on both sides of a split.
- :func:`fingerprint` / :func:`near_duplicates`: a 256-bit DCT perceptual hash of each decoded
  image, and the pairs of images in *different* groups whose hashes differ in at most
  ``max_bits`` bits and that land in different test folds: the same picture counted as two
  patients. Measured on the synthetic sets (20 patients x 2): different patients' karyograms
  differ in >= 34 of 256 bits, blood smears in >= 104; a JPEG re-encode (quality 70) or a
  resize of one image differs in 0-2. :data:`NEAR_DUPLICATE_BITS` = 16 sits between.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from raycyto.errors import DataError

NEAR_DUPLICATE_BITS = 16   # of 256: pairs at or below this Hamming distance are reported
_HASH_SIDE, _DCT_SIDE = 64, 16


def min_groups_per_class(folds: int) -> int:
    """Groups each class needs for ``folds`` outer folds plus a grouped inner validation split:
    at least one group per test fold, and at least two on every training side."""
    return max(int(folds), math.ceil(2 * folds / (folds - 1)))


def groups_per_class(labels: np.ndarray, groups: np.ndarray, class_names: Sequence[str]) -> dict[str, int]:
    """Number of distinct groups of each class."""
    df = pd.DataFrame({"label": np.asarray(labels), "group": np.asarray(groups).astype(str)})
    counts = df.groupby("label")["group"].nunique()
    return {name: int(counts.get(i, 0)) for i, name in enumerate(class_names)}


def check_folds(labels: np.ndarray, groups: np.ndarray, class_names: Sequence[str], folds: int,
                option: str = "--folds / cv.folds") -> None:
    """Refuse a fold count the smallest class cannot fill.

    Raises:
        DataError: naming ``option``, the smallest class and its number of groups.
    """
    counts = groups_per_class(labels, groups, class_names)
    need = min_groups_per_class(folds)
    smallest = min(counts, key=counts.get)
    if counts[smallest] < need:
        fit = max((k for k in range(2, folds) if min_groups_per_class(k) <= counts[smallest]), default=None)
        hint = f"lower {option} to {fit}" if fit else "add patients / images of that class"
        raise DataError(f"{option}={folds}: class {smallest!r} has only {counts[smallest]} group(s) "
                        f"(patients / source images); {folds} folds with a grouped validation split need "
                        f"at least {need} per class so every test fold holds every class. {hint} "
                        f"(groups per class: {counts})")


def group_warning(table: object) -> str | None:
    """A warning when the source gave no group (``group`` equals the path for every image)."""
    df = table.df  # type: ignore[attr-defined]
    if (df["group"].astype(str) == df["path"].astype(str)).all():
        return ("no group given: each image counts as its own patient. If several images come from one "
                "patient, slide or photograph, put that id in a manifest 'group' column (path,label,group), "
                "or images of one source can sit in both training and test folds and inflate every score.")
    return None


# ----------------------------------------------------------------------------- near-duplicates
def fingerprint(image: np.ndarray) -> str:
    """256-bit perceptual hash of a uint8 RGB image ``[H, W, 3]`` as 64 hex digits.

    Gray, area-resized to 64 x 64, 2-D DCT, the 16 x 16 lowest frequencies without the DC
    term compared with their median.
    """
    import cv2

    gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).astype(np.float32)
    small = cv2.resize(gray, (_HASH_SIDE, _HASH_SIDE), interpolation=cv2.INTER_AREA)
    coeffs = cv2.dct(small)[:_DCT_SIDE, :_DCT_SIDE].ravel()  # [256]
    coeffs[0] = np.median(coeffs[1:])  # the DC term carries brightness only
    return np.packbits(coeffs > np.median(coeffs)).tobytes().hex()


def _bits(hexes: Sequence[str]) -> np.ndarray:
    """[N] hex fingerprints -> [N, 32] uint8."""
    return np.frombuffer(bytes.fromhex("".join(hexes)), dtype=np.uint8).reshape(len(hexes), -1)


def near_duplicates(paths: Sequence[str], fingerprints: Sequence[str], groups: Sequence[str],
                    test_fold: Sequence[int] | None = None, max_bits: int = NEAR_DUPLICATE_BITS,
                    chunk: int = 512) -> pd.DataFrame:
    """Pairs of images in different groups whose fingerprints differ in <= ``max_bits`` bits.

    Args:
        paths, fingerprints, groups: [N] per readable source image.
        test_fold: [N] the outer fold each image is tested in; when given, only pairs that
            straddle folds (different test folds) are kept.
        max_bits: Hamming-distance bound (of 256 bits).
        chunk: rows compared at once (memory: chunk x N x 32 bytes).

    Returns:
        DataFrame path_a, path_b, bits, group_a, group_b (+ fold_a, fold_b), closest first.
    """
    n = len(paths)
    if n < 2:
        return pd.DataFrame(columns=["path_a", "path_b", "bits", "group_a", "group_b"])
    bits = _bits(list(fingerprints))
    popcount = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1)  # [256]
    groups = np.asarray(groups).astype(str)
    rows = []
    for start in range(0, n, chunk):
        block = bits[start:start + chunk]  # [b, 32]
        dist = popcount[block[:, None, :] ^ bits[None, :, :]].sum(-1)  # [b, N]
        a, b = np.nonzero(dist <= max_bits)
        a = a + start
        keep = (a < b) & (groups[a] != groups[b])
        for i, j in zip(a[keep], b[keep]):
            rows.append((i, j, int(dist[i - start, j])))
    out = pd.DataFrame(rows, columns=["i", "j", "bits"])
    paths = np.asarray(paths).astype(str)
    out = out.assign(path_a=paths[out["i"]], path_b=paths[out["j"]], group_a=groups[out["i"]],
                     group_b=groups[out["j"]])
    if test_fold is not None:
        fold = np.asarray(test_fold)
        out = out.assign(fold_a=fold[out["i"]], fold_b=fold[out["j"]])
        out = out[out["fold_a"] != out["fold_b"]]
    return out.drop(columns=["i", "j"]).sort_values(["bits", "path_a", "path_b"]).reset_index(drop=True)


def test_folds_of(n: int, splits: Sequence[object]) -> np.ndarray:
    """[n] the outer fold in which each source image is a test image (-1 if none)."""
    fold = np.full(n, -1)
    for s in splits:
        fold[s.test] = s.fold  # type: ignore[attr-defined]
    return fold


def describe_duplicates(pairs: pd.DataFrame, first: int = 3) -> str | None:
    """One warning line for near-duplicate pairs that straddle folds (None when there are none)."""
    if pairs.empty:
        return None
    listed = "; ".join(f"{a} ~ {b} ({d} bits)" for a, b, d in pairs[["path_a", "path_b", "bits"]].head(first).itertuples(index=False))
    more = f" (+{len(pairs) - first} more)" if len(pairs) > first else ""
    return (f"{len(pairs)} near-duplicate image pair(s) in different groups straddle folds (perceptual hash "
            f"within {NEAR_DUPLICATE_BITS}/256 bits): {listed}{more}. If they show the same patient or "
            "photograph, give them one group.")

