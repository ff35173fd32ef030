"""TensorRT <= 10 calibration cache (implicit quantization): a legacy by-product.

The primary artifact of a quantized model is the Q/DQ ONNX (TensorRT 11 has no
calibrators or caches). The cache format, as TensorRT's IInt8EntropyCalibrator2
writes it::

    TRT-100300-EntropyCalibration2
    input: 3c010204
    /features/conv0/Conv_output_0: 3d7a5c3e

Line 1 names the TensorRT version (major*10000 + minor*100 + patch) and the
algorithm; then one line per ONNX tensor: its name, ': ', and 8 hex digits of the
big-endian IEEE-754 float32 scale (= amax / 127). Names are ONNX tensor names: the
export stage maps quantizer names to them before writing.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cunet_optimize.atomic import write_atomic
from cunet_optimize.errors import CUNetError

DEFAULT_TRT_VERSION = 100300  # TensorRT 10.3.0: JetPack 6.x
DEFAULT_ALGORITHM = "EntropyCalibration2"
ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")


class LegacyCacheError(CUNetError):
    """A calibration cache that cannot be written or parsed."""


@dataclass(frozen=True)
class LegacyCache:
    version: int  # e.g. 100300 for TensorRT 10.3.0
    algorithm: str
    scales: dict[str, float]  # ONNX tensor name -> float32 scale


def trt_version_number(version: int | str) -> int:
    """10.3.0 / "10.3" / 100300 -> 100300 (NV_TENSORRT_VERSION: major*10000 + minor*100
    + patch since TensorRT 10; major*1000 + minor*100 + patch before, e.g. 8.6.1 -> 8601)."""
    if isinstance(version, int):
        number = version
    else:
        text = str(version).strip()
        if text.isdigit():
            number = int(text)
        else:
            m = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?(?:\.\d+)?", text)
            if not m:
                raise LegacyCacheError(f"TensorRT version '{version}': use e.g. 10.3.0 or 100300")
            major, minor, patch = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
            number = major * (10000 if major >= 10 else 1000) + minor * 100 + patch
    if number < 1000:
        raise LegacyCacheError(f"TensorRT version {version}: too small; use e.g. 10.3.0 or 100300")
    return number


def scale_to_hex(scale: float) -> str:
    """8 hex digits of the big-endian float32: 1.0 -> '3f800000'."""
    return struct.pack(">f", scale).hex()


def hex_to_scale(text: str) -> float:
    if not re.fullmatch(r"[0-9a-fA-F]{8}", text):
        raise LegacyCacheError(f"'{text}' is not 8 hex digits of a float32")
    return struct.unpack(">f", bytes.fromhex(text))[0]


def format_legacy_cache(
    scales: Mapping[str, float], version: int | str = DEFAULT_TRT_VERSION, algorithm: str = DEFAULT_ALGORITHM
) -> str:
    """The cache text; tensors sorted by name so equal inputs give equal bytes."""
    if algorithm not in ALGORITHMS:
        raise LegacyCacheError(f"calibration algorithm '{algorithm}' not in {ALGORITHMS}")
    lines = [f"TRT-{trt_version_number(version)}-{algorithm}"]
    for name in sorted(scales):
        value = float(scales[name])
        if not name or "\n" in name:
            raise LegacyCacheError(f"tensor name {name!r} cannot be written in a calibration cache")
        if not math.isfinite(value) or value <= 0:
            raise LegacyCacheError(f"tensor '{name}': scale {value} must be positive and finite")
        lines.append(f"{name}: {scale_to_hex(value)}")
    return "\n".join(lines) + "\n"


def parse_legacy_cache(text: str, source: str = "calibration cache") -> LegacyCache:
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise LegacyCacheError(f"{source}: empty file")
    m = re.fullmatch(r"TRT-(\d+)-(\w+)", lines[0].strip())
    if not m:
        raise LegacyCacheError(f"{source}: first line '{lines[0]}' is not a TRT-<version>-<algorithm> header")
    scales: dict[str, float] = {}
    for n, line in enumerate(lines[1:], start=2):
        name, sep, value = line.rstrip().rpartition(": ")
        if not sep or not name:
            raise LegacyCacheError(f"{source}: line {n} '{line}' is not 'tensor_name: xxxxxxxx'")
        try:
            scales[name] = hex_to_scale(value.strip())
        except LegacyCacheError as e:
            raise LegacyCacheError(f"{source}: line {n}: {e}") from None
    return LegacyCache(version=int(m.group(1)), algorithm=m.group(2), scales=scales)


def write_legacy_cache(
    path: str | os.PathLike,
    scales: Mapping[str, float],
    version: int | str = DEFAULT_TRT_VERSION,
    algorithm: str = DEFAULT_ALGORITHM,
) -> Path:
    """Write {ONNX tensor name: scale} as a TensorRT legacy calibration cache (atomically)."""
    path = Path(path)
    text = format_legacy_cache(scales, version, algorithm)
    return write_atomic(path, text)


def read_legacy_cache(path: str | os.PathLike) -> LegacyCache:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LegacyCacheError(f"{path}: no such calibration cache") from None
    except UnicodeDecodeError:
        raise LegacyCacheError(f"{path}: not a text calibration cache") from None
    return parse_legacy_cache(text, source=str(path))
