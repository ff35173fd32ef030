"""TensorRT legacy calibration cache: format by hand, round trip, errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from cunet_optimize.errors import CUNetError
from cunet_optimize.quant import LegacyCacheError, format_legacy_cache, read_legacy_cache, write_legacy_cache
from cunet_optimize.quant.legacy_cache import hex_to_scale, scale_to_hex, trt_version_number


def test_hex_is_big_endian_float32_checked_by_hand():
    assert scale_to_hex(1.0) == "3f800000"
    assert scale_to_hex(0.5) == "3f000000"
    assert scale_to_hex(-2.0) == "c0000000"
    assert scale_to_hex(1 / 127) == struct.pack(">f", np.float32(1 / 127)).hex()
    assert hex_to_scale("3f800000") == 1.0


def test_file_layout_header_then_sorted_tensors():
    text = format_legacy_cache({"b": 1.0, "a:0": 0.5}, version="10.3.0")
    assert text == "TRT-100300-EntropyCalibration2\na:0: 3f000000\nb: 3f800000\n"


def test_round_trip_gives_identical_float32_scales(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.uniform(1e-4, 1.0, 50)
    scales = {f"/hg/down_blocks.{i}/Concat_output_0": float(np.float32(s)) for i, s in enumerate(values)}
    scales["input"] = 1 / 127  # not a float32: written as its float32 rounding
    path = write_legacy_cache(tmp_path / "calib" / "model.cache", scales, version=100300)
    cache = read_legacy_cache(path)
    assert (cache.version, cache.algorithm) == (100300, "EntropyCalibration2")
    assert set(cache.scales) == set(scales)
    for name, value in scales.items():
        assert np.float32(cache.scales[name]) == np.float32(value)
    assert not list((tmp_path / "calib").glob(".*"))  # no temp file left behind


@pytest.mark.parametrize(
    "given,number", [("10.3.0", 100300), ("10.3", 100300), (100300, 100300), ("8.6.1", 8601), ("100300", 100300)]
)
def test_version_numbers(given, number):
    assert trt_version_number(given) == number
    assert format_legacy_cache({"x": 1.0}, version=given).startswith(f"TRT-{number}-EntropyCalibration2\n")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not a header\nx: 3f800000\n",
        "TRT-100300-EntropyCalibration2\nx 3f800000\n",
        "TRT-100300-EntropyCalibration2\nx: 3f8000\n",
    ],
)
def test_malformed_caches_are_user_errors(tmp_path, text):
    path = tmp_path / "bad.cache"
    path.write_text(text)
    with pytest.raises(LegacyCacheError) as err:
        read_legacy_cache(path)
    assert isinstance(err.value, CUNetError) and str(path) in str(err.value)


def test_rejects_scales_tensorrt_cannot_use():
    with pytest.raises(LegacyCacheError, match="positive"):
        format_legacy_cache({"x": 0.0})
    with pytest.raises(LegacyCacheError, match="algorithm"):
        format_legacy_cache({"x": 1.0}, algorithm="Magic")
