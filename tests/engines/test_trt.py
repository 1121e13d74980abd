"""TensorRT: the pure build logic (typing, flags, settings, sidecars, timing caches, refusals); runs everywhere.

Engine build, run, parity and speed, which need TensorRT and a GPU, are in tests/gpu/test_trt_gpu.py.
"""

from __future__ import annotations

import json

import pytest

from engines.host import GpuInfo
from engines.trt_builder import (
    BuildSettings,
    build_plan_from_onnx,
    builder_flags,
    choose_typing,
    read_sidecar,
    read_timing_cache,
    sidecar_mismatches,
    timing_cache_path,
    timing_cache_record_path,
    typing_warning,
    write_timing_cache,
)
from fatq.errors import FatqError, MissingExtraError

H200 = GpuInfo(0, "NVIDIA H200", "9.0")


# ----------------------------------------------------------------------------- pure logic (runs everywhere)
@pytest.mark.parametrize(
    ("version", "precision", "graph", "requested", "expected"),
    [
        ("10.14.1", "int8", "int8", "auto", "strong"),
        ("10.14.1", "int8", "int8", "weak", "weak"),
        ("10.14.1", "fp32", "fp32", "auto", "strong"),
        ("10.14.1", "fp16", "fp32", "auto", "weak"),  # fp16 from an fp32 graph needs the FP16 flag
        ("10.14.1", "fp16", "fp16", "auto", "strong"),
        ("11.2.0", "int8", "int8", "auto", "strong"),
        ("11.2.0", "fp32", "fp32", "strong", "strong"),
    ],
)
def test_typing_choice(version, precision, graph, requested, expected):
    assert choose_typing(version, precision, graph, requested) == expected


def test_legacy_calibration_typing():
    assert choose_typing("10.14.1", "int8", "fp32", calibrated=True) == "weak"
    with pytest.raises(FatqError, match="no implicit INT8 calibration"):
        choose_typing("11.0.0", "int8", "fp32", calibrated=True)
    with pytest.raises(FatqError, match="from an fp32 graph"):
        choose_typing("10.14.1", "int8", "int8", calibrated=True)


@pytest.mark.parametrize(
    ("version", "precision", "graph", "requested", "message"),
    [
        ("11.0.0", "fp16", "fp32", "auto", "ModelOpt AutoCast"),  # weak typing removed in 11
        ("11.0.0", "int8", "int8", "weak", "no weak typing"),
        ("10.14.1", "int8", "fp32", "auto", "needs a QDQ graph"),
        ("10.14.1", "fp32", "int8", "auto", "builds an int8 engine"),
        ("10.14.1", "fp16", "fp32", "strong", "--trt-typing weak"),
    ],
)
def test_typing_refusals(version, precision, graph, requested, message):
    with pytest.raises(FatqError, match=message):
        choose_typing(version, precision, graph, requested)


def test_builder_flags():
    assert builder_flags("strong", "int8") == []  # precision comes from the graph's types
    assert builder_flags("weak", "int8") == ["INT8", "FP16"]
    assert builder_flags("weak", "fp16") == ["FP16"]
    assert builder_flags("weak", "fp32") == []


def test_build_settings_validation():
    with pytest.raises(FatqError, match="min <= opt <= max"):
        BuildSettings("int8", min_batch=8, opt_batch=4, max_batch=64)
    with pytest.raises(FatqError, match="precision"):
        BuildSettings("int4")
    with pytest.raises(FatqError, match="typing"):
        BuildSettings("int8", typing="loose")


def _sidecar(**overrides) -> dict:
    sidecar = {
        "format": "fatq-trt-plan",
        "tensorrt_version": "10.14.1",
        "gpu_name": "NVIDIA H200",
        "compute_capability": "9.0",
        "plan_sha256": "ab" * 32,
    }
    return {**sidecar, **overrides}


def test_sidecar_mismatches_name_every_difference():
    assert sidecar_mismatches(_sidecar(), "10.14.1", H200, "ab" * 32) == []
    problems = sidecar_mismatches(
        _sidecar(tensorrt_version="10.8.0", gpu_name="NVIDIA A100", compute_capability="8.0"),
        "10.14.1",
        H200,
        "cd" * 32,
    )
    assert problems == [
        "built with TensorRT 10.8.0, running 10.14.1",
        "built for compute capability 8.0, this GPU has 9.0",
        "built on NVIDIA A100, this GPU is NVIDIA H200",
        "the plan file changed after its sidecar was written",
    ]


def test_read_sidecar_errors(tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"plan")
    with pytest.raises(FatqError, match="has no sidecar"):
        read_sidecar(plan)
    (tmp_path / "m.plan.json").write_text("{not json")
    with pytest.raises(FatqError, match="not readable JSON"):
        read_sidecar(plan)
    (tmp_path / "m.plan.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(FatqError, match="not a fatq TensorRT sidecar"):
        read_sidecar(plan)
    (tmp_path / "m.plan.json").write_text(json.dumps(_sidecar()))
    assert read_sidecar(plan)["compute_capability"] == "9.0"


def test_weak_typing_warns_and_strong_typing_does_not():
    assert typing_warning("10.14.1", "strong", "int8") is None
    qdq = typing_warning("10.14.1", "weak", "int8")
    assert "Q/DQ graph" in qdq and "deprecated since TensorRT 10.12 and removed in 11" in qdq
    assert "--trt-typing strong" in qdq
    assert "AutoCast" in typing_warning("10.14.1", "weak", "fp32")
    assert "deprecated since 10.1" in typing_warning("10.14.1", "weak", "fp32", calibrated=True)


def test_timing_cache_file_is_keyed_by_tensorrt_version_and_compute_capability(tmp_path):
    path = timing_cache_path("10.14.1.48", "9.0", tmp_path)
    assert path == tmp_path / "timing-trt10.14.1.48-sm90.cache"
    others = {timing_cache_path(v, cc, tmp_path) for v, cc in [("10.14.1.48", "8.9"), ("10.15.1", "9.0")]}
    assert path not in others and len(others) == 2


def test_timing_cache_round_trip_and_every_reason_to_start_fresh(tmp_path):
    path = tmp_path / "timing.cache"
    assert (
        read_timing_cache(path, "10.14.1", "9.0").data == b"" and read_timing_cache(path, "10.14.1", "9.0").note is None
    )
    write_timing_cache(path, b"\x01cache-bytes", "10.14.1", "9.0")
    assert read_timing_cache(path, "10.14.1", "9.0").data == b"\x01cache-bytes"
    assert read_timing_cache(path, "10.14.1", "9.0").note is None
    other_version = read_timing_cache(path, "10.15.1", "9.0")
    assert other_version.data == b""
    assert other_version.note == (
        "timing.cache was written by TensorRT 10.14.1 for compute capability 9.0, this is TensorRT 10.15.1 on 9.0; "
        "starting a fresh timing cache"
    )
    other_gpu = read_timing_cache(path, "10.14.1", "8.0")
    assert other_gpu.data == b"" and "compute capability 9.0" in other_gpu.note and "on 8.0" in other_gpu.note
    record = timing_cache_record_path(path)
    record.write_text("{broken")
    assert read_timing_cache(path, "10.14.1", "9.0").data == b""
    assert "not readable JSON" in read_timing_cache(path, "10.14.1", "9.0").note
    record.write_text(json.dumps({"format": "other"}))
    assert "not a fatq timing-cache record" in read_timing_cache(path, "10.14.1", "9.0").note
    record.unlink()  # a cache from before the records existed (or copied without one)
    assert read_timing_cache(path, "10.14.1", "9.0").data == b""
    assert "has no timing.cache.json" in read_timing_cache(path, "10.14.1", "9.0").note


def test_build_plan_from_onnx_refusals_without_tensorrt(tmp_path):
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"not read before the checks below")
    with pytest.raises(FatqError, match="must end in .plan or .engine, got m.onnx"):
        build_plan_from_onnx(onnx_path, tmp_path / "m.onnx", BuildSettings("int8"))
    with pytest.raises(FatqError, match="directory .*missing does not exist"):
        build_plan_from_onnx(onnx_path, tmp_path / "missing" / "m.plan", BuildSettings("int8"))
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(
            MissingExtraError, match=r"tensorrt is not installed; install it with `pip install 'fatq\[trt\]'`"
        ):
            build_plan_from_onnx(onnx_path, tmp_path / "m.plan", BuildSettings("int8"))
        assert not (tmp_path / "m.plan").exists() and not (tmp_path / "m.plan.json").exists()
    else:
        pytest.skip("tensorrt is installed here; the refusal without it is not reachable")
