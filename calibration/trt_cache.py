"""TensorRT's INT8 calibration cache (text) <-> per-tensor Q/DQ scales.

The cache that ``IInt8Calibrator.write_calibration_cache`` receives, and that
``read_calibration_cache`` may hand back to skip calibration, is plain text::

    TRT-8601-EntropyCalibration2
    input: 3c010a14
    /conv1/Conv_output_0: 3d9d1c1b

The first line is ``TRT-<version code>-<algorithm>``; every other line is
``<tensor name>: <hex>`` where ``<hex>`` is the IEEE-754 float32 bit pattern of the tensor's
int8 scale written as one big-endian hexadecimal number (0x3c010a14 = 0.0078759, about
1/127: an input with dynamic range [-1, 1]). TensorRT's dynamic range of a tensor is 127 * scale.
Tensor names may themselves contain ": ", so a line splits at its last one.

The version code is TensorRT's ``NV_TENSORRT_VERSION``: major*1000 + minor*100 + patch up to 8.x
(8.6.1 -> 8601) and major*10000 + minor*100 + patch from 10.0 (10.3.0 -> 100300). TensorRT
ignores a cache whose code differs from its own. The 10.x rule is taken from the public
headers and is checked against a real TensorRT only by ``tests/calibration/test_trt_calibrator.py``
(marked ``trt``).
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from fatq.errors import FatqError
from fatq.io import write_bytes_atomic

INT8_MAX = 127
ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")


@dataclass
class CalibrationCache:
    """Contents of a TensorRT calibration cache.

    Attributes:
        version: TensorRT version code (e.g. 8601 for 8.6.1).
        algorithm: e.g. "EntropyCalibration2".
        scales: {tensor name: int8 scale (float32 value, > 0)} in file order.
    """

    version: int
    algorithm: str = "EntropyCalibration2"
    scales: dict[str, float] = field(default_factory=dict)

    def dynamic_ranges(self) -> dict[str, float]:
        """{tensor: 127 * scale}, the symmetric range TensorRT clips each tensor to."""
        return {name: INT8_MAX * scale for name, scale in self.scales.items()}


def trt_version_code(version: str) -> int:
    """TensorRT's version code of a version string such as "8.6.1" or "10.3.0.26"."""
    match = re.match(r"^(\d+)\.(\d+)\.(\d+)", version)
    if match is None:
        raise FatqError(f"cannot read a TensorRT version from {version!r}.")
    major, minor, patch = (int(g) for g in match.groups())
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def scale_to_hex(scale: float) -> str:
    """float32 bit pattern of ``scale`` as 8 lowercase hex digits (big-endian)."""
    try:
        return struct.pack(">f", scale).hex()
    except OverflowError:
        raise FatqError(f"scale {scale} does not fit a float32.") from None


def hex_to_scale(text: str) -> float:
    """Inverse of :func:`scale_to_hex`; accepts fewer than 8 digits (leading zeros dropped)."""
    if not re.fullmatch(r"[0-9a-fA-F]{1,8}", text):
        raise ValueError(text)
    return struct.unpack(">f", bytes.fromhex(text.rjust(8, "0")))[0]


def parse_cache(text: str | bytes) -> CalibrationCache:
    """Parse cache text (or the bytes TensorRT passes to ``write_calibration_cache``)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise FatqError("the calibration cache is empty.")
    header = _HEADER.match(lines[0])
    if header is None:
        raise FatqError(
            f"not a TensorRT calibration cache: first line {lines[0][:60]!r} is not TRT-<version>-<algorithm>."
        )
    cache = CalibrationCache(version=int(header.group(1)), algorithm=header.group(2))
    for number, line in enumerate(lines[1:], start=2):
        name, sep, value = line.rpartition(": ")
        try:
            if not sep or not name:
                raise ValueError(line)
            scale = hex_to_scale(value)
        except ValueError:
            raise FatqError(f"calibration cache line {number} is not '<tensor>: <hex scale>': {line[:80]!r}.") from None
        cache.scales[name] = scale
    return cache


def format_cache(cache: CalibrationCache) -> str:
    """Cache text, one ``name: hex`` line per tensor, ending with a newline."""
    if cache.algorithm not in ALGORITHMS:
        raise FatqError(f"unknown calibration algorithm {cache.algorithm!r}; use one of {', '.join(ALGORITHMS)}.")
    lines = [f"TRT-{cache.version}-{cache.algorithm}"]
    for name, scale in cache.scales.items():
        if "\n" in name or not name:
            raise FatqError(f"tensor name {name!r} cannot be written to a calibration cache.")
        if not (math.isfinite(scale) and scale > 0):
            raise FatqError(f"scale of {name} must be finite and positive, got {scale}.")
        lines.append(f"{name}: {scale_to_hex(scale)}")
    return "\n".join(lines) + "\n"


def read_cache(path: str | Path) -> CalibrationCache:
    """Read a cache file."""
    path = Path(path)
    if not path.is_file():
        raise FatqError(f"calibration cache {path} does not exist.")
    return parse_cache(path.read_bytes())


def write_cache(path: str | Path, cache: CalibrationCache | bytes) -> None:
    """Write a cache (a :class:`CalibrationCache` or TensorRT's raw bytes) atomically."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FatqError(f"directory {path.parent} for the calibration cache does not exist.")
    data = cache if isinstance(cache, bytes) else format_cache(cache).encode("utf-8")
    write_bytes_atomic(path, data)


def cache_from_scales(
    scales: dict[str, float], version: int | str, algorithm: str = "EntropyCalibration2"
) -> CalibrationCache:
    """A cache holding Q/DQ ``scales`` ({tensor: int8 scale}) for TensorRT ``version`` (code or string).

    Scales are rounded to float32, as the cache stores them.
    """
    code = trt_version_code(version) if isinstance(version, str) else int(version)
    rounded = {name: hex_to_scale(scale_to_hex(float(s))) for name, s in scales.items()}
    cache = CalibrationCache(version=code, algorithm=algorithm, scales=rounded)
    format_cache(cache)  # validates names, scales and algorithm now rather than at write time
    return cache


def scales_from_alphas(alphas: dict[str, float]) -> dict[str, float]:
    """int8 scales alpha / 127 of clipping thresholds (TensorRT's implicit INT8 is 8-bit only)."""
    return {name: float(alpha) / INT8_MAX for name, alpha in alphas.items()}
