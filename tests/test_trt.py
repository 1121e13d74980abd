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


# ----------------------------------------------------------------------------- TensorRT and a GPU (marker trt)
def _require_tensorrt():
    try:
        import tensorrt
    except ImportError:
        pytest.skip("tensorrt is not installed (pip install 'fatq[trt]'); these tests need it and a CUDA GPU")
    from engines.host import gpu_info

    if gpu_info() is None:
        pytest.skip("no CUDA GPU is visible (cuda-python and an NVIDIA driver are needed)")
    return tensorrt


@pytest.fixture(scope="module")
def trt_models(tmp_path_factory):
    """A W8A8 resnet20 checkpoint, its QDQ export and its onnx-fp32 twin."""
    _require_tensorrt()
    from engine_helpers import export_fp32_twin, export_qdq_onnx, save_resnet_checkpoint

    root = tmp_path_factory.mktemp("trt")
    model = save_resnet_checkpoint(root / "w8.pt", bits=8, seed=0)  # large classifier margins (see test_gate)
    return root / "w8.pt", export_qdq_onnx(model, root / "w8.onnx"), export_fp32_twin(model, root / "w8-fp32.onnx")


def _random_inputs(count: int):
    import numpy as np

    return np.random.default_rng(0).normal(size=(count, 3, 32, 32)).astype(np.float32)


@pytest.mark.gpu
@pytest.mark.trt
def test_int8_engine_builds_runs_and_agrees_with_the_model(trt_models, tmp_path):
    import numpy as np

    from engines.torch_runner import TorchRunner
    from engines.trt_builder import build_engine
    from engines.trt_runner import TrtRunner
    from fatq.metrics import agreement

    ckpt, int8, _ = trt_models
    plan = tmp_path / "w8.plan"
    sidecar = build_engine(int8, plan, BuildSettings("int8", opt_batch=64, max_batch=64))
    assert sidecar["typing"] == "strong" and sidecar["precision"] == "int8" and plan.is_file()
    assert json.loads((tmp_path / "w8.plan.json").read_text())["plan_sha256"] == sidecar["plan_sha256"]
    x = _random_inputs(256)
    with TrtRunner(plan) as runner, TorchRunner.from_checkpoint(ckpt, threads=1) as reference:
        assert runner.max_batch() == 64
        logits = np.concatenate([runner.infer({"input": x[i : i + 64]})["logits"] for i in range(0, 256, 64)])
        timing = runner.last_timing()
        assert set(timing) == {"h2d_ms", "engine_ms", "d2h_ms"} and timing["engine_ms"] > 0
        assert runner.memory_bytes() > 0
        expected = reference.infer({"input": x})["logits"]
    assert agreement(logits, expected).top1_agreement_pct >= 99.9


@pytest.mark.gpu
@pytest.mark.trt
def test_int8_engine_is_faster_than_fp16_at_batch_64(trt_models, tmp_path):
    import tensorrt

    from engines.timing import time_interleaved
    from engines.trt_builder import build_engine
    from engines.trt_runner import TrtRunner

    _, int8, fp32 = trt_models
    try:
        choose_typing(tensorrt.__version__, "fp16", "fp32")
    except FatqError as exc:
        pytest.skip(f"no fp16 engine from an fp32 graph on TensorRT {tensorrt.__version__}: {exc}")
    build_engine(int8, tmp_path / "int8.plan", BuildSettings("int8", opt_batch=64, max_batch=64))
    build_engine(fp32, tmp_path / "fp16.plan", BuildSettings("fp16", opt_batch=64, max_batch=64))
    feeds = {"input": _random_inputs(64)}
    with TrtRunner(tmp_path / "int8.plan") as a, TrtRunner(tmp_path / "fp16.plan") as b:
        results = time_interleaved({"int8": a, "fp16": b}, {"int8": feeds, "fp16": feeds}, 64, 20, 200)
    assert results["int8"].source == "cuda-events"
    assert results["int8"].latency.median < results["fp16"].latency.median


@pytest.mark.gpu
@pytest.mark.trt
def test_plan_from_another_tensorrt_is_refused(trt_models, tmp_path):
    from engines.trt_builder import build_engine
    from engines.trt_runner import TrtRunner

    _, int8, _ = trt_models
    plan = tmp_path / "m.plan"
    build_engine(int8, plan, BuildSettings("int8", opt_batch=8, max_batch=8))
    sidecar_path = tmp_path / "m.plan.json"
    sidecar = json.loads(sidecar_path.read_text())
    sidecar_path.write_text(json.dumps({**sidecar, "tensorrt_version": "9.0.0"}))
    with pytest.raises(FatqError, match="refusing m.plan: built with TensorRT 9.0.0"):
        TrtRunner(plan).activate()


@pytest.mark.gpu
@pytest.mark.trt
def test_parser_errors_name_the_node(tmp_path):
    _require_tensorrt()
    import onnx
    from onnx import TensorProto, helper

    from engines.trt_builder import build_engine

    node = helper.make_node("Mystery", ["input"], ["output"], name="the_unknown_op", domain="com.example")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3, 8, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(FatqError, match="the_unknown_op"):
        build_engine(tmp_path / "bad.onnx", tmp_path / "bad.plan", BuildSettings("fp32", opt_batch=1, max_batch=1))
    assert not (tmp_path / "bad.plan").exists()


@pytest.mark.gpu
@pytest.mark.trt
def test_fatq_bench_on_tensorrt_reports_engine_time_and_transfers(trt_models, tmp_path):
    from engines.cli import main

    ckpt, int8, _ = trt_models
    out = tmp_path / "trt.json"
    argv = [str(int8), "--engine", "trt", "--engine", "ort", "--reference", str(ckpt), "--min-agreement", "99.9",
            "--batch-sizes", "1,64", "--warmup", "5", "--iterations", "20", "--threads", "2", "--json", str(out),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    trt_runs = [r for r in report["runs"] if r["engine"] == "trt"]
    assert [r["batch_size"] for r in trt_runs] == [1, 64]
    assert all(r["latency_source"] == "cuda-events" and set(r["transfer_ms"]) == {"h2d", "d2h"} for r in trt_runs)
    assert report["configs"][0]["options"]["typing"] == "strong"


def _float_bias_qdq_onnx(path):
    """A one-conv Q/DQ graph in the TensorRT form (int8 Q/DQ, float32 bias, opset 20, dynamic batch)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = 8
    inits = [
        numpy_helper.from_array(np.float32(0.05), "s"),
        numpy_helper.from_array(np.int8(0), "z"),
        numpy_helper.from_array(np.random.default_rng(0).integers(-7, 8, (c, 3, 3, 3)).astype(np.int8), "w"),
        numpy_helper.from_array(np.full(c, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(c, np.int8), "wz"),
        numpy_helper.from_array(np.linspace(-1, 1, c).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"], name="dq"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="dq_w", axis=0),
        helper.make_node("Conv", ["x", "wd", "b"], ["logits"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", c, 8, 8])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9), str(path))
    return path


@pytest.mark.trt
def test_stale_or_foreign_timing_cache_is_replaced_by_a_fresh_one(tmp_path):
    tensorrt = _require_tensorrt()
    from engines.host import gpu_info
    from engines.trt_builder import build_engine

    onnx_path = _float_bias_qdq_onnx(tmp_path / "tiny.onnx")
    gpu = gpu_info()
    cache = tmp_path / "timing.cache"
    settings = BuildSettings("int8", opt_batch=4, max_batch=4, timing_cache=str(cache))
    write_timing_cache(cache, b"\x00garbage, not a timing cache", tensorrt.__version__, gpu.compute_capability)
    build_engine(onnx_path, tmp_path / "a.plan", settings)  # bytes TensorRT cannot use: the build still succeeds
    assert read_timing_cache(cache, tensorrt.__version__, gpu.compute_capability).data  # and leaves a real cache
    write_timing_cache(cache, cache.read_bytes(), "9.9.9", gpu.compute_capability)  # recorded as another version
    sidecar = build_engine(onnx_path, tmp_path / "b.plan", settings)
    assert any("written by TensorRT 9.9.9" in note for note in sidecar["notes"])
    assert json.loads(timing_cache_record_path(cache).read_text())["tensorrt_version"] == tensorrt.__version__
    sidecar = build_engine(onnx_path, tmp_path / "c.plan", settings)  # now its own cache: used, no note
    assert sidecar["notes"] == []


@pytest.mark.trt
def test_weak_typing_of_a_qdq_graph_warns_in_the_sidecar(tmp_path):
    tensorrt = _require_tensorrt()
    from engines.trt_builder import build_engine, major_version

    if major_version(tensorrt.__version__) >= 11:
        pytest.skip(f"TensorRT {tensorrt.__version__} has no weak typing")
    onnx_path = _float_bias_qdq_onnx(tmp_path / "tiny.onnx")
    settings = BuildSettings("int8", opt_batch=4, max_batch=4, typing="weak", timing_cache=str(tmp_path / "t.cache"))
    sidecar = build_engine(onnx_path, tmp_path / "w.plan", settings)
    assert sidecar["typing"] == "weak" and sidecar["builder_flags"] == ["INT8", "FP16"]
    assert any("deprecated since TensorRT 10.12" in note for note in sidecar["notes"])


@pytest.mark.trt
def test_build_plan_from_onnx_lints_before_building(tmp_path):
    _require_tensorrt()
    from engine_helpers import export_qdq_onnx, save_resnet_checkpoint

    todays = export_qdq_onnx(save_resnet_checkpoint(tmp_path / "w8.pt", bits=8, seed=0), tmp_path / "w8.onnx")
    with pytest.raises(FatqError, match=r"breaks the TensorRT rules: \[trt-dq-input-int8\]"):
        build_plan_from_onnx(todays, tmp_path / "w8.plan", BuildSettings("int8", opt_batch=4, max_batch=4))
    assert not (tmp_path / "w8.plan").exists()
    tiny = _float_bias_qdq_onnx(tmp_path / "tiny.onnx")
    settings = BuildSettings("int8", opt_batch=4, max_batch=4, timing_cache=str(tmp_path / "t.cache"))
    sidecar = build_plan_from_onnx(tiny, tmp_path / "tiny.plan", settings)
    assert sidecar["typing"] == "strong" and (tmp_path / "tiny.plan").is_file()
