"""Lint an ONNX graph against the deployment rules of DEPLOY.md, naming the offending node.

Rules (each finding carries its rule id):

- ``zero-point``: every QuantizeLinear/DequantizeLinear has a constant zero point that is all
  zeros, int8 (int32 for a bias DequantizeLinear). A QuantizeLinear without one outputs uint8.
- ``uint8``: no uint8 tensor anywhere (initializers, inputs, outputs, value infos, Cast targets).
- ``scale``: every Q/DQ scale is a constant float tensor, finite and strictly positive.
- ``per-channel-axis``: a per-channel (vector) scale belongs to a constant weight, with the axis
  of its output channels (0 for Conv and Gemm(transB=1), 1 for ConvTranspose and
  MatMul/Gemm(transB=0)) and as many scales as that axis has entries; activations are per-tensor.
- ``float-input``: in a quantized graph (one with Q/DQ nodes), the data and weight inputs of
  Conv, ConvTranspose, Gemm and MatMul come from DequantizeLinear, and a bias from a
  DequantizeLinear of int32.
- ``clip-bounds``: Clip bounds are constants (initializers or Constant nodes).

:func:`check_model` returns the findings; :func:`assert_deployable` raises on any.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from fatq.errors import FatqError

QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Finding:
    """One rule violation: the node (or tensor) it concerns, the rule id and a sentence."""

    node: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.node}: [{self.rule}] {self.message}"


class _Graph:
    """Lookups over an ONNX graph: constants (initializers and Constant nodes), producers, readers."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.nodes = list(graph.node)
        self.constants: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.dtypes: dict[str, int] = {i.name: i.data_type for i in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attr.t)
                        self.dtypes[node.output[0]] = attr.t.data_type
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)

    def input(self, node: onnx.NodeProto, index: int) -> str:
        return node.input[index] if len(node.input) > index else ""

    def produced_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({', '.join(node.output)})"


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _check_uint8(model: onnx.ModelProto, g: _Graph) -> list[Finding]:
    findings = []
    graph = model.graph
    for name, dtype in g.dtypes.items():
        if dtype == TensorProto.UINT8:
            findings.append(Finding(name, "uint8", "constant is uint8; engines here accept only signed int8."))
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.tensor_type.elem_type == TensorProto.UINT8:
            findings.append(Finding(info.name, "uint8", "tensor is declared uint8; use int8 with zero point 0."))
    for node in g.nodes:
        if node.op_type == "Cast" and _attr(node, "to", None) == TensorProto.UINT8:
            findings.append(Finding(_label(node), "uint8", "casts to uint8."))
    return findings


def _check_qdq_node(node: onnx.NodeProto, g: _Graph) -> list[Finding]:
    findings, label = [], _label(node)
    scale_name, zp_name = g.input(node, 1), g.input(node, 2)
    scale = g.constants.get(scale_name)
    if scale is None:
        findings.append(Finding(label, "scale", f"scale {scale_name!r} is not a constant."))
    elif scale.dtype.kind != "f" or not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        findings.append(
            Finding(label, "scale", f"scale {scale_name!r} must be finite and > 0, got {scale.ravel()[:4]}.")
        )
    is_bias = node.op_type == "DequantizeLinear" and g.dtypes.get(node.input[0]) == TensorProto.INT32
    wanted = TensorProto.INT32 if is_bias else TensorProto.INT8
    if not zp_name:
        if node.op_type == "QuantizeLinear":
            findings.append(
                Finding(label, "zero-point", "has no zero point, so it outputs uint8; give an int8 zero 0.")
            )
    elif zp_name not in g.constants:
        findings.append(Finding(label, "zero-point", f"zero point {zp_name!r} is not a constant."))
    else:
        zero_point = g.constants[zp_name]
        if np.any(zero_point != 0):
            findings.append(
                Finding(label, "zero-point", f"zero point {zp_name!r} is not 0 ({zero_point.ravel()[:4]}).")
            )
        if g.dtypes.get(zp_name) != wanted:
            dtype = TensorProto.DataType.Name(g.dtypes.get(zp_name, 0))
            findings.append(
                Finding(
                    label, "zero-point", f"zero point has type {dtype}, expected {TensorProto.DataType.Name(wanted)}."
                )
            )
    if scale is not None and scale.size > 1:
        findings += _check_per_channel(node, g, scale.size)
    return findings


def _weight_axis(reader: onnx.NodeProto, input_index: int) -> int | None:
    """The output-channel axis of a weight input, or None if that input is not a weight."""
    if reader.op_type == "Conv" and input_index == 1:
        return 0
    if reader.op_type == "ConvTranspose" and input_index == 1:
        return 1
    if reader.op_type == "Gemm" and input_index == 1:
        return 0 if _attr(reader, "transB", 0) else 1
    if reader.op_type == "MatMul" and input_index == 1:
        return 1
    if reader.op_type in ("Conv", "ConvTranspose", "Gemm") and input_index == 2:
        return 0  # bias [C_out]
    return None


def _check_per_channel(node: onnx.NodeProto, g: _Graph, channels: int) -> list[Finding]:
    label = _label(node)
    if node.op_type != "DequantizeLinear" or node.input[0] not in g.constants:
        return [Finding(label, "per-channel-axis", "activations must use one (per-tensor) scale.")]
    axis = _attr(node, "axis", 1)
    weight = g.constants[node.input[0]]
    axis_norm = axis % weight.ndim if weight.ndim else 0
    findings = []
    for reader in g.readers.get(node.output[0], []):
        for index, name in enumerate(reader.input):
            expected = _weight_axis(reader, index) if name == node.output[0] else None
            if name == node.output[0] and expected is not None and axis_norm != expected:
                findings.append(
                    Finding(
                        label,
                        "per-channel-axis",
                        f"axis {axis} for {reader.op_type} input {index}; expected {expected}.",
                    )
                )
    if weight.ndim == 0 or weight.shape[axis_norm] != channels:
        findings.append(
            Finding(label, "per-channel-axis", f"{channels} scales do not match axis {axis} of shape {weight.shape}.")
        )
    return findings


def _check_float_inputs(node: onnx.NodeProto, g: _Graph) -> list[Finding]:
    label, findings = _label(node), []
    for index, name in enumerate(node.input[:3]):
        if not name:
            continue
        dq = g.produced_by(name, "DequantizeLinear")
        role = ("data", "weight", "bias")[index]
        if dq is None:
            findings.append(
                Finding(label, "float-input", f"{role} input {name!r} is float (not from a DequantizeLinear).")
            )
        elif index == 2 and g.dtypes.get(dq.input[0]) != TensorProto.INT32:
            findings.append(Finding(label, "float-input", f"bias {name!r} must be an int32 DequantizeLinear."))
    return findings


def _check_clip(node: onnx.NodeProto, g: _Graph) -> list[Finding]:
    return [
        Finding(_label(node), "clip-bounds", f"bound {name!r} is not a constant.")
        for name in node.input[1:3]
        if name and name not in g.constants
    ]


def check_model(model: onnx.ModelProto) -> list[Finding]:
    """Every rule violation of ``model`` (empty list: deployable)."""
    g = _Graph(model)
    findings = _check_uint8(model, g)
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.nodes)
    for node in g.nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            findings += _check_qdq_node(node, g)
        elif node.op_type in QUANTIZED_OPS and quantized:
            findings += _check_float_inputs(node, g)
        elif node.op_type == "Clip":
            findings += _check_clip(node, g)
    return findings


def assert_deployable(model: onnx.ModelProto) -> None:
    """Raise :class:`FatqError` naming the first findings if ``model`` breaks a rule."""
    findings = check_model(model)
    if findings:
        shown = "; ".join(str(f) for f in findings[:3])
        more = f" (and {len(findings) - 3} more)" if len(findings) > 3 else ""
        raise FatqError(f"refusing to write a graph that breaks deployment rules: {shown}{more}.")
