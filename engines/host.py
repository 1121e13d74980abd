"""Names of the processor and GPU a run used, for reports (no engine imports at module level)."""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux), or the platform's processor string."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (the ``flags`` line of /proc/cpuinfo); empty where there is none."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def int8_flags_summary(flags: tuple[str, ...] = ("avx512_vnni", "amx_int8", "avx512_bf16")) -> str:
    """ "avx512_vnni yes, amx_int8 no, ...": the CPU features that change the engines' int8 and bf16
    kernels, printed with every performance or parity table."""
    have = cpu_flags()
    return ", ".join(f"{flag} {'yes' if flag in have else 'no'}" for flag in flags)


def saturating_u8s8() -> bool:
    """Whether ONNX Runtime's uint8 x int8 kernels saturate here: an x86 CPU with AVX2 but no VNNI.

    Without VNNI, MLAS multiplies u8 x s8 with ``vpmaddubsw``, whose int16 sum of two products
    saturates once 2 * 255 * |w| > 32767 (|w| >= 65, e.g. an 8-bit stem conv or classifier); VNNI's
    ``vpdpbusd`` accumulates in int32. Measured on an AMD EPYC (AVX2 only) with ONNX Runtime 1.32:
    a QGemm with 8-bit weights off by up to ~6e4 accumulator steps (tests/engines/test_ort_int32_bias.py).
    """
    flags = cpu_flags()
    return "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni"}


def cpu_device() -> str:
    """Device string of a CPU run, e.g. ``"CPU (AMD EPYC 9R14)"``."""
    return f"CPU ({cpu_name()})"


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device: name and compute capability "major.minor"."""

    index: int
    name: str
    compute_capability: str

    def describe(self) -> str:
        return f"{self.name} (sm_{self.compute_capability.replace('.', '')})"


def gpu_info(index: int = 0) -> GpuInfo | None:
    """Properties of CUDA device ``index`` through cuda-python, or None without a usable GPU.

    Returns None when cuda-python is not installed, no driver is loaded or the device does not
    exist: callers decide whether that is an error.
    """
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    err, props = cudart.cudaGetDeviceProperties(index)
    if err != cudart.cudaError_t.cudaSuccess:
        return None
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(index, name, f"{props.major}.{props.minor}")
