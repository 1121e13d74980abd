"""TensorRT calibration cache text format, checked against numpy's float32 bit patterns."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.trt_cache import (
    CalibrationCache,
    cache_from_scales,
    format_cache,
    hex_to_scale,
    parse_cache,
    read_cache,
    scale_to_hex,
    scales_from_alphas,
    trt_version_code,
    write_cache,
)
from fatq.errors import FatqError

# Lines in the shape of a cache TensorRT wrote (quoted in public issue threads).
SAMPLE = """TRT-8000-EntropyCalibration
images: 3c010a14
/model.0/conv/Conv_output_0: 3df5587f
(Unnamed Layer* 3) [Activation]_output: 3d9d1c1b
"""


def _bits(value: float) -> str:
    """Independent reference: numpy's float32 bit pattern as 8 hex digits."""
    return f"{int(np.array(value, dtype=np.float32).view(np.uint32)):08x}"


def test_hex_matches_float32_bit_pattern():
    assert scale_to_hex(1 / 127) == "3c010204" == _bits(1 / 127)
    rng = np.random.default_rng(0)
    for value in np.exp(rng.uniform(-20, 5, size=200)).astype(np.float32):
        text = scale_to_hex(float(value))
        assert text == _bits(float(value))
        assert hex_to_scale(text) == float(value)  # exact round trip of float32 values
    assert hex_to_scale("1") == float(np.array([1], dtype=np.uint32).view(np.float32)[0])  # leading zeros dropped


def test_parse_sample():
    cache = parse_cache(SAMPLE.encode())  # TensorRT hands bytes to write_calibration_cache
    assert cache.version == 8000 and cache.algorithm == "EntropyCalibration"
    assert list(cache.scales) == ["images", "/model.0/conv/Conv_output_0", "(Unnamed Layer* 3) [Activation]_output"]
    assert cache.scales["images"] == float(np.array([0x3C010A14], dtype=np.uint32).view(np.float32)[0])
    assert cache.scales["/model.0/conv/Conv_output_0"] == float(
        np.array([0x3DF5587F], dtype=np.uint32).view(np.float32)[0]
    )
    assert cache.dynamic_ranges()["images"] == pytest.approx(127 * cache.scales["images"])
    assert cache.dynamic_ranges()["images"] == pytest.approx(1.0, abs=1e-3)  # a [-1, 1] input


def test_round_trip_through_file(tmp_path):
    scales = {"input": 0.0123, "a: b": 3.5e-4, "layer1.0/Add_output_0": 0.25, "(Unnamed Layer* 7) [Shuffle]": 2.0}
    cache = cache_from_scales(scales, "10.3.0.26")
    assert cache.version == 100300
    path = tmp_path / "calib.cache"
    write_cache(path, cache)
    again = read_cache(path)
    assert again == cache
    assert format_cache(again) == path.read_text()
    for name, value in scales.items():
        assert again.scales[name] == float(np.float32(value))
    assert path.read_text().splitlines()[0] == "TRT-100300-EntropyCalibration2"
    write_cache(path, SAMPLE.encode())  # raw bytes as TensorRT produced them
    assert read_cache(path) == parse_cache(SAMPLE)


def test_version_codes():
    assert trt_version_code("8.6.1") == 8601
    assert trt_version_code("10.0.1.6") == 100001
    assert trt_version_code("10.13.2") == 101302
    with pytest.raises(FatqError):
        trt_version_code("ten")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("TRT8601-EntropyCalibration2\nx: 3c010a14\n", "first line"),
        ("TRT-8601-EntropyCalibration2\nx 3c010a14\n", "line 2"),
        ("TRT-8601-EntropyCalibration2\nx: 3c010a14\ny: zz\n", "line 3"),
        ("TRT-8601-EntropyCalibration2\n: 3c010a14\n", "line 2"),
    ],
)
def test_malformed_caches(text, match):
    with pytest.raises(FatqError, match=match):
        parse_cache(text)


def test_invalid_scales_and_paths(tmp_path):
    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e40):
        with pytest.raises(FatqError):
            cache_from_scales({"x": bad}, 8601)
    with pytest.raises(FatqError, match="algorithm"):
        format_cache(CalibrationCache(8601, "Percentile", {"x": 1.0}))
    with pytest.raises(FatqError, match="does not exist"):
        read_cache(tmp_path / "none.cache")
    with pytest.raises(FatqError, match="does not exist"):
        write_cache(tmp_path / "no" / "x.cache", cache_from_scales({"x": 1.0}, 8601))


def test_scales_from_alphas():
    assert scales_from_alphas({"input": 2.54, "relu": 127.0}) == {"input": 0.02, "relu": 1.0}
