"""Small on-disk datasets for tests, demos, benchmarks and `data inspect` checks.

``plant_bad_files`` writes one file of every bad kind, each mapped to the start of the
reason the decoder must report, plus unusual-but-good files (16-bit, grayscale, RGBA)
that must decode. ``write_image_folder`` writes a tiny ``root/<label>/*.png`` set with a
manifest, without depending on the synthetic generators.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, valid-looking PNG whose header claims width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + _png_chunk(b"IEND", b""))


def _encode(ext: str, image: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(ext, image)
    assert ok, ext
    return buf.tobytes()


def bad_file_bytes(rng: np.random.Generator, size: int = 32) -> dict[str, tuple[bytes, str]]:
    """One file of every bad kind: {file name: (bytes, expected reason prefix)}."""
    rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)  # noise: JPEG stays large
    png, jpg = _encode(".png", rgb), _encode(".jpg", rgb)
    gif = b"GIF89a" + struct.pack("<HH", size, size) + b"\x00" * 32
    return {
        "bad_empty.png": (b"", "empty file"),
        "bad_truncated.png": (png[: len(png) // 2], "truncated"),
        "bad_truncated.jpg": (jpg[: len(jpg) // 2], "truncated"),
        "bad_random.png": (rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(), "not an image"),
        "bad_text.png": (b"this is a text file, not a picture\n", "not an image"),
        "bad_animation.gif": (gif, "unsupported format"),
        "bad_bomb.png": (bomb_png(), "too many pixels"),
    }


def plant_bad_files(folder: Path, size: int = 32, seed: int = 0) -> tuple[dict[str, str], list[str]]:
    """Write bad files (and two unusual good ones) into ``folder``.

    Args:
        folder: where to write (created if needed), e.g. ``DATA/<label>``.
        size: side of the planted images.
    Returns:
        (bad: {absolute path: expected reason prefix}, good: [absolute paths that must decode]).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bad = {}
    for name, (data, reason) in bad_file_bytes(rng, size).items():
        (folder / name).write_bytes(data)
        bad[str((folder / name).resolve())] = reason
    good_bytes = {
        "good_16bit.png": _encode(".png", (rng.integers(0, 65536, (size, size, 3))).astype(np.uint16)),
        "good_gray.jpg": _encode(".jpg", rng.integers(0, 256, (size, size), dtype=np.uint8)),
        "good_gray16.tif": _encode(".tif", (rng.integers(0, 65536, (size, size))).astype(np.uint16)),
        "good_rgba.bmp": _encode(".bmp", rng.integers(0, 256, (size, size, 4), dtype=np.uint8)),
    }
    good = []
    for name, data in good_bytes.items():
        (folder / name).write_bytes(data)
        good.append(str((folder / name).resolve()))
    return bad, good


def planted_stream(root: Path, n: int, corrupt_fraction: float = 0.01, size: int = 32, seed: int = 0,
                   classes: tuple[str, ...] = ("normal", "abnormal")) -> tuple[Path, dict[str, str]]:
    """A manifest of ``n`` images of which ``round(n * corrupt_fraction)`` are bad.

    Bad entries cycle through every kind of :func:`bad_file_bytes` plus a listed file that
    does not exist; good ones are random PNG/JPEG/TIFF/BMP images.

    Returns:
        (manifest path, {absolute bad path: expected reason prefix}).
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    kinds = list(bad_file_bytes(rng, size).items()) + [("bad_missing.png", (None, "missing"))]
    bad_at = set(rng.choice(n, size=int(round(n * corrupt_fraction)), replace=False).tolist())
    formats = (".png", ".jpg", ".tif", ".bmp")
    rows, planted = [], {}
    for label in classes:
        (root / label).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = classes[i % len(classes)]
        if i in bad_at:
            name, (data, reason) = kinds[len(planted) % len(kinds)]
            path = root / label / f"{i:05d}_{name}"
            if data is not None:
                path.write_bytes(data)
            planted[str(path.resolve())] = reason
        else:
            ext = formats[i % len(formats)]
            path = root / label / f"{i:05d}{ext}"
            path.write_bytes(_encode(ext, rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
        rows.append({"path": str(path.relative_to(root)), "label": label, "group": f"g{i // 2:05d}"})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest, planted


def write_image_folder(root: Path, classes: tuple[str, ...] = ("a", "b"), groups_per_class: int = 4,
                       per_group: int = 2, size: int = 32, seed: int = 0) -> Path:
    """Write ``root/<label>/g<k>_i<j>.png`` (a dark disc on a light background) and a manifest.

    Returns:
        the path of ``root/manifest.csv`` (columns path,label,group; paths relative to root).
    """
    import cv2
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for c, label in enumerate(classes):
        (root / label).mkdir(parents=True, exist_ok=True)
        for g in range(groups_per_class):
            for i in range(per_group):
                img = np.full((size, size, 3), 220, np.uint8)
                centre = tuple(int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
                cv2.circle(img, centre, size // 6 + c, tuple(int(v) for v in rng.integers(20, 90, 3)), -1)
                rel = f"{label}/g{c}{g}_i{i}.png"
                cv2.imwrite(str(root / rel), img)
                rows.append({"path": rel, "label": label, "group": f"{label}-g{g}"})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest
