"""Deployment linter: a table of rules, each with its targets, its source and a check over an ONNX model.

``lint(model, target)`` runs every rule of :data:`RULES` that applies to ``target`` ("trt", "ort" or
"openvino") and returns :class:`Finding` objects naming the node (index and name) and what is wrong.
``main_lint(path, target)`` prints them grouped by rule, with the rule's source, and returns 1 on any
finding, 0 when clean (``fatq-export --lint FILE --target ...``).

The TensorRT rules were read from onnx-tensorrt's parser source and NVIDIA's documentation, not
observed on TensorRT: no machine here runs it (DEPLOY.md). Each rule names where it comes from;
``docs/tensorrt-rules.md`` is the same table as a document with what was and was not verified.
Parser sources cited: onnx/onnx-tensorrt ``onnxOpImporters.cpp`` at the 10.1-GA release
(commit 96e78110) and at a later 10.x snapshot (commit dd0a3a9f, the one with an Attention
importer); ``docs/operators.md`` of the 10.0/10.1 and 10.15 releases.

The "ort" and "openvino" rule sets are the rules of the portable QDQ file as those engines read it
(DEPLOY.md, ONNX Runtime's QDQ fusion conditions): symmetric int8, constant positive float32 scales,
per-channel weights only, constant Clip bounds, Conv/Gemm inputs dequantized, a bias either float or
an int32 DequantizeLinear of scale s_x·s_w. The engine-specific files (``--format onnx-ort``,
``onnx-openvino``) break some of them by design (uint8, FakeQuantize).

fatq writes int8 only: TensorRT also takes FP8, INT4 (and FP4 from its 10.15 operator list) as
DequantizeLinear inputs, but a fatq file with them is not one fatq wrote, so the linter reports them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fatq.errors import FatqError

TARGETS = ("trt", "ort", "openvino")
TARGET_NAMES = {"trt": "TensorRT", "ort": "ONNX Runtime", "openvino": "OpenVINO"}

ONNX_TRT = "onnx/onnx-tensorrt"
IMPORTERS = f"{ONNX_TRT} onnxOpImporters.cpp"
OPERATORS_MD = f"{ONNX_TRT} docs/operators.md"
DEPLOY = "DEPLOY.md (../shared/docs)"


@dataclass(frozen=True)
class TrtVersion:
    """What the documentation says one TensorRT release line reads.

    Attributes:
        label: the release line, e.g. "10.0-10.1".
        opsets: inclusive (lowest, highest) default-domain opset of its ONNX parser.
        dq_types: DequantizeLinear input types of its operators.md row.
        source: where the two come from.
    """

    label: str
    opsets: tuple[int, int]
    dq_types: tuple[str, ...]
    source: str


# Release lines whose ONNX opset range is documented. Releases between 10.2 and 10.14 are left out:
# their operators.md was not read here, so the linter refuses to guess them.
TRT_VERSIONS = {
    "10.0": TrtVersion(
        "10.0-10.1",
        (9, 20),
        ("INT8", "FP8", "INT4"),
        f"{OPERATORS_MD} at the 10.0-GA and 10.1-GA releases, first line ('opset 9 to opset 20') and "
        "DequantizeLinear row",
    ),
    "10.15": TrtVersion(
        "10.15",
        (9, 24),
        ("INT8", "FP8", "FP4", "INT4"),
        f"{OPERATORS_MD} of the 10.15 release, first line ('opset 9 to opset 24') and DequantizeLinear row",
    ),
    "11": TrtVersion(
        "11.x",
        (9, 25),
        ("INT8", "FP8", "FP4", "INT4"),
        "NVIDIA TensorRT docs, Reference > ONNX Opset Guide, 'Supported ONNX and Opset Versions' "
        "(maximum opset 25, minimum 9 for 11.x); DequantizeLinear types as in 10.15",
    ),
}
TRT_VERSIONS["10.1"] = TRT_VERSIONS["10.0"]
DEFAULT_TRT_VERSION = "10.0"  # the oldest documented 10.x line: a file clean for it is inside every range here


def trt_version_info(version: str) -> TrtVersion:
    """The documented facts of a TensorRT release line: "10.0", "10.1", "10.15", "11" or a full version."""
    parts = version.split(".")
    key = "11" if parts[0] == "11" else ".".join(parts[:2])
    if key in TRT_VERSIONS:
        return TRT_VERSIONS[key]
    known = ", ".join(sorted({v.label for v in TRT_VERSIONS.values()}))
    raise FatqError(f"no documented ONNX opset range for TensorRT {version} is recorded here; use one of {known}.")


# Ops fatq writes into its TensorRT file, each checked against its operators.md row (10.0/10.1 and
# 10.15: supported, FP32/FP16/BF16 for float ops). Anything else gets a finding: fatq does not write it.
TRT_SUPPORTED_OPS = {
    "Add": "Y, FP32/FP16/BF16/INT32/INT64",
    "Clip": "Y, FP32/FP16/BF16",
    "Constant": "Y; sparse_value and string values unsupported",
    "Conv": "Y, FP32/FP16/BF16",
    "DequantizeLinear": "Y, INT8/FP8/INT4 (10.15: also FP4); x_zero_point must be zero",
    "Flatten": "Y, FP32/FP16/BF16/INT32/INT64/BOOL",
    "Gemm": "Y, FP32/FP16/BF16",
    "GlobalAveragePool": "Y, FP32/FP16/BF16",
    "MaxPool": "Y, 2D or 3D pooling only, no Indices output, dilations empty or all ones",
    "Pad": "Y, FP32/FP16/BF16/INT32/INT64; `axes` must be an initializer",
    "QuantizeLinear": "Y, FP32/FP16/BF16 input; y_zero_point must be 0",
    "Relu": "Y, FP32/FP16/BF16/INT32/INT64",
    "Slice": "Y, FP32/FP16/BF16/INT32/INT64/BOOL; `axes` must be an initializer",
}
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Finding:
    """One violation: its rule, the node (index in ``graph.node``, None for a tensor) and a sentence."""

    rule: str
    node: str
    index: int | None
    message: str

    def __str__(self) -> str:
        where = f"node {self.index} '{self.node}'" if self.index is not None else f"tensor '{self.node}'"
        return f"{where}: {self.message}"


def _dtype_name(dtype: int | None) -> str:
    return TensorProto.DataType.Name(dtype) if dtype else "unknown"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


class Graph:
    """Lookups over one ONNX graph for the rules: constants, element types, producers and readers.

    Args:
        model: the model; its top-level graph is linted (fatq writes no subgraphs).
        target: "trt", "ort" or "openvino".
        trt: the TensorRT release line the TensorRT rules check against.
    """

    def __init__(self, model: onnx.ModelProto, target: str, trt: TrtVersion):
        self.model, self.target, self.trt = model, target, trt
        graph = model.graph
        self.nodes = list(graph.node)
        self.constants: dict[str, np.ndarray] = {}
        self.types: dict[str, int] = {}
        for init in graph.initializer:
            self.constants[init.name] = numpy_helper.to_array(init)
            self.types[init.name] = init.data_type
        for node in self.nodes:
            if node.op_type == "Constant" and node.output:
                value = _constant_value(node)
                if value is not None:
                    self.constants[node.output[0]], self.types[node.output[0]] = value
        for info in self._value_infos(model):
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
                self.types.setdefault(info.name, info.type.tensor_type.elem_type)
        for node in self.nodes:  # Q outputs: the zero point's type (ONNX: uint8 when it is absent)
            if node.op_type == "QuantizeLinear" and node.output:
                zp = self.input(node, 2)
                dtype = self.types.get(zp) if zp else _attr(node, "output_dtype", 0) or TensorProto.UINT8
                if dtype:
                    self.types[node.output[0]] = dtype
        self.producer = {out: (i, node) for i, node in enumerate(self.nodes) for out in node.output}
        self.readers: dict[str, list[tuple[int, onnx.NodeProto]]] = {}
        for i, node in enumerate(self.nodes):
            for name in node.input:
                self.readers.setdefault(name, []).append((i, node))
        self.quantized = any(n.op_type in QDQ_OPS for n in self.nodes)

    @staticmethod
    def _value_infos(model: onnx.ModelProto):
        graph = model.graph
        infos = [*graph.input, *graph.output, *graph.value_info]
        # inferred types of intermediate tensors (what a Q reads); a graph it cannot type keeps the declared ones
        with contextlib.suppress(Exception):  # onnx raises several unrelated types here
            infos += list(onnx.shape_inference.infer_shapes(model).graph.value_info)
        return infos

    @staticmethod
    def input(node: onnx.NodeProto, index: int) -> str:
        return node.input[index] if len(node.input) > index else ""

    def producer_op(self, name: str) -> str | None:
        entry = self.producer.get(name)
        return entry[1].op_type if entry else None

    def finding(self, rule: str, index: int, message: str) -> Finding:
        node = self.nodes[index]
        return Finding(rule, node.name or f"{node.op_type}#{index}", index, message)

    def each(self, *op_types: str):
        """(index, node) of every node of the given op types."""
        return ((i, n) for i, n in enumerate(self.nodes) if n.op_type in op_types)


def _constant_value(node: onnx.NodeProto) -> tuple[np.ndarray, int] | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t), attr.t.data_type
        if attr.name in ("value_float", "value_floats"):
            return np.asarray(helper.get_attribute_value(attr), np.float32), TensorProto.FLOAT
        if attr.name in ("value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(attr), np.int64), TensorProto.INT64
    return None


# --- rule checks ------------------------------------------------------------------------------


def _check_trt_dq_input(g: Graph) -> list[Finding]:
    findings = []
    for i, node in g.each("DequantizeLinear"):
        dtype = g.types.get(node.input[0])
        if dtype == TensorProto.INT8:
            continue
        name = _dtype_name(dtype)
        if dtype == TensorProto.INT32:
            why = (
                "TensorRT's IDequantizeLayer takes only "
                + "/".join(g.trt.dq_types)
                + " inputs, so an int32 (bias) DequantizeLinear fails the build; write the bias as a float constant"
            )
        elif name in ("FLOAT8E4M3FN", "INT4", "FLOAT4E2M1"):
            why = "TensorRT reads it, but fatq writes and accepts int8 only"
        else:
            why = "TensorRT's IDequantizeLayer takes only " + "/".join(g.trt.dq_types) + " inputs"
        what = f"is {name}" if dtype else "has a type the linter cannot infer"
        findings.append(g.finding("trt-dq-input-int8", i, f"input {node.input[0]!r} {what}; {why}."))
    return findings


def _check_dq_input_portable(g: Graph) -> list[Finding]:
    findings = []
    for i, node in g.each("DequantizeLinear"):
        dtype = g.types.get(node.input[0])
        if dtype == TensorProto.INT8:
            continue
        if dtype == TensorProto.INT32 and _is_bias_dq(g, node):
            continue
        findings.append(
            g.finding(
                "dq-input-int8",
                i,
                f"input {node.input[0]!r} is {_dtype_name(dtype)}; only int8 (and an int32 Conv/Gemm bias) is "
                "dequantized in a fatq file.",
            )
        )
    return findings


def _is_bias_dq(g: Graph, node: onnx.NodeProto) -> bool:
    """Whether a DequantizeLinear feeds only bias inputs (index 2) of Conv/ConvTranspose/Gemm."""
    readers = g.readers.get(node.output[0], [])
    return bool(readers) and all(
        r.op_type in ("Conv", "ConvTranspose", "Gemm") and g.input(r, 2) == node.output[0] for _, r in readers
    )


def _check_trt_q_input(g: Graph) -> list[Finding]:
    findings = []
    for i, node in g.each("QuantizeLinear"):
        dtype = g.types.get(node.input[0])
        if dtype is not None and dtype not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16):
            findings.append(
                g.finding(
                    "trt-q-input-float",
                    i,
                    f"quantizes {node.input[0]!r} of type {_dtype_name(dtype)}; TensorRT quantizes FP32/FP16/BF16 "
                    "tensors only.",
                )
            )
    return findings


def _check_zero_point_type(g: Graph) -> list[Finding]:
    findings = []
    for i, node in g.each(*QDQ_OPS):
        zp = g.input(node, 2)
        if not zp:
            if node.op_type == "QuantizeLinear" and not _attr(node, "output_dtype", 0):
                findings.append(
                    g.finding("zero-point-int8", i, "has no zero point, so ONNX makes its output uint8; give int8 0.")
                )
            continue
        if zp not in g.constants:
            findings.append(g.finding("zero-point-int8", i, f"zero point {zp!r} is not a constant."))
            continue
        wanted = TensorProto.INT8 if node.op_type == "QuantizeLinear" else g.types.get(node.input[0])
        if node.op_type == "DequantizeLinear" and wanted not in (TensorProto.INT8, TensorProto.INT32):
            continue  # the input type's own rule reports it
        if g.types.get(zp) != wanted:
            findings.append(
                g.finding(
                    "zero-point-int8",
                    i,
                    f"zero point {zp!r} is {_dtype_name(g.types.get(zp))}; it must be {_dtype_name(wanted)} "
                    "(the quantized type).",
                )
            )
    return findings


def _check_zero_point_zero(g: Graph) -> list[Finding]:
    findings = []
    for i, node in g.each(*QDQ_OPS):
        zp = g.constants.get(g.input(node, 2))
        if zp is not None and np.any(zp != 0):
            findings.append(
                g.finding("zero-point-zero", i, f"zero point is not all 0 ({zp.ravel()[:4]}): symmetric only.")
            )
    return findings


def _check_zero_point_count(g: Graph) -> list[Finding]:
    findings = []
    for i, node in g.each(*QDQ_OPS):
        zp, scale = g.constants.get(g.input(node, 2)), g.constants.get(g.input(node, 1))
        if zp is not None and scale is not None and zp.size != scale.size:
            findings.append(
                g.finding("zero-point-count", i, f"{zp.size} zero point(s) for {scale.size} scale(s); they must match.")
            )
    return findings


def _check_scale_constant(g: Graph) -> list[Finding]:
    return [
        g.finding("scale-constant", i, f"scale {g.input(node, 1)!r} is not an initializer or Constant.")
        for i, node in g.each(*QDQ_OPS)
        if g.input(node, 1) not in g.constants
    ]


def _check_scale_float32(g: Graph) -> list[Finding]:
    findings = []
    for i, node in g.each(*QDQ_OPS):
        name = g.input(node, 1)
        dtype = g.types.get(name)
        if dtype is not None and dtype != TensorProto.FLOAT:
            findings.append(
                g.finding("scale-float32", i, f"scale {name!r} is {_dtype_name(dtype)}; fatq files use float32.")
            )
    return findings


def _check_scale_positive(g: Graph) -> list[Finding]:
    findings = []
    for i, node in g.each(*QDQ_OPS):
        scale = g.constants.get(g.input(node, 1))
        if scale is None:
            continue
        values = scale.astype(np.float64)
        if scale.size == 0 or not np.all(np.isfinite(values)) or not np.all(values > 0):
            findings.append(
                g.finding("scale-positive", i, f"scale must be finite and > 0 everywhere, got {scale.ravel()[:4]}.")
            )
    return findings


def _weight_axis(reader: onnx.NodeProto, index: int) -> int | None:
    """The output-channel axis of input ``index`` of ``reader`` if it is a weight, else None."""
    if index == 1 and reader.op_type == "Conv":
        return 0
    if index == 1 and reader.op_type == "ConvTranspose":
        return 1
    if index == 1 and reader.op_type == "Gemm":
        return 0 if _attr(reader, "transB", 0) else 1
    if index == 1 and reader.op_type == "MatMul":
        return 1
    return None


def _check_per_channel(g: Graph) -> list[Finding]:
    findings = []
    for i, node in g.each(*QDQ_OPS):
        scale = g.constants.get(g.input(node, 1))
        if scale is None or scale.size <= 1:
            continue
        data = node.input[0]
        if node.op_type == "DequantizeLinear" and g.producer_op(data) == "QuantizeLinear":
            data = g.producer[data][1].input[0]  # Q -> DQ of a float weight: the weight is the Q's input
        weight = g.constants.get(data)
        if weight is None:
            findings.append(g.finding("per-channel-axis", i, "a vector scale on an activation: use one scale."))
            continue
        if scale.ndim != 1:
            findings.append(g.finding("per-channel-axis", i, f"scale has shape {scale.shape}; per-channel is 1-D."))
            continue
        axis = _attr(node, "axis")
        if axis is None and g.target == "trt":
            # onnx-tensorrt's default differs by release: 10.1-GA uses axis 0 for a per-channel scale
            # without `axis`, later 10.x use ONNX's default 1. An explicit axis reads the same everywhere.
            findings.append(g.finding("per-channel-axis", i, "per-channel scale without an explicit axis attribute."))
            continue
        axis = 1 if axis is None else axis
        norm = axis % weight.ndim if weight.ndim else 0
        if weight.ndim == 0 or weight.shape[norm] != scale.size:
            findings.append(
                g.finding("per-channel-axis", i, f"{scale.size} scales do not match axis {axis} of {weight.shape}.")
            )
            continue
        out = node.output[0] if node.op_type == "DequantizeLinear" else None
        for _, reader in g.readers.get(out, []) if out else []:
            for index, name in enumerate(reader.input):
                expected = _weight_axis(reader, index) if name == out else None
                if expected is not None and norm != expected:
                    findings.append(
                        g.finding(
                            "per-channel-axis",
                            i,
                            f"axis {axis} for {reader.op_type} input {index}; its output channels are axis {expected}.",
                        )
                    )
    return findings


def _check_weighted_inputs(g: Graph) -> list[Finding]:
    if not g.quantized:
        return []
    findings = []
    for i, node in g.each(*WEIGHTED_OPS):
        for index, role in ((0, "data"), (1, "weight")):
            name = g.input(node, index)
            if name and g.producer_op(name) != "DequantizeLinear":
                findings.append(
                    g.finding(
                        "weighted-inputs-dequantized", i, f"{role} input {name!r} is not from a DequantizeLinear."
                    )
                )
    return findings


def _bias_channels(g: Graph, node: onnx.NodeProto) -> int | None:
    """Output channels of a Conv/ConvTranspose/Gemm from its (dequantized) weight, if known."""
    weight_name = g.input(node, 1)
    if g.producer_op(weight_name) == "DequantizeLinear":
        weight_name = g.producer[weight_name][1].input[0]
    weight = g.constants.get(weight_name)
    if weight is None:
        return None
    if node.op_type == "Conv":
        return weight.shape[0]
    if node.op_type == "ConvTranspose":
        return weight.shape[1] * int(_attr(node, "group", 1))
    return weight.shape[0] if _attr(node, "transB", 0) else weight.shape[-1]


def _check_trt_bias(g: Graph) -> list[Finding]:
    findings = []
    for i, node in g.each("Conv", "ConvTranspose", "Gemm"):
        name = g.input(node, 2)
        if not name:
            continue
        if g.producer_op(name) == "DequantizeLinear":
            findings.append(
                g.finding("trt-bias-float", i, f"bias {name!r} is a DequantizeLinear output; write a float32 constant.")
            )
            continue
        bias = g.constants.get(name)
        if bias is None:
            findings.append(g.finding("trt-bias-float", i, f"bias {name!r} is not an initializer or Constant."))
        elif g.types.get(name) != TensorProto.FLOAT:
            findings.append(
                g.finding("trt-bias-float", i, f"bias {name!r} is {_dtype_name(g.types.get(name))}, not float32.")
            )
        elif bias.ndim != 1 or bias.shape[0] != (_bias_channels(g, node) or bias.shape[0]):
            findings.append(g.finding("trt-bias-float", i, f"bias {name!r} has shape {bias.shape}; expected [C_out]."))
    return findings


def _check_bias_portable(g: Graph) -> list[Finding]:
    findings = []
    for i, node in g.each("Conv", "ConvTranspose", "Gemm"):
        name = g.input(node, 2)
        if not name:
            continue
        if name in g.constants:
            if g.types.get(name) != TensorProto.FLOAT:
                findings.append(
                    g.finding("bias-form", i, f"bias {name!r} is {_dtype_name(g.types.get(name))}, not float32.")
                )
            continue
        if g.producer_op(name) != "DequantizeLinear":
            findings.append(g.finding("bias-form", i, f"bias {name!r} is neither a constant nor a DequantizeLinear."))
            continue
        dq = g.producer[name][1]
        if g.types.get(dq.input[0]) != TensorProto.INT32 or dq.input[0] not in g.constants:
            findings.append(
                g.finding("bias-form", i, f"bias {name!r} dequantizes something other than int32 constants.")
            )
            continue
        expected = _bias_scale(g, node)
        scale = g.constants.get(g.input(dq, 1))
        if expected is not None and scale is not None:
            scale = scale.astype(np.float64).ravel()  # a per-tensor side broadcasts against a per-channel one
            if (scale.size != expected.size and 1 not in (scale.size, expected.size)) or not np.allclose(
                scale, expected, rtol=1e-6, atol=0
            ):
                findings.append(g.finding("bias-form", i, f"int32 bias scale is not s_x * s_w for {name!r}."))
    return findings


def _bias_scale(g: Graph, node: onnx.NodeProto) -> np.ndarray | None:
    """s_x · s_w (per output channel) of a Conv/Gemm whose data and weight come from DequantizeLinear."""
    scales = []
    for index in (0, 1):
        entry = g.producer.get(g.input(node, index))
        if entry is None or entry[1].op_type != "DequantizeLinear":
            return None
        scale = g.constants.get(g.input(entry[1], 1))
        if scale is None:
            return None
        scales.append(scale.astype(np.float64).ravel())
    return scales[0] * scales[1]


def _check_clip_constant(g: Graph) -> list[Finding]:
    return [
        g.finding("clip-constant", i, f"bound {name!r} is not an initializer or Constant.")
        for i, node in g.each("Clip")
        for name in node.input[1:3]
        if name and name not in g.constants
    ]


def _check_trt_clip_float(g: Graph) -> list[Finding]:
    findings = []
    for i, node in g.each("Clip"):
        dtype = g.types.get(node.input[0])
        if dtype is not None and dtype != TensorProto.FLOAT:
            findings.append(
                g.finding("trt-clip-float", i, f"clips a {_dtype_name(dtype)} tensor; TensorRT clips float tensors.")
            )
        for name in node.input[1:3]:
            bound = g.constants.get(name) if name else None
            if bound is None:
                continue
            if g.types.get(name) != TensorProto.FLOAT or bound.size != 1:
                findings.append(
                    g.finding(
                        "trt-clip-float",
                        i,
                        f"bound {name!r} is {_dtype_name(g.types.get(name))} of shape {bound.shape}; "
                        "TensorRT reads a float32 scalar.",
                    )
                )
    return findings


def _check_uint8(g: Graph) -> list[Finding]:
    graph = g.model.graph
    findings = [
        Finding("no-uint8", info.name, None, "is uint8; use int8 with zero point 0.")
        for info in [*graph.initializer, *graph.input, *graph.output]
        if (info.data_type if isinstance(info, TensorProto) else info.type.tensor_type.elem_type) == TensorProto.UINT8
    ]
    for i, node in enumerate(g.nodes):  # declared, inferred or (for Q) zero-point types of every node output
        if any(g.types.get(out) == TensorProto.UINT8 for out in node.output):
            findings.append(g.finding("no-uint8", i, "outputs uint8; use int8 with zero point 0."))
    return findings


def _check_trt_opset(g: Graph) -> list[Finding]:
    opsets = {o.domain: o.version for o in g.model.opset_import}
    version = opsets.get("", opsets.get("ai.onnx"))
    lo, hi = g.trt.opsets
    if version is not None and lo <= version <= hi:
        return []
    inside = [
        v.label for v in dict.fromkeys(TRT_VERSIONS.values()) if version and v.opsets[0] <= version <= v.opsets[1]
    ]
    return [
        Finding(
            "trt-opset",
            "opset_import",
            None,
            f"opset {version} is outside TensorRT {g.trt.label}'s documented {lo}-{hi}"
            + (f" (inside {', '.join(inside)})" if inside else "")
            + "; export with --opset 20 for every 10.x and 11.x.",
        )
    ]


def _check_trt_ops(g: Graph) -> list[Finding]:
    findings = []
    for i, node in enumerate(g.nodes):
        if node.domain not in ("", "ai.onnx"):
            findings.append(
                g.finding(
                    "trt-op-supported",
                    i,
                    f"{node.domain}::{node.op_type} has no onnx-tensorrt importer (it would need a TensorRT plugin).",
                )
            )
        elif node.op_type not in TRT_SUPPORTED_OPS:
            findings.append(
                g.finding(
                    "trt-op-supported",
                    i,
                    f"{node.op_type} is not an op fatq writes for TensorRT; check its operators.md row before relying "
                    "on it.",
                )
            )
        elif node.op_type in ("Pad", "Slice") and any(name and name not in g.constants for name in node.input[1:]):
            # the rows require `axes` to be an initializer; fatq writes pads/starts/ends/steps as constants too
            findings.append(
                g.finding("trt-op-supported", i, f"{node.op_type} takes its shape inputs from initializers.")
            )
        elif node.op_type == "MaxPool" and (
            len(_attr(node, "kernel_shape", [])) not in (2, 3) or any(d != 1 for d in _attr(node, "dilations", []))
        ):
            findings.append(g.finding("trt-op-supported", i, "MaxPool must be 2D or 3D with unit dilations."))
    return findings


def _check_ort_gemm_beta(g: Graph) -> list[Finding]:
    return [
        g.finding("ort-gemm-beta", i, f"Gemm with a bias has beta {_attr(node, 'beta', 1.0)}; ORT fuses beta = 1 only.")
        for i, node in g.each("Gemm")
        if g.input(node, 2) and float(_attr(node, "beta", 1.0)) != 1.0
    ]


# --- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One rule: id, the targets it applies to, a one-line description, its source and its check."""

    id: str
    targets: frozenset[str]
    description: str
    source: str
    check: Callable[[Graph], list[Finding]] = field(repr=False)
    severity: str = "error"


ALL = frozenset(TARGETS)
TRT = frozenset({"trt"})
PORTABLE = frozenset({"ort", "openvino"})

RULES: tuple[Rule, ...] = (
    Rule(
        "trt-dq-input-int8",
        TRT,
        "every DequantizeLinear input is int8 (TensorRT also takes FP8/INT4/FP4; fatq writes int8 only)",
        f"{IMPORTERS}, QuantDequantLinearHelper (the input goes straight to addDequantize; a zero point that is not "
        f"INT8/FP8/INT4 only draws a warning); {OPERATORS_MD} row DequantizeLinear (INT8, FP8, INT4; 10.15: + FP4); "
        "TensorRT C++ API IDequantizeLayer ('accepts a quantized type input'); public build logs 'only activation "
        "types allowed as input to this layer' (onnxruntime issue 14229, onnx-tensorrt issue 850)",
        _check_trt_dq_input,
    ),
    Rule(
        "dq-input-int8",
        PORTABLE,
        "every DequantizeLinear input is int8, or int32 for a Conv/Gemm bias",
        f"{DEPLOY}, 'ONNX Q/DQ conventions' and 'ONNX Runtime' (bias as int32 DQ or float constant); ONNX "
        "DequantizeLinear type constraints",
        _check_dq_input_portable,
    ),
    Rule(
        "trt-q-input-float",
        TRT,
        "every QuantizeLinear quantizes a float tensor",
        f"{OPERATORS_MD} row QuantizeLinear (FP32, FP16, BF16); operators.md note: INT8 is reached only by "
        "quantizing a higher-precision float type",
        _check_trt_q_input,
    ),
    Rule(
        "zero-point-int8",
        ALL,
        "every Q/DQ has a constant zero point of the quantized type (int8; int32 for a portable int32 bias DQ)",
        f"{IMPORTERS}, QuantDequantLinearHelper (the zero point's type picks the quantized type; UINT8 and other "
        "types fall back to INT8 with a warning); ONNX QuantizeLinear: no zero point means uint8; " + DEPLOY,
        _check_zero_point_type,
    ),
    Rule(
        "zero-point-zero",
        ALL,
        "every zero point is all zeros (symmetric quantization)",
        f"{IMPORTERS}, QuantDequantLinearHelper ('TensorRT only supports symmetric quantization', shiftIsAllZeros); "
        f"{OPERATORS_MD} rows QuantizeLinear/DequantizeLinear (zero point must be 0); {DEPLOY}",
        _check_zero_point_zero,
    ),
    Rule(
        "zero-point-count",
        ALL,
        "zero point and scale have the same number of elements",
        f"{IMPORTERS}, QuantDequantLinearHelper ('The scale and zero point must have the same volume'); ONNX "
        "QuantizeLinear/DequantizeLinear (same shape)",
        _check_zero_point_count,
    ),
    Rule(
        "scale-constant",
        ALL,
        "every Q/DQ scale is an initializer or a Constant",
        "TensorRT 8.6 operator docs, Dequantize ('The scale tensor must be a build-time constant'); "
        f"{IMPORTERS}, QuantDequantLinearHelper (positivity is checked only for constant scales); {DEPLOY}",
        _check_scale_constant,
    ),
    Rule(
        "scale-float32",
        ALL,
        "every Q/DQ scale is float32",
        f"{IMPORTERS}, QuantDequantLinearHelper (only FP32/FP16/BF16 scales pass the positivity check, and in a "
        "strongly typed network a DequantizeLayer outputs the scale's type, so float32 keeps the graph float32); ONNX "
        "Q/DQ scale types (no float64)",
        _check_scale_float32,
    ),
    Rule(
        "scale-positive",
        ALL,
        "every scale is finite and strictly positive",
        f"{IMPORTERS}, QuantDequantLinearHelper ('Scale coefficients must all be positive'); TensorRT C++ API "
        f"IQuantizeLayer/IDequantizeLayer ('strictly positive values'); {DEPLOY}",
        _check_scale_positive,
    ),
    Rule(
        "per-channel-axis",
        ALL,
        "a vector scale is 1-D, on a constant weight, with an explicit axis of its output channels and one scale "
        "per channel; activations are per-tensor",
        f"{IMPORTERS}, QuantDequantLinearHelper (per-channel assumes weights; 'The number of scales is not equal to "
        "the number of output channels'; default axis differs between 10.1-GA and later 10.x); " + DEPLOY,
        _check_per_channel,
    ),
    Rule(
        "weighted-inputs-dequantized",
        ALL,
        "in a quantized graph the data and weight inputs of Conv/ConvTranspose/Gemm/MatMul come from DequantizeLinear",
        "NVIDIA TensorRT docs, Working with Quantized Types > Explicit Quantization (Q/DQ on the inputs of "
        f"weighted ops); ONNX Runtime QDQ selectors (DQ -> op -> Q); {DEPLOY}",
        _check_weighted_inputs,
    ),
    Rule(
        "trt-bias-float",
        TRT,
        "a Conv/ConvTranspose/Gemm bias is a float32 constant [C_out], never a DequantizeLinear",
        f"{DEPLOY} (corrected 2026-12-01); {IMPORTERS}, Conv ('The bias tensor is required to be an initializer', "
        "1-D, C_out); NVIDIA ModelOpt ONNX quantization keeps biases float (QuantizeBias: False)",
        _check_trt_bias,
    ),
    Rule(
        "bias-form",
        PORTABLE,
        "a Conv/Gemm bias is a float32 constant or a DequantizeLinear of int32 constants with scale s_x * s_w",
        f"{DEPLOY}, 'ONNX Runtime' (qdq_selectors; a float bias is quantized by ORT itself, onnxruntime issue 22889)",
        _check_bias_portable,
    ),
    Rule(
        "clip-constant",
        ALL,
        "Clip min/max are initializers or Constants",
        f"{IMPORTERS}, Clip ('Clip min value must be an initializer!'; a tensor bound turns the Clip into "
        f"elementwise max/min instead of one activation layer); {DEPLOY}",
        _check_clip_constant,
    ),
    Rule(
        "trt-clip-float",
        TRT,
        "Clip reads a float32 tensor and float32 scalar bounds (no integer Clip between Q and DQ)",
        f"{ONNX_TRT} importerUtils.cpp getSingleValueAsFloat (FLOAT/FLOAT16/BFLOAT16 only); {IMPORTERS}, Clip "
        f"(elementwise path: float, INT32, INT64 inputs only); {OPERATORS_MD} row Clip (FP32, FP16, BF16)",
        _check_trt_clip_float,
    ),
    Rule(
        "no-uint8",
        ALL,
        "no uint8 tensor, constant or Cast anywhere",
        f"{IMPORTERS}, QuantDequantLinearHelper and Clip (notInvalidType UINT8); {OPERATORS_MD} note 'UINT8 is only "
        f"supported as network input or output tensor types'; {DEPLOY} ('never emit uint8')",
        _check_uint8,
    ),
    Rule(
        "trt-opset",
        TRT,
        "the default-domain opset is inside the chosen TensorRT release's documented range",
        "; ".join(dict.fromkeys(v.source for v in TRT_VERSIONS.values()))
        + f"; {ONNX_TRT} ModelImporter.cpp importModel (only warns below opset 7: the upper bound is documentation)",
        _check_trt_opset,
        "warning",
    ),
    Rule(
        "trt-op-supported",
        TRT,
        "every op is one fatq writes and onnx-tensorrt supports, within its row's restrictions (MaxPool 2D/3D, unit "
        "dilations; Pad/Slice shape inputs constant)",
        f"{OPERATORS_MD}, Operator Support Matrix rows of {', '.join(TRT_SUPPORTED_OPS)} (10.0/10.1 and 10.15)",
        _check_trt_ops,
    ),
    Rule(
        "ort-gemm-beta",
        frozenset({"ort"}),
        "a Gemm with a bias has beta = 1",
        f"{DEPLOY}, 'ONNX Runtime' (qdq_selectors: Gemm with bias needs beta = 1)",
        _check_ort_gemm_beta,
    ),
)
RULES_BY_ID = {rule.id: rule for rule in RULES}


def rules_for(target: str) -> tuple[Rule, ...]:
    """The rules of :data:`RULES` that apply to ``target``."""
    if target not in TARGETS:
        raise FatqError(f"lint target must be one of {', '.join(TARGETS)}, got {target!r}.")
    return tuple(rule for rule in RULES if target in rule.targets)


def lint(model: onnx.ModelProto, target: str, trt_version: str = DEFAULT_TRT_VERSION) -> list[Finding]:
    """Every finding of the rules for ``target`` on ``model``, in rule order then node order.

    Args:
        model: an ONNX model (its top-level graph is checked).
        target: "trt", "ort" or "openvino".
        trt_version: the TensorRT release line for ``trt-opset`` and the DequantizeLinear types
            ("10.0", "10.1", "10.15", "11" or a full version of those lines).
    """
    rules = rules_for(target)
    g = Graph(model, target, trt_version_info(trt_version))
    return [finding for rule in rules for finding in rule.check(g)]


def assert_clean(model: onnx.ModelProto, target: str, trt_version: str = DEFAULT_TRT_VERSION) -> list[Finding]:
    """Raise :class:`FatqError` naming the first error findings; return the warnings (for an exporter).

    An exporter calls this before writing its file, so a file that breaks a rule is never written.
    """
    findings = lint(model, target, trt_version)
    errors = [f for f in findings if RULES_BY_ID[f.rule].severity == "error"]
    if errors:
        shown = "; ".join(f"[{f.rule}] {f}" for f in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise FatqError(f"refusing a graph that breaks the {TARGET_NAMES[target]} rules: {shown}{more}.")
    return findings


def load_model(path: str | Path) -> onnx.ModelProto:
    """``onnx.load`` with one-sentence errors."""
    try:
        model = onnx.load(str(path))
    except (OSError, ValueError) as exc:
        raise FatqError(f"cannot read {path} as ONNX ({type(exc).__name__}).") from None
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError has no stable import path
        raise FatqError(f"{path} is not an ONNX model ({type(exc).__name__}).") from None
    if not model.graph.node:
        raise FatqError(f"{path} is not an ONNX model (no graph).")
    check_structure(model, path)
    return model


def check_structure(model: onnx.ModelProto, path: str | Path) -> None:
    """FatqError with onnx.checker's first line when the graph is malformed (a node without its inputs,
    an initializer whose bytes do not fit its dims, an unknown standard op): engines given such a file
    fail in their own ways (OpenVINO 2026.4 crashes on a Conv without inputs)."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0].rstrip(".")
        raise FatqError(f"{path} is not a valid ONNX model: {first}.") from None


def format_findings(findings: list[Finding], target: str) -> list[str]:
    """Lines of a report: one heading per rule (id, severity, description, source), then its findings."""
    lines = []
    for rule in rules_for(target):
        own = [f for f in findings if f.rule == rule.id]
        if not own:
            continue
        lines.append(f"[{rule.id}] {rule.severity}, {len(own)} finding(s): {rule.description}")
        lines.append(f"  source: {rule.source}")
        lines += [f"  {finding}" for finding in own]
    return lines


def main_lint(path: str | Path, target: str, trt_version: str = DEFAULT_TRT_VERSION) -> int:
    """Lint ``path`` for ``target``; print the findings grouped by rule; 1 on any finding, 0 when clean.

    Raises:
        FatqError: unreadable file, unknown target or TensorRT version (the CLI exits 2).
    """
    rules_for(target)
    trt = trt_version_info(trt_version)
    findings = lint(load_model(path), target, trt_version)
    for line in format_findings(findings, target):
        print(line)
    what = f"{TARGET_NAMES[target]} rules" + (f" (TensorRT {trt.label})" if target == "trt" else "")
    summary = f"{path}: {len(findings)} finding(s) against the {what}" if findings else f"{path}: clean ({what})"
    print(summary, file=sys.stderr)
    return 1 if findings else 0
