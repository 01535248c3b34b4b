"""Safe decoding: format by content, header-size guard, every bad kind has a reason."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from raycyto.data.decode import DecodeError, decode_image, image_size, load_image
from raycyto.data.fixtures import bomb_png, plant_bad_files


def _encode(ext: str, img: np.ndarray) -> bytes:
    return cv2.imencode(ext, img)[1].tobytes()


RGB = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)  # [H, W, 3]


@pytest.mark.parametrize("ext", [".png", ".jpg", ".tif", ".bmp"])
def test_supported_formats_decode_to_rgb_uint8(ext):
    bgr = RGB[:, :, ::-1].copy()
    out = decode_image(_encode(ext, bgr))
    assert out.shape == (24, 40, 3) and out.dtype == np.uint8
    if ext != ".jpg":  # lossless formats: exact RGB order
        np.testing.assert_array_equal(out, RGB)


def test_grayscale_16bit_and_rgba_are_converted_to_rgb_uint8():
    g16 = np.full((8, 9), 0xAB00, np.uint16)
    out = decode_image(_encode(".png", g16))
    assert out.shape == (8, 9, 3) and out.dtype == np.uint8 and (out == 0xAB).all()
    bgra = np.dstack([RGB[:, :, ::-1], np.full(RGB.shape[:2], 7, np.uint8)])
    np.testing.assert_array_equal(decode_image(_encode(".png", bgra)), RGB)


def test_decompression_bomb_is_refused_from_the_header_in_milliseconds():
    data = bomb_png(100_000, 100_000)
    assert image_size(data) == ("PNG", 100_000, 100_000)
    t0 = time.perf_counter()
    with pytest.raises(DecodeError) as e:
        decode_image(data)
    assert time.perf_counter() - t0 < 0.05
    assert e.value.reason.startswith("too many pixels") and "100000 x 100000" in e.value.reason


def test_max_pixels_limit_is_configurable():
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_image(_encode(".png", RGB), max_pixels=24 * 40 - 1)
    assert decode_image(_encode(".png", RGB), max_pixels=24 * 40).shape == (24, 40, 3)


def test_every_planted_bad_kind_has_its_reason_and_good_ones_decode(tmp_path):
    bad, good = plant_bad_files(tmp_path)
    assert len(bad) == 7
    for path, reason in bad.items():
        with pytest.raises(DecodeError) as e:
            load_image(path, size=16)
        assert e.value.reason.startswith(reason), (path, e.value.reason)
        assert e.value.path == path and path in str(e.value)
    for path in good:
        assert load_image(path, size=16).shape == (16, 16, 3)


def test_missing_file_and_directory_are_reported_not_raised_as_oserror(tmp_path):
    with pytest.raises(DecodeError) as e:
        load_image(str(tmp_path / "nope.png"))
    assert e.value.reason == "missing"
    with pytest.raises(DecodeError) as e:
        load_image(str(tmp_path))
    assert e.value.reason.startswith("unreadable")


def test_uri_paths_are_read_through_pyarrow_fs(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(_encode(".png", RGB[:, :, ::-1].copy()))
    np.testing.assert_array_equal(load_image(p.as_uri()), RGB)
    with pytest.raises(DecodeError) as e:
        load_image((tmp_path / "gone.png").as_uri())
    assert e.value.reason == "missing"


def test_load_image_resizes_to_a_square_and_keeps_size_when_none(tmp_path):
    p = tmp_path / "x.bmp"
    p.write_bytes(_encode(".bmp", RGB[:, :, ::-1].copy()))
    assert load_image(str(p), size=16).shape == (16, 16, 3)
    assert load_image(str(p), size=64).shape == (64, 64, 3)
    assert load_image(str(p)).shape == (24, 40, 3)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".tif", ".bmp"])
def test_mangled_files_only_ever_raise_decode_error(ext):
    """Fuzz: flipped bytes and cut files decode or raise DecodeError, never anything else."""
    data = _encode(ext, RGB)
    rng = np.random.default_rng(0)
    for _ in range(60):
        buf = bytearray(data[: int(rng.integers(1, len(data) + 1))])
        for pos in rng.integers(0, len(buf), int(rng.integers(1, 8))):
            buf[pos] = int(rng.integers(0, 256))
        try:
            out = decode_image(bytes(buf))
            assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8
        except DecodeError as e:
            assert e.reason
