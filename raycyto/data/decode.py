"""Safe image decoding: format by content, size checked from the header before decoding.

Only PNG, JPEG, TIFF and BMP are accepted, recognised by their magic bytes (never by the
file extension). The header's width x height is checked against a pixel budget *before*
the pixels are decoded, so a small file that claims to be 100000 x 100000 (a
decompression bomb) is refused in microseconds. Every failure is a :class:`DecodeError`
with a short ``reason`` that ends up in the bad-file report.
"""

from __future__ import annotations

import struct
from typing import Callable

import numpy as np

from raycyto.errors import DataError

MAX_PIXELS: int = 64_000_000  # 8000 x 8000; far above any microscope field or karyogram
URI_SCHEMES = ("s3://", "gs://", "gcs://", "file://", "hdfs://", "abfs://", "abfss://", "az://")


class DecodeError(DataError):
    """An image could not be read or decoded; ``reason`` is a short phrase for reports."""

    def __init__(self, reason: str, path: str | None = None) -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)


# ----------------------------------------------------------------------------- headers
def _png_size(data: bytes) -> tuple[int, int]:
    # 8-byte signature, then the IHDR chunk: length(4) "IHDR"(4) width(4) height(4), big endian
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise DecodeError("truncated (no PNG header)")
    w, h = struct.unpack(">II", data[16:24])
    return w, h


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    # Walk the marker segments until a start-of-frame marker, which holds height, width.
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise DecodeError("not an image (corrupt JPEG markers)")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        (seg_len,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in _JPEG_SOF:
            if i + 9 > n:
                break
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        i += 2 + seg_len
    raise DecodeError("truncated (no JPEG frame header)")


def _tiff_size(data: bytes) -> tuple[int, int]:
    end = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        raise DecodeError("truncated (no TIFF header)")
    (ifd,) = struct.unpack(end + "I", data[4:8])
    if ifd + 2 > len(data):
        raise DecodeError("truncated (TIFF directory past end of file)")
    (count,) = struct.unpack(end + "H", data[ifd:ifd + 2])
    dims: dict[int, int] = {}
    for k in range(count):
        off = ifd + 2 + 12 * k
        if off + 12 > len(data):
            raise DecodeError("truncated (TIFF directory past end of file)")
        tag, typ = struct.unpack(end + "HH", data[off:off + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            fmt = end + ("H" if typ == 3 else "I")
            dims[tag] = struct.unpack(fmt, data[off + 8:off + 8 + struct.calcsize(fmt)])[0]
    if 256 not in dims or 257 not in dims:
        raise DecodeError("not an image (TIFF without width/height)")
    return dims[256], dims[257]


def _bmp_size(data: bytes) -> tuple[int, int]:
    if len(data) < 26:
        raise DecodeError("truncated (no BMP header)")
    (hdr,) = struct.unpack("<I", data[14:18])
    if hdr == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        w, h = struct.unpack("<HH", data[18:22])
    else:
        w, h = struct.unpack("<ii", data[18:26])
    return abs(w), abs(h)  # negative height = top-down rows


def _png_complete(data: bytes) -> bool:
    return data.rfind(b"IEND") > 0  # the final chunk; trailing bytes after it are tolerated


def _jpeg_complete(data: bytes) -> bool:
    # Entropy-coded data byte-stuffs 0xFF, so FFD9 (end of image) and FFDA (start of scan)
    # only occur as markers: a complete file has an EOI after its last scan.
    return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda")


# name, magic prefixes, header reader, completeness check
_FORMATS: dict[str, tuple[tuple[bytes, ...], Callable[[bytes], tuple[int, int]], Callable[[bytes], bool] | None]] = {
    "PNG": ((b"\x89PNG\r\n\x1a\n",), _png_size, _png_complete),
    "JPEG": ((b"\xff\xd8\xff",), _jpeg_size, _jpeg_complete),
    "TIFF": ((b"II*\x00", b"MM\x00*"), _tiff_size, None),
    "BMP": ((b"BM",), _bmp_size, None),
}

# Recognised but refused, so the report can say what the file actually is.
_OTHER_MAGIC = {b"GIF87a": "GIF", b"GIF89a": "GIF", b"RIFF": "WEBP/RIFF", b"%PDF": "PDF",
                b"\x00\x00\x00\x0cjP  ": "JPEG 2000", b"PK\x03\x04": "ZIP"}


def sniff_format(data: bytes) -> str:
    """Return the image format of ``data`` ("PNG", "JPEG", "TIFF", "BMP") from its magic bytes.

    Raises:
        DecodeError: empty data, or content that is not one of the supported formats.
    """
    if not data:
        raise DecodeError("empty file")
    for name, (magics, _, _) in _FORMATS.items():
        if any(data.startswith(m) for m in magics):
            return name
    for magic, name in _OTHER_MAGIC.items():
        if data.startswith(magic):
            raise DecodeError(f"unsupported format {name} (PNG, JPEG, TIFF or BMP only)")
    raise DecodeError("not an image (unsupported format; PNG, JPEG, TIFF or BMP only)")


def image_size(data: bytes) -> tuple[str, int, int]:
    """Read (format, width, height) from the header only, without decoding pixels."""
    fmt = sniff_format(data)
    w, h = _FORMATS[fmt][1](data)
    if w <= 0 or h <= 0:
        raise DecodeError(f"not an image ({fmt} header says {w} x {h})")
    return fmt, w, h


# ----------------------------------------------------------------------------- decode
def _cv2():
    """cv2 with its own error logging silenced: failures are reported as DecodeError rows."""
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    return cv2


def _to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """OpenCV's BGR/BGRA/gray, 8/16-bit/float -> [H, W, 3] uint8 RGB."""
    import cv2

    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)  # keep the high byte: 0..65535 -> 0..255
    elif img.dtype in (np.float32, np.float64):
        scale = 255.0 if float(np.nanmax(img, initial=0.0)) <= 1.0 else 1.0
        img = np.clip(np.nan_to_num(img) * scale, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise DecodeError(f"unsupported pixel type {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)  # alpha dropped
    if img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    raise DecodeError(f"unsupported channel count {img.shape[2]}")


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode PNG/JPEG/TIFF/BMP bytes to RGB, refusing oversized images before decoding.

    Args:
        data: the file's bytes.
        max_pixels: largest accepted width * height (decompression-bomb guard).
    Returns:
        [H, W, 3] uint8 RGB.
    Raises:
        DecodeError: with ``reason`` "empty file", "truncated", "not an image",
            "unsupported format ...", "too many pixels (W x H > limit)".
    """
    cv2 = _cv2()
    fmt, w, h = image_size(data)
    if w * h > max_pixels:
        raise DecodeError(f"too many pixels ({w} x {h} > {max_pixels})")
    check = _FORMATS[fmt][2]
    if check is not None and not check(data):
        raise DecodeError(f"truncated ({fmt} ends early)")
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        raise DecodeError(f"corrupt ({fmt} decoder: {str(e).strip().splitlines()[-1][:120]})") from None
    if img is None or img.size == 0:
        raise DecodeError(f"truncated or corrupt ({fmt} could not be decoded)")
    if img.shape[0] < h or img.shape[1] < w:
        raise DecodeError(f"truncated ({img.shape[1]} x {img.shape[0]} decoded, header says {w} x {h})")
    return _to_rgb_uint8(img)


# ----------------------------------------------------------------------------- files
def is_uri(path: str) -> bool:
    """True for object-store / filesystem URIs read through pyarrow.fs (``s3://...``)."""
    return "://" in str(path)


def read_bytes(path: str) -> bytes:
    """Read a local file or a pyarrow.fs URI; missing/unreadable -> DecodeError."""
    try:
        if is_uri(path):
            import pyarrow.fs as pafs

            fs, inner = pafs.FileSystem.from_uri(path)
            if fs.get_file_info(inner).type == pafs.FileType.NotFound:
                raise DecodeError("missing", path)
            with fs.open_input_stream(inner) as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except DecodeError:
        raise
    except FileNotFoundError:
        raise DecodeError("missing", path) from None
    except IsADirectoryError:
        raise DecodeError("unreadable (a directory)", path) from None
    except PermissionError:
        raise DecodeError("unreadable (permission denied)", path) from None
    except OSError as e:
        raise DecodeError(f"unreadable ({type(e).__name__}: {e})", path) from None


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize [H, W, 3] to [size, size, 3] (area filter when shrinking, bilinear otherwise)."""
    import cv2

    if image.shape[:2] == (size, size):
        return image
    shrink = image.shape[0] * image.shape[1] > size * size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def load_image(path: str, size: int | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read, decode and optionally resize one image.

    Args:
        path: local path or URI readable by pyarrow.fs.
        size: output side length; None keeps the original size.
        max_pixels: decompression-bomb guard, see :func:`decode_image`.
    Returns:
        [H, W, 3] uint8 RGB ([size, size, 3] when size is given).
    Raises:
        DecodeError: with ``path`` and ``reason`` set.
    """
    data = read_bytes(str(path))
    try:
        image = decode_image(data, max_pixels)
    except DecodeError as e:
        raise DecodeError(e.reason, str(path)) from None
    except Exception as e:  # noqa: BLE001 - a decoder must never crash the pipeline
        raise DecodeError(f"unreadable ({type(e).__name__}: {e})", str(path)) from None
    return resize(image, size) if size else image
