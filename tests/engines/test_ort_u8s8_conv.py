"""ONNX Runtime's uint8 x int8 QLinearConv with 8-bit weights (the ``onnx-ort`` file's stem) against int64 numpy.

On an x86 CPU without VNNI, ORT's u8 x s8 kernels sum two products into a saturating int16
(``vpmaddubsw``), so a conv with bytes near 255 and weights near 127 saturates; VNNI accumulates in
int32. fatq writes such convs u8 x s8 anyway (s8 x s8 ran 4.7x slower on a VNNI CPU,
benchmarks/ort_conv_types.py), lists them in the file's ``x64quantprecision`` metadata, and
:class:`engines.ort_runner.OrtRunner` sets ORT's ``session.x64quantprecision`` on CPUs without VNNI,
with which ORT runs them u8 x u8 (export/ort_writer.saturates_u8s8). Every model here runs in the real ONNX Runtime.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.host import saturating_u8s8
from export.ort_writer import PRECISION_KEY

ort = pytest.importorskip("onnxruntime")

B, C_IN, C_OUT, HW = 8, 4, 8, 8
X_SCALE, W_SCALE, Y_SCALE = np.float32(0.5), np.float32(0.25), np.float32(640.0)  # |y| <= 114 levels
X_ZERO, Y_ZERO = 127, 128


def _conv_model(listed: bool):
    """(model, float input, exact output integers): Q(x) -> QLinearConv(u8, s8 weights up to 127) -> DQ.

    Every weight is +127 or -127 by output channel and the input bytes are 230..254, so every pair of
    products leaves int16 (2 * 230 * 127 > 32767) on a saturating kernel.
    """
    rng = np.random.default_rng(0)
    sign = np.where(np.arange(C_OUT) % 2 == 0, 1, -1).astype(np.int64)
    w = (127 * sign[:, None, None, None] * np.ones((C_OUT, C_IN, 3, 3), np.int64)).astype(np.int8)
    bytes_x = rng.integers(230, 255, size=(B, C_IN, HW, HW))
    x = ((bytes_x - X_ZERO) * X_SCALE).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(X_SCALE), "xs"),
        numpy_helper.from_array(np.array(X_ZERO, np.uint8), "xz"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.full(C_OUT, W_SCALE, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(C_OUT, np.int8), "wz"),
        numpy_helper.from_array(np.array(Y_SCALE), "ys"),
        numpy_helper.from_array(np.array(Y_ZERO, np.uint8), "yz"),
        numpy_helper.from_array(np.zeros(C_OUT, np.int32), "b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "xs", "xz"], ["xq"]),
        helper.make_node(
            "QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["yq"], pads=[1, 1, 1, 1]
        ),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "stem",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", C_IN, HW, HW])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", C_OUT, HW, HW])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    if listed:
        helper.set_model_props(model, {PRECISION_KEY: json.dumps(["stem"])})
    # int64 reference: zero-padded conv of the integers (bytes - zero point), requantized at Y_SCALE
    q = np.pad(bytes_x - X_ZERO, ((0, 0), (0, 0), (1, 1), (1, 1)))
    acc = np.zeros((B, C_OUT, HW, HW), np.int64)
    for i in range(3):
        for j in range(3):
            acc += np.einsum("bchw,oc->bohw", q[:, :, i : i + HW, j : j + HW], w[:, :, i, j].astype(np.int64))
    exact = np.clip(np.round(acc * float(X_SCALE * W_SCALE / Y_SCALE)), -Y_ZERO, 255 - Y_ZERO)
    return model, x, exact


def _levels(y: np.ndarray) -> np.ndarray:
    return np.round(y / Y_SCALE)


def test_listed_u8s8_conv_is_exact_in_fatqs_runner_on_every_cpu():
    from engines.ort_runner import OrtRunner

    model, x, exact = _conv_model(listed=True)
    with OrtRunner(model.SerializeToString(), threads=1, name="stem.onnx") as runner:
        y = runner.infer({"input": x})["logits"]
    # within one level: the requantization may round a tie either way, a saturated pair is tens of levels off
    assert np.abs(_levels(y) - exact).max() <= 1


def test_plain_session_saturates_without_vnni():
    """What a user's own session computes without the option: exact with VNNI, saturated on AVX2 alone."""
    model, x, exact = _conv_model(listed=False)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    worst = np.abs(_levels(session.run(None, {"input": x})[0]) - exact).max()
    if saturating_u8s8():
        assert worst > 5, "ORT's AVX2 u8 x s8 conv no longer saturates: update export/ort_writer.saturates_u8s8"
    else:
        assert worst <= 1
