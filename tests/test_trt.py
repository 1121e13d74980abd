"""TensorRT: pure build logic everywhere; engine build, run, parity and speed where TensorRT and a GPU exist.

The tests marked ``trt`` need the ``tensorrt`` and ``cuda-python`` packages and a CUDA GPU; they
skip with the reason elsewhere. They were not run in this project's CI (no such machine there).
"""

from __future__ import annotations

import json

import pytest

from engines.host import GpuInfo
from engines.trt_builder import (
    BuildSettings,
    builder_flags,
    choose_typing,
    read_sidecar,
    sidecar_mismatches,
)
from fatq.errors import FatqError

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
