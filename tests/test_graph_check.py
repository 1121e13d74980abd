"""Graph checker: one hand-broken graph per deployment rule; fatq's own exports are clean."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from export_helpers import trained_like
from onnx import TensorProto, helper, numpy_helper

from export.float_writer import write_float
from export.fold import dequantized, fold
from export.graph_check import assert_deployable, check_model
from export.lower import lower
from export.qdq_writer import write_qdq
from fatq.errors import FatqError

C = 4
ZERO = np.int8(0)
SCALES = np.full(C, 0.02, np.float32)


def _qdq_conv(
    x_zp=ZERO,
    w_scale=SCALES,
    w_axis=0,
    bias_dtype=np.int32,
    x_scale_const=True,
    clip_const=True,
    input_dtype=TensorProto.FLOAT,
    q_has_zp=True,
    bias_from_dq=True,
    weight_from_dq=True,
) -> onnx.ModelProto:
    """input -> Clip -> Q -> DQ -> Conv(DQ(W), DQ(b)) -> output, each part switchable to a broken form."""
    inits = [
        numpy_helper.from_array(np.float32(-1.0), "lo"),
        numpy_helper.from_array(np.float32(1.0), "hi"),
        numpy_helper.from_array(np.float32(0.05), "x_scale"),
        numpy_helper.from_array(np.asarray(x_zp), "x_zp"),
        numpy_helper.from_array(np.ones((C, C, 3, 3), np.int8), "w"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(np.size(w_scale), np.int8), "w_zp"),
        numpy_helper.from_array(np.zeros(C, bias_dtype), "b"),
        numpy_helper.from_array(np.full(C, 0.001, np.float32), "b_scale"),
        numpy_helper.from_array(np.zeros(C, bias_dtype), "b_zp"),
        numpy_helper.from_array(np.ones((C, C, 3, 3), np.float32), "w_float"),
    ]
    nodes = []
    if not x_scale_const:
        nodes.append(helper.make_node("Abs", ["x_scale_src"], ["x_scale_dyn"], name="abs"))
        inits.append(numpy_helper.from_array(np.float32(0.05), "x_scale_src"))
    scale = "x_scale" if x_scale_const else "x_scale_dyn"
    if not clip_const:
        nodes.append(helper.make_node("Neg", ["hi"], ["lo_dyn"], name="neg"))
    nodes += [
        helper.make_node("Clip", ["input", "lo" if clip_const else "lo_dyn", "hi"], ["clipped"], name="clip"),
        helper.make_node(
            "QuantizeLinear", ["clipped", scale, "x_zp"] if q_has_zp else ["clipped", scale], ["xq"], name="q"
        ),
        helper.make_node("DequantizeLinear", ["xq", scale, "x_zp"] if q_has_zp else ["xq", scale], ["xd"], name="dq"),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wd"], name="dq_w", axis=w_axis),
        helper.make_node("DequantizeLinear", ["b", "b_scale", "b_zp"], ["bd"], name="dq_b", axis=0),
        helper.make_node(
            "Conv",
            ["xd", "wd" if weight_from_dq else "w_float", "bd" if bias_from_dq else "b_float"],
            ["output"],
            name="conv",
            pads=[1, 1, 1, 1],
        ),
    ]
    if not bias_from_dq:
        inits.append(numpy_helper.from_array(np.zeros(C, np.float32), "b_float"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", input_dtype, [1, C, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, C, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _rules(model) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for finding in check_model(model):
        found.setdefault(finding.rule, set()).add(finding.node)
    return found


def test_well_formed_graph_is_clean():
    assert check_model(_qdq_conv()) == []


@pytest.mark.parametrize(
    ("broken", "rule", "node"),
    [
        ({"x_zp": np.int8(3)}, "zero-point", "q"),
        ({"x_zp": np.uint8(0)}, "uint8", "x_zp"),
        ({"q_has_zp": False}, "zero-point", "q"),
        ({"input_dtype": TensorProto.UINT8}, "uint8", "input"),
        ({"w_scale": np.array([0.02, 0.0, 0.02, 0.02], np.float32)}, "scale", "dq_w"),
        ({"w_scale": np.array([0.02, -0.1, 0.02, 0.02], np.float32)}, "scale", "dq_w"),
        ({"x_scale_const": False}, "scale", "q"),
        ({"w_axis": 1}, "per-channel-axis", "dq_w"),
        ({"w_scale": np.full(3, 0.02, np.float32)}, "per-channel-axis", "dq_w"),
        ({"weight_from_dq": False}, "float-input", "conv"),
        ({"bias_from_dq": False}, "float-input", "conv"),
        ({"bias_dtype": np.int8}, "float-input", "conv"),
        ({"clip_const": False}, "clip-bounds", "clip"),
    ],
)
def test_each_rule_names_the_node(broken, rule, node):
    found = _rules(_qdq_conv(**broken))
    assert node in found.get(rule, set()), found


def test_per_tensor_activations_and_uint8_casts():
    model = _qdq_conv()
    model.graph.initializer.append(numpy_helper.from_array(np.full(C, 0.05, np.float32), "vec_scale"))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(C, np.int8), "vec_zp"))
    model.graph.node.append(
        helper.make_node("QuantizeLinear", ["output", "vec_scale", "vec_zp"], ["oq"], name="q_out", axis=1)
    )
    model.graph.node.append(helper.make_node("Cast", ["output"], ["as_u8"], name="cast", to=TensorProto.UINT8))
    found = _rules(model)
    assert "q_out" in found["per-channel-axis"]
    assert "cast" in found["uint8"]


def test_fatq_exports_are_clean_and_broken_ones_refused():
    model = trained_like("resnet20", 4)
    graph = fold(model)
    qdq = write_qdq(lower(graph))
    assert check_model(qdq) == []
    assert check_model(write_float(dequantized(graph))) == []
    zero_points = [init for init in qdq.graph.initializer if init.data_type == TensorProto.INT8 and not init.dims]
    zero_points[0].CopyFrom(numpy_helper.from_array(np.int8(1), zero_points[0].name))
    with pytest.raises(FatqError, match="zero-point"):
        assert_deployable(qdq)
