"""ONNX Runtime on a QDQ Gemm, int32-bias form vs the TensorRT file's float-bias form, against exact integers.

Measured on this project's CI machine (AMD EPYC, AVX2, no AVX-512/VNNI), ONNX Runtime 1.32:
DQ(Q(x) int8) · DQ(W int8, per channel) + DQ(b int32) → Gemm is fused into QGemm, which runs
with uint8 activations (zero point 128: ORT's x86 form of an int8 Q → DQ pair) and on AVX2 uses
``vpmaddubsw``, whose int16 sums of two u8 · s8 products saturate once 2 · 255 · |w| > 32767,
i.e. for weights |w| ≥ 65: logits off by up to ~6·10^4 accumulator steps. With |w| ≤ 63 the same
QGemm is exact; VNNI's ``vpdpbusd`` accumulates in int32 and does not saturate. The same Gemm
with the bias as a float32 constant q · float32(s_x · s_w) (the TensorRT file, export/qdq_writer.py)
is not fused: ORT runs a float Gemm on the dequantized values, within 0.1 accumulator step of
the exact result on any CPU (float32 sums).

Every model here is run by the real ONNX Runtime; the reference is int64 numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")

K, N, B = 64, 10, 256
X_SCALE = np.float32(0.05)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def has_vnni() -> bool:
    """AVX-512 VNNI or AVX-VNNI: int8 dot products accumulated in int32 without int16 saturation."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni"})


def _gemm(weight_max: int, int32_bias: bool, seed: int = 0):
    """(model, float input x, exact result) of Q(x) → DQ → Gemm(DQ(W), bias), x integers in [0, 127]."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-weight_max, weight_max + 1, size=(N, K)).astype(np.int8)
    w_scale = (rng.uniform(0.5, 2, size=N) * 0.01).astype(np.float32)
    q_bias = rng.integers(-5000, 5000, size=N).astype(np.int32)
    step = X_SCALE * w_scale  # float32(s_x · s_w)
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(N, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(X_SCALE), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wd"], axis=0),
    ]
    if int32_bias:
        inits += [
            numpy_helper.from_array(q_bias, "b_q"),
            numpy_helper.from_array(step, "b_scale"),
            numpy_helper.from_array(np.zeros(N, np.int32), "b_zp"),
        ]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b"], axis=0))
    else:
        inits.append(numpy_helper.from_array((q_bias * step.astype(np.float64)).astype(np.float32), "b"))
    nodes.append(helper.make_node("Gemm", ["xd", "wd", "b"], ["y"], transB=1))
    graph = helper.make_graph(
        nodes,
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, N])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    q_x = rng.integers(0, 128, size=(B, K))
    exact = (q_x @ w.astype(np.int64).T + q_bias) * step.astype(np.float64)
    return model, (q_x * X_SCALE).astype(np.float32), exact, step.astype(np.float64)


def _run(model, x, tmp_path) -> tuple[np.ndarray, list[str]]:
    """ORT's output and the op types of its optimized model."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0]
    return y.astype(np.float64), [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def test_float_bias_gemm_is_exact_on_every_cpu(tmp_path):
    # the TensorRT file's form: ORT leaves the Gemm float (no QGemm); float32 sums of up to 64 * 127 * 127
    # steps carry ~2^-24 relative rounding each: within 0.1 step of the integers (0.034 measured)
    model, x, exact, step = _gemm(127, int32_bias=False)
    y, ops = _run(model, x, tmp_path)
    assert "QGemm" not in ops
    assert np.abs((y - exact) / step).max() < 0.1


def test_int32_bias_gemm_is_exact_without_int16_saturation(tmp_path):
    # |w| <= 63: 2 * 255 * 63 < 32767, no u8*s8 pair sum saturates on any x86 kernel
    model, x, exact, step = _gemm(63, int32_bias=True)
    y, ops = _run(model, x, tmp_path)
    assert "QGemm" in ops
    assert np.abs((y - exact) / step).max() < 1e-2


def test_int32_bias_gemm_with_8bit_weights_depends_on_the_cpu(tmp_path):
    # the case that made fatq's TensorRT file drop the int32 bias: exact with VNNI, saturated on AVX2 alone
    model, x, exact, step = _gemm(127, int32_bias=True)
    y, ops = _run(model, x, tmp_path)
    assert "QGemm" in ops
    worst = np.abs((y - exact) / step).max()
    if has_vnni():
        assert worst < 1e-2  # vpdpbusd accumulates in int32
    elif "avx2" in cpu_flags():
        assert worst > 100, "ORT's AVX2 QGemm no longer saturates: update export/qdq_writer.py and docs/parity.md"
    else:
        pytest.skip("measured on x86 (AVX2, VNNI) only")
