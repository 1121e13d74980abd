"""Runners on tiny models against independent references (torch for float graphs, numpy for QDQ)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from engine_helpers import (
    OPENVINO_INT8_NOT_EXACT_HERE,
    export_float_onnx,
    export_qdq_onnx,
    make_qdq_conv,
    openvino_int8_exact_here,
    qdq_reference,
    save_resnet_checkpoint,
    tiny_float_cnn,
)

from engines.model_files import CHECKPOINT, ONNX, TRT_PLAN, detect_model_kind, inspect_model
from engines.openvino_runner import OpenVinoRunner
from engines.ort_runner import OrtRunner
from engines.runner import TensorMeta
from engines.timing import LatencyStats, time_interleaved
from engines.torch_runner import TorchRunner
from fatq.errors import FatqError, MissingExtraError
from fatq.metrics import agreement


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("float") / "tiny.onnx"
    model = tiny_float_cnn()
    export_float_onnx(model, path, (3, 8, 8))
    return path, model


@pytest.fixture(scope="module")
def qdq_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("qdq") / "qdq.onnx"
    return path, make_qdq_conv(path)


def _inputs(batch: int, shape=(3, 8, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *shape)).astype(np.float32)


@pytest.mark.parametrize("runner_cls", [OrtRunner, OpenVinoRunner])
def test_float_graph_matches_torch(float_onnx, runner_cls):
    path, model = float_onnx
    with runner_cls(path, threads=1) as runner:
        meta = runner.input_metadata()
        assert list(meta) == ["input"]
        assert meta["input"].dtype == np.float32 and meta["input"].sample_shape() == (3, 8, 8)
        for batch in (1, 5):  # dynamic batch axis
            x = _inputs(batch, seed=batch)
            (out,) = runner.infer({"input": x}).values()
            expected = model(torch.from_numpy(x)).detach().numpy()
            np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
        info = runner.info()
        assert info.precision == "fp32" and info.threads == 1


@pytest.mark.parametrize("runner_cls", [OrtRunner, OpenVinoRunner])
def test_qdq_graph_matches_numpy_integer_reference(qdq_onnx, runner_cls):
    path, params = qdq_onnx
    # Inputs spread over the int8 range (and beyond, to exercise saturation at -128/127).
    x = np.random.default_rng(1).uniform(-7.0, 7.0, size=(4, 3, 6, 6)).astype(np.float32)
    expected, q_expected = qdq_reference(x, params)
    with runner_cls(path, threads=1) as runner:
        assert runner.info().precision == "int8"
        out = runner.infer({"input": x})["output"]
    q_out = np.rint(out / params["y_scale"])
    # Engines requantize in float32 (s_x*s_w/s_y): a value within float rounding of a .5 tie
    # may land one step away from the float64 reference, never further.
    assert np.abs(q_out - q_expected).max() <= 1
    assert np.mean(q_out == q_expected) >= 0.99
    assert np.all(q_out >= 0)  # the Relu before Q is honoured
    assert (q_expected > 0).mean() > 0.2  # the test data is not trivially all zero


@pytest.fixture(scope="module")
def exported_w4(tmp_path_factory):
    """A W4A4 resnet20 checkpoint and its QDQ export (the export stage's fold -> lower -> writer)."""
    root = tmp_path_factory.mktemp("w4")
    model = save_resnet_checkpoint(root / "w4.pt", bits=4, seed=0)
    return root / "w4.pt", export_qdq_onnx(model, root / "w4.onnx")


def _deploy_logits(ckpt, x: np.ndarray) -> np.ndarray:
    with TorchRunner.from_checkpoint(ckpt, mode="deploy", threads=1) as runner:
        assert runner.info().options["mode"] == "deploy"
        return runner.infer({"input": x})["logits"]


def test_ort_runner_matches_the_deploy_reference_exactly(exported_w4):
    ckpt, path = exported_w4
    x = _inputs(16, (3, 32, 32), seed=3)
    with OrtRunner(path, threads=1) as runner:
        out = runner.infer({"input": x})["logits"]
    # The deploy reference replays ONNX Runtime's integer kernels (export.reference): same logits.
    np.testing.assert_allclose(out, _deploy_logits(ckpt, x), rtol=0, atol=1e-5)


@pytest.mark.skipif(not openvino_int8_exact_here(), reason=OPENVINO_INT8_NOT_EXACT_HERE)
def test_openvino_runner_follows_the_deploy_reference(exported_w4):
    ckpt, path = exported_w4
    x = _inputs(16, (3, 32, 32), seed=3)
    with OpenVinoRunner(path, threads=1) as runner:
        out = runner.infer({"input": x})["logits"]
    expected = _deploy_logits(ckpt, x)
    # OpenVINO's CPU plugin requantizes in its own order (its low-precision transformations move
    # dequantization scales), so single int8 steps differ inside; the logits stay close.
    result = agreement(out, expected)
    spread = float(expected.max() - expected.min())
    assert result.cosine_min > 0.99 and result.max_abs_logit_diff < 0.15 * spread
    assert result.top1_agreement_pct >= 90.0


def test_openvino_bf16_mode_is_labelled_and_refused_for_qdq(float_onnx, qdq_onnx):
    with OpenVinoRunner(float_onnx[0], threads=1, precision_hint="bf16") as runner:
        runner.infer({"input": _inputs(2)})
        info = runner.info()
        assert info.precision == "bf16"
        assert info.options["inference_precision_hint"] == "bf16"
        assert isinstance(info.options["cpu_native_bf16"], bool)
        # a CPU without native bf16 (no avx512_bf16/amx_bf16) compiles the bf16 hint as f32
        assert info.options["compiled_inference_precision"] == ("bf16" if info.options["cpu_native_bf16"] else "f32")
    with OpenVinoRunner(float_onnx[0], threads=1) as runner:
        runner.infer({"input": _inputs(2)})
        assert runner.info().options["compiled_inference_precision"] == "f32"
    with pytest.raises(FatqError, match="bf16"):
        OpenVinoRunner(qdq_onnx[0], precision_hint="bf16")


def test_torch_runner_eval_mode_matches_checkpoint_model(tmp_path):
    ckpt = tmp_path / "w4.pt"
    model = save_resnet_checkpoint(ckpt, bits=4, num_classes=10)
    x = _inputs(3, (3, 32, 32))
    with TorchRunner.from_checkpoint(ckpt, mode="eval", threads=1) as runner:
        assert runner.input_metadata()["input"] == TensorMeta(np.dtype(np.float32), ("batch", 3, 32, 32))
        out = runner.infer({"input": x})["logits"]
        info = runner.info()
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert info.precision == "int8" and info.options["fake_quant"] and info.engine == "torch"


def test_runner_lifecycle_and_feed_checks(float_onnx):
    runner = OrtRunner(float_onnx[0], threads=1)
    with pytest.raises(FatqError, match="not active"):
        runner.infer({"input": _inputs(1)})
    with runner:
        assert runner.is_active
        with pytest.raises(FatqError, match="needs inputs"):
            runner.infer({"wrong": _inputs(1)})
        with pytest.raises(FatqError, match="float32"):
            runner.infer({"input": _inputs(1).astype(np.float64)})
        with pytest.raises(FatqError, match="shape"):
            runner.infer({"input": _inputs(1, (3, 9, 8))})
        assert runner.max_batch() is None
    assert not runner.is_active
    runner.close()  # idempotent


def test_missing_openvino_names_the_extra(float_onnx, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` raise ImportError
    with pytest.raises(MissingExtraError) as info:
        OpenVinoRunner(float_onnx[0]).activate()
    assert info.value.extra == "openvino" and "pip install 'fatq[openvino]'" in str(info.value)


def test_missing_tensorrt_names_the_extra(float_onnx, monkeypatch, tmp_path):
    from engines.trt_builder import BuildSettings, build_engine

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingExtraError) as info:
        build_engine(float_onnx[0], tmp_path / "m.plan", BuildSettings("fp32"))
    assert info.value.extra == "trt"
    assert not (tmp_path / "m.plan").exists()


def test_model_kind_detection(tmp_path, float_onnx, qdq_onnx):
    ckpt = tmp_path / "m.pt"
    save_resnet_checkpoint(ckpt)
    assert detect_model_kind(ckpt) == CHECKPOINT
    assert detect_model_kind(float_onnx[0]) == ONNX
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"\x00serialized engine")
    assert detect_model_kind(plan) == TRT_PLAN
    junk = tmp_path / "notes.txt"
    junk.write_text("not a model at all\n")
    with pytest.raises(FatqError, match="neither"):
        detect_model_kind(junk)
    assert inspect_model(qdq_onnx[0]).precision == "int8"
    info = inspect_model(float_onnx[0])
    assert info.precision == "fp32" and info.normalization["mean"][0] == pytest.approx(0.4914)


def test_latency_stats_closed_form():
    samples = [5.0, 1.0, 3.0, 2.0, 4.0]
    stats = LatencyStats.from_samples(samples)
    assert (stats.min, stats.median, stats.max, stats.mean, stats.count) == (1.0, 3.0, 5.0, 3.0, 5)
    # linear interpolation: position 0.9 * 4 = 3.6 between 4.0 and 5.0
    assert stats.p90 == pytest.approx(4.6) and stats.p99 == pytest.approx(4.96)


def test_interleaved_timing_runs_every_iteration(float_onnx):
    with OrtRunner(float_onnx[0], threads=1) as a, OpenVinoRunner(float_onnx[0], threads=1) as b:
        feeds = {"a": {"input": _inputs(2)}, "b": {"input": _inputs(2)}}
        calls = []
        results = time_interleaved(
            {"a": a, "b": b}, feeds, 2, warmup=1, iterations=7, rounds=3, on_step=lambda: calls.append(1)
        )
    assert len(calls) == 2 * (1 + 7)
    for result in results.values():
        assert result.latency.count == 7 and result.source == "wall-clock" and result.transfers == {}
        assert result.throughput_ips == pytest.approx(2 / (result.latency.median / 1000))


@pytest.mark.parametrize("runner_cls", [OrtRunner, OpenVinoRunner])
def test_a_model_in_memory_runs_as_its_file_does(qdq_onnx, runner_cls):
    """fatq-export --check runs its debug copy from memory: same logits as the file, same facts."""
    import onnx

    path, _ = qdq_onnx
    proto = onnx.load(str(path))
    x = _inputs(3, shape=(3, 6, 6))
    with runner_cls(path, threads=1) as from_file, runner_cls(proto, threads=1, name="copy") as from_proto:
        expected = from_file.infer({"input": x})
        got = from_proto.infer({"input": x})
        assert from_proto.info().precision == from_file.info().precision == "int8"
    with runner_cls(proto.SerializeToString(), threads=1) as from_bytes:
        again = from_bytes.infer({"input": x})
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)
        np.testing.assert_array_equal(again[name], value)
    assert inspect_model(path).precision == "int8" and inspect_model(path).data is None


# Two OpenVINO runners released in creation order, then Python signal handlers firing (PyTorch's DataLoader
# installs one for SIGCHLD): with a Core per runner, OpenVINO left the thread's signal stack on freed memory
# and this crashed the process (see engines.openvino_runner.openvino_core).
_SIGNAL_AFTER_RUNNERS = """
import os, signal, sys
import numpy as np
from engines.openvino_runner import OpenVinoRunner
first, second = (OpenVinoRunner(sys.argv[1], threads=2).activate() for _ in range(2))
for runner in (first, second):
    runner.infer({"input": np.zeros((1, 3, 8, 8), np.float32)})
first.close(); del first
second.close(); del second
import gc; gc.collect()
signal.signal(signal.SIGCHLD, lambda *_: None)
for _ in range(20):
    os.kill(os.getpid(), signal.SIGCHLD)
print("survived")
"""


def test_openvino_runners_leave_a_valid_signal_stack(float_onnx):
    pytest.importorskip("openvino")
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AFTER_RUNNERS, str(float_onnx[0])], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "survived" in result.stdout, (result.returncode, result.stderr[-500:])


def test_openvino_runner_returns_an_output_under_every_name_it_carries(tmp_path):
    """OpenVINO merges identical nodes (two DequantizeLinear of one QuantizeLinear), and the merged output
    port then carries both tensor names; the runner returns it under each, so a graph output the caller
    asked for by name is found (fatq-export --check exposes such a DequantizeLinear on MobileNetV2)."""
    pytest.importorskip("openvino")
    import onnx
    from onnx import TensorProto, helper

    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.25])
    zero = helper.make_tensor("z", TensorProto.INT8, [], [0])
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq_a"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq_b"]),
        helper.make_node("Relu", ["dq_a"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "merged",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("dq_b", TensorProto.FLOAT, [2, 3]),
        ],
        [scale, zero],
    )
    path = tmp_path / "merged.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    x = np.array([[-1.1, 0.3, 0.6], [2.0, -0.2, 31.0]], dtype=np.float32)
    with OpenVinoRunner(path, threads=1) as runner:
        out = runner.infer({"input": x})
    expected = np.clip(np.round(x / 0.25), -128, 127) * 0.25
    np.testing.assert_array_equal(out["dq_b"], expected)
    np.testing.assert_array_equal(out["logits"], np.maximum(expected, 0))
