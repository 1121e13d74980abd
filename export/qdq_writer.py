"""Write lowered deploy graphs as QDQ int8 ONNX (``write_qdq``; float files: :mod:`export.float_writer`).

Written directly from the graph rather than through ``torch.onnx``: its fake-quant export is
broken for narrow ranges and under dynamo (DEPLOY.md), and direct writing places every Q/DQ
exactly and takes well under a second.

This is the TensorRT file (``--format onnx``, :mod:`export.formats`), and ONNX Runtime and OpenVINO read it
too. QDQ conventions (DEPLOY.md, corrected 2026-12-01; :mod:`export.lint_rules` target "trt"): symmetric
int8 with zero point 0 everywhere (one per scale), no uint8; every DequantizeLinear reads int8;
per-channel (axis 0) weight scales, per-tensor activation scales, float32 constants; Conv/Gemm bias as
a float32 constant (:func:`float_bias`), never a DequantizeLinear of int32, which TensorRT's
IDequantizeLayer cannot take. ONNX Runtime derives an int32 bias q_b = round(b / (s_x · s_w,c)) from it
and still fuses DQ → Conv → Q into QLinearConv; the classifier Gemm it runs in float. b-bit activation ranges
are enforced by a constant float32 Clip.

Patterns, with s the scale of the quantizer and [lo, hi] its (relu/clip-narrowed) integer range:

- quantizer on a float tensor (the image, a residual Add, the pooled features):
  ``Clip(lo·s, hi·s) → Q(s)``. Clamping before rounding is exact: rounding is monotone and
  round(fl(hi·s) / s) = hi for |hi| ≤ 127.
- conv/linear fused with its output quantizer (see :mod:`export.lower`):
  ``DQ(x), DQ(W), DQ(b) → Conv → Q(s) → DQ → Clip(lo·s, hi·s) → Q(s)``. The Conv feeds a Q
  directly, the condition ORT needs to fuse it into one integer kernel (a Relu or Clip between
  Conv and Q keeps a float Conv on dequantized inputs — the reason ORT's own ``quantize_static``
  with QInt8 symmetric activations and no pre-processing ran at 0.48× FP32 throughput, where its
  documented U8S8 form with pre-processing ran at 1.99×, DEPLOY.md). The trailing DQ → Clip → Q
  is elementwise and equals the model's clamp(round(relu(y) / s), 0, m) bit for bit, since the first Q's saturation to
  [-128, 127] never cuts inside [lo, hi]. It also keeps signed 8-bit quantizers exact: they use
  [-127, 127] while a bare Q saturates to [-128, 127].
  ``range_clip="int8"`` writes the QCDQ form ``Conv → Q(s) → Clip_int8(lo, hi) → DQ`` instead
  (same values; fewer nodes), for a benchmark only: TensorRT's Clip takes no int8 (lint rule
  ``trt-clip-float``), so the exporter never writes it.
- max-pool / flatten / option-A shortcut of a quantized tensor: ``DQ → op → Q(s)`` (ORT runs
  the op on int8 and drops the pair).
- residual Add: both inputs through Q/DQ (``branch_quantizer``, ``shortcut_quantizer``), Add and
  the following ReLU in float.

TensorRT (not testable here): TensorRT prefers Q/DQ on conv inputs and the Add's identity
input, with Conv+BN+Add+ReLU fused and no Q between Conv and Add. FAT models quantize the
branch output (``branch_quantizer``) before the Add, so exactness requires a Q there; TensorRT
then runs the Conv with an int8 output and the Add as a separate pointwise layer. The DQ → Clip
→ Q islands are pointwise int8 → int8 layers it can fuse into the preceding conv's epilogue or
run as one kernel.

Opset: :data:`DEFAULT_OPSET` = 20 (IR version 9), the newest opset onnx-tensorrt's docs/operators.md
documents for TensorRT 10.0/10.1 (10.15: 9–24; 11.x: 9–25, NVIDIA's ONNX opset guide); ONNX Runtime
1.32 and OpenVINO 2026.4 load it (tested here). 13..21 are selectable (13: per-channel
DequantizeLinear); the lint's ``trt-opset`` rule warns outside a TensorRT release's documented range.
"""

from __future__ import annotations

import numpy as np
import onnx

from export.deploy_graph import INTEGER_PRESERVING_OPS, DeployGraph, DeployNode, bias_arithmetic, tensor_quant
from export.onnx_builder import (
    DEFAULT_OPSET,
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxBuilder,
    conv_attrs,
    emit_float_op,
    make_model,
    output_classes,
    range_clip_bounds,
    refuse_uint8_ranges,
    saturation_is_range,
    scalar_or_vector,
)
from fatq.errors import FatqError

# Deploy ops that read their inputs as float: a quantized tensor read only by these needs no int8 form.
FLOAT_READERS = frozenset({"add", "relu", "clip", "global_avgpool"})


def weight_initializers(b: OnnxBuilder, node: DeployNode) -> tuple[str, str, str]:
    """(int8 weight, weight scale, int8 zero points of the scale's count) initializers of a qconv/qlinear node."""
    params = node.params
    w_scale = scalar_or_vector(params["weight_scale"])
    return (
        b.initializer(f"{node.name}.weight", params["weight"].astype(np.int8)),
        b.initializer(f"{node.name}.weight_scale", w_scale),
        b.constant(np.zeros_like(w_scale), np.int8),
    )


def bias_step(node: DeployNode) -> np.ndarray:
    """float32(s_x · s_w,c) of a qconv/qlinear node: one step of its int32 accumulator, [C_out] float32."""
    return np.float32(node.attrs["input_scale"]) * node.params["weight_scale"].astype(np.float32)


def float_bias(node: DeployNode, arithmetic: str) -> np.ndarray:
    """The float32 bias a QDQ file stores for a qconv/qlinear node, [C_out].

    "float" (files for TensorRT and OpenVINO, :mod:`export.reference`): the layer's folded bias as
    trained, which those engines add to the dequantized accumulator. "int32": float32(q_b ·
    float32(s_x · s_w,c)), the int32 bias rounded once (computed in float64, where it is exact);
    ONNX Runtime re-derives round(b / (s_x · s_w,c)) = q_b from it (its WeightBiasQuantization),
    since the float32 rounding moves b by at most 2^-24 · |b| < half a step while |q_b| < 2^23.
    """
    if arithmetic == "float":
        return node.params["bias"].astype(np.float32)
    step = bias_step(node).astype(np.float64)
    return (node.params["bias_int32"].astype(np.float64) * step).astype(np.float32)


def dequantized_weights(b: OnnxBuilder, node: DeployNode, arithmetic: str, offset: float = 0.0) -> tuple[str, str]:
    """DequantizeLinear of a qconv/qlinear node's int8 weight (per channel, axis 0), and its bias as a
    float32 constant [C_out] (:func:`float_bias` of ``arithmetic``, plus ``offset`` in float32 when non-zero:
    the OpenVINO file's shifted branch quantizers, :mod:`export.openvino_writer`).

    Never a DequantizeLinear of int32: TensorRT's IDequantizeLayer takes INT8/FP8/INT4 inputs only
    (onnx-tensorrt onnxOpImporters.cpp QuantDequantLinearHelper; DEPLOY.md, corrected), and ONNX
    Runtime 1.32's fused Gemm reads such a bias wrongly on AVX2 CPUs (tests/engines/test_ort_int32_bias.py).
    """
    weight, w_scale, w_zero = weight_initializers(b, node)
    per_channel = {"axis": 0} if np.ndim(scalar_or_vector(node.params["weight_scale"])) else {}
    w = b.node("DequantizeLinear", [weight, w_scale, w_zero], None, f"{node.name}/weight", **per_channel)
    bias = float_bias(node, arithmetic)
    if offset:
        bias = (bias + np.float32(offset)).astype(np.float32)
    return w, b.initializer(f"{node.name}.bias", bias)


def int32_bias_dequantized_weights(b: OnnxBuilder, node: DeployNode) -> tuple[str, str]:
    """The onnx-ort file's form (ONNX Runtime only): DequantizeLinear of the int8 weight and of the int32
    bias at scale s_x · s_w,c (int32 zero points), which ONNX Runtime fuses with the layer into QGemm."""
    weight, w_scale, w_zero = weight_initializers(b, node)
    per_channel = {"axis": 0} if np.ndim(scalar_or_vector(node.params["weight_scale"])) else {}
    w = b.node("DequantizeLinear", [weight, w_scale, w_zero], None, f"{node.name}/weight", **per_channel)
    step = scalar_or_vector(bias_step(node))
    bias_inputs = [b.initializer(f"{node.name}.bias", node.params["bias_int32"].astype(np.int32))]
    bias_inputs += [b.initializer(f"{node.name}.bias_scale", step), b.constant(np.zeros_like(step), np.int32)]
    axis = {"axis": 0} if np.ndim(step) else {}
    return w, b.node("DequantizeLinear", bias_inputs, None, f"{node.name}/bias", **axis)


class QdqWriter:
    """Lowered (integer) graph -> QDQ ONNX nodes."""

    def __init__(self, graph: DeployGraph, builder: OnnxBuilder, range_clip: str):
        if range_clip not in ("float", "int8"):
            raise FatqError(f"range_clip must be 'float' or 'int8', got {range_clip!r}.")
        self.graph = graph
        self.b = builder
        self.range_clip = range_clip
        self.quant: dict[str, dict] = {}  # deploy tensor -> stored {scale, qmin, qmax} of its int8 ONNX tensor
        self.copies: dict[str, list[str]] = {}  # deploy tensor -> int8 ONNX tensors not yet dequantized
        self.readers = graph.consumers()
        self.nudges: dict[tuple, int] = {}  # (float tensor, scale, qmin, qmax) -> Clip → Q copies made
        self.float_name: dict[str, str] = {graph.input_name: INPUT_NAME}

    def as_float(self, tensor: str, name: str) -> str:
        """A float view of a deploy tensor: for an int8 one, a DequantizeLinear of its own Q copy."""
        if tensor in self.copies:
            return self.b.dequantize(self.copies[tensor].pop(0), self.quant[tensor]["scale"], name)
        return self.float_name[tensor]

    def int8_output(self, x: str, quant: dict, output: str, name: str, already_quantized: bool) -> None:
        """Finish the quantized tensor ``output`` with its range enforced (see the module docstring).

        ORT converts an int8 Q → DQ pair to its uint8 kernels (which the fused integer convs
        need on x86) only where the Q feeds a single DequantizeLinear, and it merges identical
        nodes (common-subexpression elimination). So a tensor with several readers gets one
        Q per reader, each behind a Clip whose bounds differ by an ulp (:func:`clip_bounds`),
        all fed by one clipped float tensor; the first Q carries the tensor's name.
        """
        b, scale = self.b, quant["scale"]
        stored = tensor_quant(quant)  # with expand j: the integers times j at scale s / j
        readers = max(1, len(self.readers.get(output, [])))
        names = [output] + [f"{output}#{i}" for i in range(1, readers)]
        if self.range_clip == "int8":
            q = x if already_quantized else b.quantize(x, scale, name)
            for out in names:
                if stored["scale"] == scale:
                    b.clip(q, quant["qmin"], quant["qmax"], np.int8, f"{name}/range", out)
                else:
                    clipped = b.clip(q, quant["qmin"], quant["qmax"], np.int8, f"{name}/range")
                    b.quantize(b.dequantize(clipped, scale, name), stored["scale"], name, out)
        elif readers == 1 and saturation_is_range(quant) and not already_quantized:
            b.quantize(x, stored["scale"], name, output)  # int8 saturation is the range
        else:
            x = b.dequantize(x, scale, name) if already_quantized else x
            key = (x, stored["scale"], quant["qmin"], quant["qmax"])
            first = self.nudges.get(key, 0)  # an identical quantizer of the same tensor exists
            self.nudges[key] = first + readers
            clipped = b.clip(x, *range_clip_bounds(quant, first), np.float32, f"{name}/range")
            for copy, out in enumerate(names):
                source = (
                    clipped
                    if copy == 0
                    else b.clip(clipped, *range_clip_bounds(quant, first + copy), np.float32, f"{name}/copy")
                )
                b.quantize(source, stored["scale"], name, out)
        self.quant[output] = stored
        self.copies[output] = names

    def requantize(self, x: str, quant: dict, output: str, name: str) -> None:
        """Q(s) of a float tensor already holding integers · s in range (after MaxPool, Flatten...).

        ORT runs DQ → MaxPool → Q on int8 only if the Q follows directly, so a single reader gets
        a bare Q; several readers need distinct Clip → Q copies (see :meth:`int8_output`).
        """
        if len(self.readers.get(output, [])) > 1:
            self.int8_output(x, quant, output, name, already_quantized=False)
            return
        stored = tensor_quant(quant)
        self.b.quantize(x, stored["scale"], name, output)
        self.quant[output] = stored
        self.copies[output] = [output]

    def weighted(self, node: DeployNode) -> None:
        b, attrs = self.b, node.attrs
        x = self.as_float(node.inputs[0], node.name)
        w, bias = dequantized_weights(b, node, bias_arithmetic(self.graph), self.bias_offset(node))
        out_quant = attrs["out_quant"]
        y_name = None if out_quant is not None else self.float_output(node)
        if node.op == "qconv":
            y = b.node("Conv", [x, w, bias], y_name, node.name, **conv_attrs(attrs))
        else:
            y = b.node("Gemm", [x, w, bias], y_name, node.name, transB=1)
        if out_quant is None:
            self.float_name[node.output] = y
            return
        self.quantized_output(y, node)

    def bias_offset(self, node: DeployNode) -> float:
        """A constant this file adds to a qconv/qlinear node's float bias: none here (the OpenVINO writer shifts
        its residual branch quantizers)."""
        return 0.0

    def quantized_output(self, y: str, node: DeployNode) -> None:
        """Quantize a conv/linear's float output ``y`` with its fused output quantizer."""
        b, out_quant = self.b, node.attrs["out_quant"]
        readers = self.readers.get(node.output, [])
        if saturation_is_range(out_quant) and len(readers) == 1 and readers[0].op not in FLOAT_READERS:
            # int8 saturation is the range: the conv's Q is the tensor (one reader, no copies needed)
            b.quantize(y, out_quant["scale"], f"{node.name}/out", node.output)
            self.quant[node.output] = tensor_quant(out_quant)
            self.copies[node.output] = [node.output]
            return
        q = b.quantize(y, out_quant["scale"], f"{node.name}/out")
        if all(reader.op in FLOAT_READERS for reader in self.readers.get(node.output, [])):
            # Only float ops (a residual Add) read it: the clipped dequantized values are exactly
            # integers · s already, and a second Q → DQ round trip would add two passes for nothing.
            # (The OpenVINO file writes full-range ones otherwise, export/openvino_writer.py: a bare Q → DQ here
            # would let openvino 2026.4.1 fuse Conv → Q → DQ → Add → ReLU → FakeQuantize into one int8 conv that
            # drops the branch's rounding.)
            lo, hi = range_clip_bounds(out_quant)
            dq = b.dequantize(q, out_quant["scale"], node.name)
            self.float_name[node.output] = b.clip(dq, lo, hi, np.float32, f"{node.name}/range", node.output)
            return
        self.int8_output(q, out_quant, node.output, node.name, already_quantized=True)

    def float_output(self, node: DeployNode) -> str | None:
        return OUTPUT_NAME if node.output == self.graph.output_name else None

    def run(self) -> None:
        for node in self.graph.nodes:
            if node.op in ("qconv", "qlinear"):
                self.weighted(node)
            elif node.op == "quantize":
                x = self.as_float(node.inputs[0], node.name)
                self.int8_output(x, node.attrs["out_quant"], node.output, node.name, already_quantized=False)
            elif node.op in INTEGER_PRESERVING_OPS and node.attrs.get("out_quant") is not None:
                x = self.as_float(node.inputs[0], node.name)
                y = emit_float_op(self.b, node, [x], None)
                self.requantize(y, node.attrs["out_quant"], node.output, f"{node.name}/requant")
            elif node.op in ("conv", "linear"):
                raise FatqError(
                    f"{node.name}: a float {node.op} inside a quantized graph is not supported by the QDQ writer."
                )
            else:
                inputs = [self.as_float(t, node.name) for t in node.inputs]
                self.float_name[node.output] = emit_float_op(self.b, node, inputs, self.float_output(node))
        if self.graph.output_name in self.copies:
            raise FatqError("the graph output is quantized; expected float logits.")


def write_qdq(
    graph: DeployGraph, opset: int = DEFAULT_OPSET, range_clip: str = "float", metadata: dict | None = None
) -> onnx.ModelProto:
    """QDQ int8 ONNX of an integer-dialect graph (:func:`export.lower.lower`).

    Args:
        graph: the lowered graph.
        opset: ONNX opset (13..21).
        range_clip: "float" (Clip before each Q; default) or "int8" (QCDQ integer Clip).
        metadata: string-valued (or JSON-able) ``metadata_props``.

    Returns:
        The model; quantized tensors keep their deploy-graph names (int8), the input is
        "input" float32 [batch, C, H, W] and the output "logits" float32 [batch, classes].
    """
    if graph.dialect != "integer":
        raise FatqError("write_qdq needs a lowered (integer) graph; call export.lower.lower first.")
    refuse_uint8_ranges(graph, "the QDQ file (--format onnx, the TensorRT file)")
    b = OnnxBuilder(opset)
    QdqWriter(graph, b, range_clip).run()
    return make_model(graph, b, metadata, output_classes(graph))
