"""The ONNX building blocks every fatq writer shares (QDQ, float, onnx-ort, onnx-openvino).

:class:`OnnxBuilder` accumulates nodes and initializers with unique names and writes the Q/DQ
and Clip patterns; :func:`emit_float_op` writes the float ops of a deploy graph;
:func:`make_model` wraps a builder's nodes into the model every writer returns (input
:data:`INPUT_NAME` float32 [batch, C, H, W], output :data:`OUTPUT_NAME` float32 [batch, classes],
provenance in ``metadata_props``). Opset range and default: see :mod:`export.qdq_writer`.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.deploy_graph import DeployGraph, DeployNode, tensor_quant
from fatq.errors import FatqError
from fatq.provenance import __version__

DEFAULT_OPSET = 20  # the newest opset TensorRT 10.0/10.1 document (see export.qdq_writer)
MIN_OPSET = 13
MAX_OPSET = 21
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INT32_MAX = 2**31 - 1


def scalar_or_vector(values: np.ndarray) -> np.ndarray:
    """A per-channel array collapses to a scalar when all channels agree (per-tensor)."""
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    return np.float32(values[0]) if np.all(values == values[0]) else values


class OnnxBuilder:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, opset: int):
        if not MIN_OPSET <= opset <= MAX_OPSET:
            raise FatqError(f"opset must be in {MIN_OPSET}..{MAX_OPSET}, got {opset}.")
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.names: set[str] = set()
        self.constants: dict[tuple, str] = {}

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def initializer(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def constant(self, value, dtype) -> str:
        """A shared scalar/vector initializer (zero points, clip bounds, slice parameters)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            self.constants[key] = self.initializer("const", array)
        return self.constants[key]

    def node(self, op: str, inputs: list[str], output: str | None, name: str, **attrs) -> str:
        # generated names contain "/", deploy-graph tensor names never do: no collisions
        output = output if output is not None else self.fresh(f"{name}/{op}")
        self.names.add(output)
        self.nodes.append(helper.make_node(op, inputs, [output], name=self.fresh(f"{name}/{op}"), **attrs))
        return output

    # --- Q/DQ helpers ----------------------------------------------------------------------

    def quantize(self, x: str, scale: float, name: str, output: str | None = None) -> str:
        scale_name = self.constant(np.float32(scale), np.float32)
        return self.node("QuantizeLinear", [x, scale_name, self.constant(0, np.int8)], output, name)

    def dequantize(self, q: str, scale: float, name: str) -> str:
        scale_name = self.constant(np.float32(scale), np.float32)
        return self.node("DequantizeLinear", [q, scale_name, self.constant(0, np.int8)], None, name)

    def rename(self, tensor: str, name: str) -> None:
        """Give the tensor a node just wrote the name ``name`` (nothing reads it yet)."""
        for node in self.nodes:
            if tensor in node.input:
                raise FatqError(f"cannot rename {tensor!r}: node {node.name!r} already reads it.")
        for node in self.nodes:
            for i, out in enumerate(node.output):
                if out == tensor:
                    node.output[i] = name
                    return
        raise FatqError(f"no node writes {tensor!r}.")

    def clip(self, x: str, lo, hi, dtype, name: str, output: str | None = None) -> str:
        return self.node("Clip", [x, self.constant(lo, dtype), self.constant(hi, dtype)], output, name)


def clip_bounds(quant: dict, nudge: int = 0) -> tuple[np.float32, np.float32]:
    """Float bounds [lo·s, hi·s] in float32 (the products the model's rounding maps back to lo, hi).

    ``nudge`` widens them by that many float32 ulps: still exact (a value within a few ulps of
    hi·s rounds to hi), and distinct constants keep ONNX Runtime's common-subexpression
    elimination from merging the Clip → Q copies a tensor with several readers needs.
    """
    scale = np.float32(quant["scale"])
    lo, hi = np.float32(quant["qmin"]) * scale, np.float32(quant["qmax"]) * scale
    for _ in range(nudge):
        lo, hi = np.nextafter(lo, np.float32(-np.inf)), np.nextafter(hi, np.float32(np.inf))
    return lo, hi


def saturation_is_range(quant: dict) -> bool:
    """Whether a quantizer's stored integers span all 256 values of a byte (the full-range 8-bit quantizers of
    QuantSpec target "cpu"): [-128, 127] in int8 with zero point 0 (in the ONNX Runtime file uint8 with zero
    point 128), or [0, 255] in uint8 (files for engines with uint8 only, :func:`refuse_uint8_ranges`). The
    8-bit container's own saturation is then its clamp and no Clip is written."""
    stored = tensor_quant(quant)
    return stored["qmax"] - stored["qmin"] == 255


def needs_uint8(quant: dict) -> bool:
    """Whether a quantizer's stored integers go beyond int8 ([0, 255]: QuantSpec ``full_range_8bit``)."""
    return tensor_quant(quant)["qmax"] > 127


def refuse_uint8_ranges(graph, file: str) -> None:
    """FatqError if a quantizer of ``graph`` needs uint8 (:func:`needs_uint8`): ``file``, an int8-only file,
    cannot hold it."""
    for node in graph.nodes:
        quant = node.attrs.get("out_quant")
        if quant is not None and needs_uint8(quant):
            raise FatqError(
                f"{node.output} uses the 256 uint8 levels [0, 255] (a --target cpu model: every 8-bit quantizer "
                f"full range), which {file} cannot hold (int8 only); export it with --format onnx-ort or "
                "--format onnx-openvino."
            )


def range_clip_bounds(quant: dict, copy: int = 0) -> tuple[np.float32, np.float32]:
    """Bounds of the float Clip that enforces a quantizer's range before its QuantizeLinear.

    One float32 ulp outside [lo·s, hi·s] (plus ``copy`` more, see :func:`clip_bounds`): the same
    integers after rounding, but openvino 2026.4.1 merges a Clip whose bounds are exactly the grid's
    with the Q → DQ pair into one 255-level FakeQuantize over [−127·s, 127·s], which it computes
    wrongly — measured on the stem's requantized image of a ResNet-20 W4A4: 0.47 % of the integers,
    all the saturated 127s, came out as 126. With the bounds an ulp wider every integer matched.
    """
    return clip_bounds(quant, nudge=1 + copy)


def conv_attrs(attrs: dict) -> dict:
    ph, pw = attrs["padding"]
    return {
        "kernel_shape": list(attrs["kernel"]),
        "strides": list(attrs["stride"]),
        "pads": [ph, pw, ph, pw],
        "dilations": list(attrs["dilation"]),
        "group": int(attrs["groups"]),
    }


def emit_float_op(b: OnnxBuilder, node: DeployNode, inputs: list[str], output: str | None) -> str:
    """Float ops shared by both writers."""
    op, attrs = node.op, node.attrs
    if op == "relu":
        return b.node("Relu", inputs, output, node.name)
    if op == "clip":
        return b.clip(inputs[0], attrs["min"], attrs["max"], np.float32, node.name, output)
    if op == "add":
        return b.node("Add", inputs, output, node.name)
    if op == "global_avgpool":
        return b.node("GlobalAveragePool", inputs, output, node.name)
    if op == "flatten":
        return b.node("Flatten", inputs, output, node.name, axis=1)
    if op == "maxpool":
        ph, pw = attrs["padding"]
        return b.node(
            "MaxPool",
            inputs,
            output,
            node.name,
            kernel_shape=list(attrs["kernel"]),
            strides=list(attrs["stride"]),
            pads=[ph, pw, ph, pw],
            dilations=list(attrs["dilation"]),
            ceil_mode=int(attrs["ceil_mode"]),
        )
    if op == "subsample_pad":
        every_other = b.node(
            "Slice",
            [
                inputs[0],
                b.constant([0, 0], np.int64),
                b.constant([INT32_MAX, INT32_MAX], np.int64),
                b.constant([2, 3], np.int64),
                b.constant([2, 2], np.int64),
            ],
            None,
            f"{node.name}/subsample",
        )
        pad = attrs["pad"]
        return b.node("Pad", [every_other, b.constant([0, pad, 0, 0, 0, pad, 0, 0], np.int64)], output, node.name)
    if op == "pad_channels":
        return b.node("Pad", [inputs[0], b.constant([0, 0, 0, 0, 0, attrs["pad"], 0, 0], np.int64)], output, node.name)
    raise FatqError(f"the ONNX writer cannot write op {op!r} (node {node.name!r}).")


def make_model(
    graph: DeployGraph, b: OnnxBuilder, metadata: dict | None, num_classes: int, domains: dict[str, int] | None = None
) -> onnx.ModelProto:
    """The ONNX model of ``b``'s nodes; ``domains`` = {custom op domain: its opset version}."""
    c, h, w = graph.input_shape
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", c, h, w])]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", num_classes])]
    onnx_graph = helper.make_graph(b.nodes, graph.meta.get("arch", "fatq_model"), inputs, outputs, b.initializers)
    opset = [helper.make_opsetid("", b.opset)]
    model = helper.make_model(
        onnx_graph,
        opset_imports=opset + [helper.make_opsetid(domain, version) for domain, version in (domains or {}).items()],
        producer_name="fatq",
        producer_version=__version__,
        ir_version=helper.find_min_ir_version_for(opset),  # custom domains have no IR version to ask for
    )
    set_metadata(model, metadata or {})
    return model


def output_classes(graph: DeployGraph) -> int:
    last = graph.producers()[graph.output_name]
    return int(last.params["weight"].shape[0]) if "weight" in last.params else int(graph.meta.get("num_classes", 0))


def set_metadata(model: onnx.ModelProto, metadata: dict) -> None:
    """Replace ``model.metadata_props`` with ``metadata`` (non-strings JSON-encoded)."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key = str(key)
        entry.value = value if isinstance(value, str) else json.dumps(value)


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """``metadata_props`` as a dict of strings."""
    return {entry.key: entry.value for entry in model.metadata_props}
