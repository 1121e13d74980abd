"""benchmarks/int4_weights.py's rewrite: the INT4 weights dequantize to exactly the int8 file's real weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from export_helpers import benchmark_script, lowered_case
from onnx import numpy_helper

from export.qdq_writer import write_qdq


def _script():
    return benchmark_script("int4_weights")


def _dequantized_weights(path: Path) -> list[np.ndarray]:
    """The real weights every DequantizeLinear of a constant computes, in node order (numpy float32)."""
    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].ndim >= 2:
            q, scale = inits[node.input[0]].astype(np.float32), inits[node.input[1]].astype(np.float32)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            if scale.ndim:
                shape[axis] = -1
            weights.append(q * scale.reshape(shape))
    return weights


def test_int4_rewrite_keeps_the_real_weights_and_packs_4_bit_ones(tmp_path):
    _, graph = lowered_case("resnet20", 4, json.dumps({}))
    original, rewritten = tmp_path / "w4.onnx", tmp_path / "w4-int4.onnx"
    onnx.save(write_qdq(graph), original)
    count = _script().rewrite_int4(original, rewritten)
    model = onnx.load(rewritten)
    int4 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4 and len(i.dims) >= 2]
    assert count == len(int4) == 18  # every body conv; the 8-bit stem and classifier stay int8
    assert model.opset_import[0].version >= 21
    onnx.checker.check_model(model)
    before, after = _dequantized_weights(original), _dequantized_weights(rewritten)
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-7, atol=0)  # scale · k rounds to float32 once
    assert rewritten.stat().st_size < 0.7 * original.stat().st_size
