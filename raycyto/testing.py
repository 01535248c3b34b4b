"""Planted-fault datasets for reliability checks (used by tests and benchmarks).

A lab can point ``raycyto data inspect`` at the result to see what the bad-file report
looks like; the tests use it to check that exactly the planted paths are reported.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _encode(image: np.ndarray, ext: str) -> bytes:
    import cv2

    ok, buf = cv2.imencode(ext, image)
    assert ok, ext
    return buf.tobytes()


def _truncated(data: bytes, keep: float) -> bytes:
    return data[: int(len(data) * keep)]


#: kind -> function(rng, good image) -> bytes, or None for "the file does not exist".
CORRUPT_KINDS = {
    "empty": lambda rng, img: b"",
    "truncated_png": lambda rng, img: _truncated(_encode(img, ".png"), 0.5),
    "truncated_jpeg": lambda rng, img: _truncated(_encode(img, ".jpg"), 0.3),
    "random_bytes": lambda rng, img: rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(),
    "text": lambda rng, img: b"this is not an image, just text with an image extension\n",
    "gif": lambda rng, img: b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04"
    b"\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;",
    "bomb": lambda rng, img: bomb_png(),
    "missing": None,
}


def planted_dataset(out: Path, n: int, corrupt_fraction: float = 0.01, size: int = 32,
                    seed: int = 0, classes: tuple[str, ...] = ("normal", "abnormal")
                    ) -> tuple[Path, dict[str, str]]:
    """Write ``n`` images, ``round(n * corrupt_fraction)`` of them corrupt, and a manifest.

    Corrupt files cycle through every kind in :data:`CORRUPT_KINDS`; good files are random
    PNG/JPEG/TIFF/BMP images. Returns (manifest path, {absolute corrupt path: kind}).
    """
    rng = np.random.default_rng(seed)
    out = Path(out)
    n_bad = int(round(n * corrupt_fraction))
    bad_at = set(rng.choice(n, size=n_bad, replace=False).tolist())
    kinds = list(CORRUPT_KINDS)
    formats = [".png", ".jpg", ".tif", ".bmp"]
    rows, planted = [], {}
    for c in classes:
        (out / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = classes[i % len(classes)]
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        if i in bad_at:
            kind = kinds[len(planted) % len(kinds)]
            path = out / label / f"bad_{i:05d}_{kind}.png"
            maker = CORRUPT_KINDS[kind]
            if maker is not None:
                path.write_bytes(maker(rng, img))
            planted[str(path.resolve())] = kind
        else:
            ext = formats[i % len(formats)]
            path = out / label / f"img_{i:05d}{ext}"
            path.write_bytes(_encode(img, ext))
        rows.append({"path": str(path.relative_to(out)), "label": label, "group": f"g{i // 2:05d}"})
    manifest = out / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest, planted
