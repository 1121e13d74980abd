"""TensorRT engine build, run, parity and speed: tests marked ``trt`` and ``gpu``.

They need the ``tensorrt`` and ``cuda-python`` packages and a CUDA GPU, and skip with the reason
elsewhere. They have not run in this project's CI or workplace (no such machine there).
"""

from __future__ import annotations

import json

import pytest

from engines.trt_builder import (
    BuildSettings,
    build_plan_from_onnx,
    choose_typing,
    read_timing_cache,
    timing_cache_record_path,
    write_timing_cache,
)
from fatq.errors import FatqError


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
