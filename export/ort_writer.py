"""Write an integer deploy graph as an int8 ONNX model for ONNX Runtime's CPU kernels (``--format onnx-ort``).

Why a second int8 file: the portable QDQ file (:mod:`export.qdq_writer`) follows the rules
TensorRT imposes (DEPLOY.md: symmetric int8, zero point 0, no uint8). Under those rules a b-bit
range such as [0, 15] can only be enforced by a float ``DequantizeLinear → Clip → QuantizeLinear``
after each fused conv, and ONNX Runtime runs that as three float passes over the tensor; with
the float residual Adds they made the portable ResNet-20 W4A4 slower than its FP32 twin in
ONNX Runtime (``benchmarks/ort_profile.py``). This file computes the same integers with the ops
ONNX Runtime runs natively on uint8 (its "QOperator" form):

- every quantized tensor is **uint8 with zero point −qmin** (times j, below), so the integer
  qmin is the byte 0 and a kernel's saturation at 0 enforces the lower end of the range;
- a conv is a ``QLinearConv`` (output scale s, zero point −qmin: the same integer kernel ONNX
  Runtime fuses from the portable file, with the same scales and int32 bias), then a uint8
  ``Clip(0, qmax − qmin)`` for the upper end, then, where :func:`export.lower.lower` stores the
  integers times j at scale s / j, a uint8 ``Mul`` by j — two byte-wide passes (about a seventh
  of the time of the float dequantize → clip → quantize chains, ``benchmarks/ort_profile.py``);
- a quantizer reading a residual Add is a ``com.microsoft.QLinearAdd`` of the two uint8 inputs
  (output zero point −qmin) and the same Clip; a ReLU between them only narrows qmin, and an
  option-A shortcut's ``subsample_pad`` moves around the Add: the Add runs on the subsampled
  inputs and the zero channels (the zero point, the integer 0) are added after it, as below;
- ``pad_channels``, ``maxpool`` and ``flatten`` of a quantized tensor run on uint8; zero channels that
  ONNX Runtime would add inside its channels-last region (an option-A shortcut's ``subsample_pad``, the
  pad after a subsampled QLinearAdd) are a uint8 ``QLinearConv`` 1x1 with 0/1 weights instead
  (:meth:`_OrtWriter.embed_channels`);
- a 1x1 conv with a float output (MobileNetV2's last conv, read by float pooling) is a ``MatMulInteger``
  on channels-last bytes with the int32 bias and the accumulator step applied after it: ONNX Runtime fuses
  no conv without a QuantizeLinear after it, and would run it in float on weights it dequantizes every call;
- everything else (the image's quantizer, the pooled features, the logits) is written as in the
  QDQ file: float ops, ``Clip → QuantizeLinear`` to uint8, ``DequantizeLinear`` readers.

Exactness: every step is integer arithmetic except QLinearAdd, whose kernel computes with scale
ratios rather than round((A·s_a + B·s_b) / s) as the deploy reference does, so a sum within float32
rounding error of a half-integer can round the other way (seen: 7.500012 -> 7 in a random
ResNet-18). :func:`write_ort` therefore runs every reachable input pair of every QLinearAdd through
the installed ONNX Runtime and keeps a float Add for a quantizer where any pair differs
(:func:`inexact_adds`; listed in the ``float_residual_adds`` metadata entry). The
``uint8_tensors`` entry gives each quantized tensor's scale and zero point, which ``fatq-export
--check`` uses to compare every integer with the reference.

Every conv is uint8 x int8, the form ONNX Runtime's x86 kernels run fastest; on an x86 CPU without
VNNI the few whose pairs can leave int16 (:func:`saturates_u8s8`, listed in ``x64quantprecision``) need
ONNX Runtime's session option ``session.x64quantprecision = 1`` to stay exact.

Not for TensorRT or OpenVINO: uint8, non-zero zero points and ``com.microsoft`` ops are outside
the rules the portable file follows. Use the ``--format onnx`` file for them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np
import onnx

from export import onnx_builder
from export.deploy_graph import INTEGER_PRESERVING_OPS, DeployGraph, DeployNode, tensor_quant
from export.qdq_writer import bias_step, int32_bias_dequantized_weights, weight_initializers
from fatq.errors import FatqError

MS_DOMAIN = "com.microsoft"
MS_OPSET = 1
PRECISION_KEY = "x64quantprecision"  # convs exact without VNNI only with that ORT session option (saturates_u8s8)
METADATA_KEY = "uint8_tensors"  # {deploy tensor: {"scale", "zero_point"}}: value = (byte - zero_point) * scale


@dataclass(frozen=True)
class Uint8Tensor:
    """A quantized deploy tensor held as uint8: value = (byte − zero_point) · scale, integers in [qmin, qmax]."""

    name: str
    scale: float
    zero_point: int
    qmin: int
    qmax: int


@dataclass(frozen=True)
class AddCheck:
    """A QLinearAdd as written: its quantizer's name, inputs and output quantization (for :func:`inexact_adds`)."""

    quantizer: str
    a: Uint8Tensor
    c: Uint8Tensor
    scale: float
    zero_point: int
    qmin: int
    qmax: int


INT16_MAX = 2**15 - 1


def is_pointwise(attrs: dict) -> bool:
    """Whether a qconv's attrs are a 1x1 conv with stride 1, no padding and no groups: a matrix product
    over channels at every pixel."""
    ones = all(v == 1 for key in ("kernel", "stride", "dilation") for v in attrs[key])
    return ones and attrs["groups"] == 1 and not any(attrs["padding"])


def saturates_u8s8(x: Uint8Tensor, node: DeployNode) -> bool:
    """Whether a uint8 x int8 conv of ``x`` can saturate on x86 CPUs without VNNI.

    There, ONNX Runtime's u8 x s8 kernels multiply with ``vpmaddubsw``, which sums two products into
    a saturating int16: exact only while 2 · max byte · max|w| <= 32767. :func:`export.lower.lower`
    keeps widened weights within 63 for that reason; an 8-bit layer (the stem conv of a signed 8-bit
    image, bytes up to 254) can exceed it. Measured on an AMD EPYC (AVX2 only), ONNX Runtime 1.32:
    1 integer in ~10^5 of a ResNet-20 stem conv off; VNNI's int32 accumulation does not saturate.

    Such convs are still written u8 x s8 (s8 x s8 ran 4.7x slower on an AVX-512 VNNI CPU, ORT 1.32:
    a ResNet-20-sized stem 3.32 against 0.71 ms at batch 64, ``benchmarks/ort_conv_types.py``) and
    listed in the file's ``x64quantprecision`` metadata entry. ONNX Runtime's session option
    ``session.x64quantprecision = 1`` makes them exact where the CPU saturates: it then stores int8
    weights outside [-64, 64] as uint8 and runs u8 x u8 (``Avx2WeightS8ToU8Transformer``, registered
    in ``graph_transformer_utils.cc`` only when ``MlasPlatformU8S8Overflow()``); fatq's ONNX Runtime
    runner sets it on such CPUs (:func:`engines.host.saturating_u8s8`).
    """
    max_byte = max(x.qmax, x.qmin) + x.zero_point
    return 2 * max_byte * int(np.abs(node.params["weight"]).max(initial=0)) > INT16_MAX


class _OrtWriter:
    """Integer deploy graph -> ONNX Runtime QOperator nodes (see the module docstring)."""

    def __init__(self, graph: DeployGraph, builder: onnx_builder.OnnxBuilder, float_adds: frozenset[str] = frozenset()):
        self.graph = graph
        self.b = builder
        self.float_adds = float_adds  # quantizers whose residual Add stays float (see write_ort)
        self.adds: list[AddCheck] = []
        self.saturating: list[str] = []  # convs needing session.x64quantprecision without VNNI (saturates_u8s8)
        self.producers = graph.producers()
        self.u8: dict[str, Uint8Tensor] = {}  # deploy tensor -> its uint8 ONNX tensor
        self.float_name: dict[str, str] = {graph.input_name: onnx_builder.INPUT_NAME}
        self.channels = graph.channels()

    # --- constants and nodes -----------------------------------------------------------------

    def scale(self, value: float) -> str:
        return self.b.constant(np.float32(value), np.float32)

    def byte(self, value: int) -> str:
        return self.b.constant(np.uint8(value), np.uint8)

    def quant_inputs(self, x: Uint8Tensor) -> list[str]:
        return [x.name, self.scale(x.scale), self.byte(x.zero_point)]

    def ms_node(self, op: str, inputs: list[str], name: str) -> str:
        output = self.b.fresh(f"{name}/{op}")
        node_name = self.b.fresh(f"{name}/{op}")
        self.b.nodes.append(onnx.helper.make_node(op, inputs, [output], name=node_name, domain=MS_DOMAIN))
        return output

    @staticmethod
    def zero_point_for(quant: dict, name: str) -> int:
        """−qmin: the integer qmin is the byte 0, so saturation at 0 clamps at qmin."""
        stored = tensor_quant(quant)
        if not -255 <= quant["qmin"] <= 0 or stored["qmax"] - stored["qmin"] > 255:
            raise FatqError(
                f"{name}: the integer range [{stored['qmin']}, {stored['qmax']}] cannot be held as uint8 "
                "with the range starting at byte 0; export it with --format onnx."
            )
        return -quant["qmin"]

    def clamp(self, x: str, quant: dict, output: str, name: str) -> Uint8Tensor:
        """Bytes k − qmin (from a kernel saturating at 0) -> min(k, qmax), times j where widened.

        A uint8 Clip at qmax − qmin, then a uint8 Mul by j = ``expand`` (the stored integers are j
        times the quantizer's, at scale s / j): bytes (k − qmin)·j, zero point −qmin·j.
        """
        zero_point = self.zero_point_for(quant, name)
        expand = int(quant.get("expand", 1))
        stored = tensor_quant(quant)
        if onnx_builder.saturation_is_range(quant):  # the kernel's uint8 saturation is the range: x is the tensor
            self.b.rename(x, output)
            return Uint8Tensor(output, stored["scale"], zero_point, stored["qmin"], stored["qmax"])
        last = output if expand == 1 else None
        clipped = self.b.node("Clip", [x, self.byte(0), self.byte(quant["qmax"] + zero_point)], last, f"{name}/range")
        if expand > 1:
            self.b.node("Mul", [clipped, self.byte(expand)], output, f"{name}/expand")
        return Uint8Tensor(output, stored["scale"], zero_point * expand, stored["qmin"], stored["qmax"])

    def as_float(self, tensor: str) -> str:
        """The float ONNX tensor of a deploy tensor: a DequantizeLinear of its uint8 form, or its float op."""
        if tensor not in self.float_name:
            if tensor in self.u8:
                name = self.b.node("DequantizeLinear", self.quant_inputs(self.u8[tensor]), None, tensor)
            else:
                node = self.producers[tensor]
                output = onnx_builder.OUTPUT_NAME if tensor == self.graph.output_name else None
                if node.op in ("qconv", "qlinear"):
                    name = self.dequantized_layer(node, output)
                else:
                    name = onnx_builder.emit_float_op(self.b, node, [self.as_float(t) for t in node.inputs], output)
            self.float_name[tensor] = name
        return self.float_name[tensor]

    # --- node kinds --------------------------------------------------------------------------

    def conv(self, node: DeployNode) -> None:
        quant = node.attrs["out_quant"]
        x = self.u8[node.inputs[0]]
        weight, w_scale, w_zero = weight_initializers(self.b, node)
        bias = self.b.initializer(f"{node.name}.bias", node.params["bias_int32"].astype(np.int32))
        zero_point = self.zero_point_for(quant, node.name)
        if saturates_u8s8(x, node):
            self.saturating.append(node.name)
        inputs = [*self.quant_inputs(x), weight, w_scale, w_zero, self.scale(quant["scale"]), self.byte(zero_point)]
        y = self.b.node("QLinearConv", [*inputs, bias], None, node.name, **onnx_builder.conv_attrs(node.attrs))
        self.u8[node.output] = self.clamp(y, quant, node.output, node.name)

    def dequantized_layer(self, node: DeployNode, output: str | None) -> str:
        """DQ(x), DQ(W), DQ(b) → Conv/Gemm with a float output; ONNX Runtime fuses the Gemm to an int8 QGemm.

        It fuses no conv without a QuantizeLinear after it, so a pointwise conv is written on integers instead
        (:meth:`pointwise_integer_conv`)."""
        if node.op == "qconv" and is_pointwise(node.attrs):
            return self.pointwise_integer_conv(node, output)
        x = self.b.node("DequantizeLinear", self.quant_inputs(self.u8[node.inputs[0]]), None, node.name)
        w, bias = int32_bias_dequantized_weights(self.b, node)
        if node.op == "qconv":
            return self.b.node("Conv", [x, w, bias], output, node.name, **onnx_builder.conv_attrs(node.attrs))
        return self.b.node("Gemm", [x, w, bias], output, node.name, transB=1)

    def pointwise_integer_conv(self, node: DeployNode, output: str | None) -> str:
        """A 1x1 conv with a float output as an int8 matrix product on channels-last bytes.

        Transpose(NHWC) → MatMulInteger(uint8 x [N, H, W, C_in], int8 W^T [C_in, C_out]) → Add(int32 bias)
        → Cast → Mul(float32(s_x · s_w,c)) → Transpose(NCHW): float32(acc + q_b) · float32(s_x · s_w,c),
        the deploy reference's float output exactly. ONNX Runtime would run the DequantizeLinear → Conv form
        as a float conv on dequantized weights (MobileNetV2's last conv, 320 → 1280 channels: 1.1 ms of 8.2
        at batch 64, ``benchmarks/ort_profile.py``); its ConvInteger kernel, timed alone on that shape, was
        slower still.
        Like a QLinearConv it is listed for ``session.x64quantprecision`` where its pairs can leave int16
        (ONNX Runtime's ``Avx2WeightS8ToU8Transformer`` converts MatMulInteger's int8 weights as well).
        """
        b, x = self.b, self.u8[node.inputs[0]]
        if saturates_u8s8(x, node):
            self.saturating.append(node.name)
        channels_last = b.node("Transpose", [x.name], None, f"{node.name}/nhwc", perm=[0, 2, 3, 1])
        weight_t = np.ascontiguousarray(node.params["weight"][:, :, 0, 0].T).astype(np.int8)
        zero_points = [self.byte(x.zero_point), b.constant(np.int8(0), np.int8)]
        acc = b.node("MatMulInteger", [channels_last, b.initializer(f"{node.name}.weight_t", weight_t), *zero_points],
                     None, node.name)  # fmt: skip
        bias = b.initializer(f"{node.name}.bias", node.params["bias_int32"].astype(np.int32))
        summed = b.node("Add", [acc, bias], None, f"{node.name}/bias")
        real = b.node("Cast", [summed], None, f"{node.name}/float", to=onnx.TensorProto.FLOAT)
        scaled = b.node("Mul", [real, b.initializer(f"{node.name}.step", bias_step(node))], None, f"{node.name}/step")
        return b.node("Transpose", [scaled], output, f"{node.name}/nchw", perm=[0, 3, 1, 2])

    def quantized_linear(self, node: DeployNode) -> None:
        """DQ → Gemm → Q(uint8) (fused by ONNX Runtime into QGemm), then the clamp."""
        quant = node.attrs["out_quant"]
        y = self.dequantized_layer(node, None)
        zero_point = self.byte(self.zero_point_for(quant, node.name))
        q = self.b.node("QuantizeLinear", [y, self.scale(quant["scale"]), zero_point], None, f"{node.name}/out")
        self.u8[node.output] = self.clamp(q, quant, node.output, node.name)

    def quantize(self, node: DeployNode) -> None:
        quant = node.attrs["out_quant"]
        add, relu, subsample = self.residual_source(node)
        if add is None or node.name in self.float_adds:
            # the image, pooled features, a checked-inexact Add: Clip → Q as in the QDQ file, to uint8
            # (no Clip where uint8 saturation is the range)
            clipped = self.as_float(node.inputs[0])
            if not onnx_builder.saturation_is_range(quant):
                clipped = self.b.clip(clipped, *onnx_builder.clip_bounds(quant), np.float32, f"{node.name}/range")
            zero_point = self.zero_point_for(quant, node.name)
            q_inputs = [clipped, self.scale(quant["scale"]), self.byte(zero_point)]
            self.b.node("QuantizeLinear", q_inputs, node.output, node.name)
            self.u8[node.output] = Uint8Tensor(node.output, quant["scale"], zero_point, quant["qmin"], quant["qmax"])
            return
        # quantize(pad(subsample(relu(a + c)))) = pad_0(quantize'(subsample(a) + subsample(c))):
        # subsampling and zero padding commute with the monotone elementwise quantizer, whose
        # range (quantize') the ReLU narrows; the Add then runs on a quarter of the values.
        if relu:
            quant = {**quant, "qmin": max(quant["qmin"], 0)}
        a, c = (self.u8[t] for t in add.inputs)
        if subsample is not None:
            a, c = (self.subsample(t, f"{subsample.name}>{node.name}") for t in (a, c))
        zero_point = self.zero_point_for(quant, node.name)
        self.adds.append(AddCheck(node.name, a, c, quant["scale"], zero_point, quant["qmin"], quant["qmax"]))
        y = self.ms_node(
            "QLinearAdd",
            [*self.quant_inputs(a), *self.quant_inputs(c), self.scale(quant["scale"]), self.byte(zero_point)],
            node.name,
        )
        if subsample is None:
            self.u8[node.output] = self.clamp(y, quant, node.output, node.name)
        else:
            clamped = self.clamp(y, quant, self.b.fresh(f"{node.name}/clamped"), node.name)
            pad, channels = subsample.attrs["pad"], self.channels[subsample.inputs[0]]
            self.u8[node.output] = self.embed_channels(clamped, channels, pad, 1, node.output, subsample.name)

    def residual_source(self, node: DeployNode) -> tuple[DeployNode | None, bool, DeployNode | None]:
        """(add, ReLU seen, subsample_pad) when ``node`` quantizes [subsample_pad ∘] [relu ∘] an Add of
        two uint8 tensors (in any order of the first two); (None, False, None) otherwise."""
        relu, subsample, tensor = False, None, node.inputs[0]
        while tensor in self.producers:
            producer = self.producers[tensor]
            if producer.op == "add" and all(t in self.u8 for t in producer.inputs):
                return producer, relu, subsample
            if producer.op == "relu":
                relu = True
            elif producer.op == "subsample_pad" and subsample is None:
                subsample = producer
            else:
                break
            tensor = producer.inputs[0]
        return None, False, None

    def subsample(self, x: Uint8Tensor, name: str) -> Uint8Tensor:
        """x[:, :, ::2, ::2] on uint8."""
        b = self.b
        starts, ends = (
            b.constant([0, 0], np.int64),
            b.constant([onnx_builder.INT32_MAX, onnx_builder.INT32_MAX], np.int64),
        )
        steps = [b.constant([2, 3], np.int64), b.constant([2, 2], np.int64)]
        return replace(x, name=b.node("Slice", [x.name, starts, ends, *steps], None, f"{name}/subsample"))

    def pad_channels(self, x: Uint8Tensor, before: int, after: int, output: str, name: str) -> Uint8Tensor:
        """Zero channels on uint8: the pad byte is the zero point, the integer 0."""
        pads = self.b.constant([0, before, 0, 0, 0, after, 0, 0], np.int64)
        return replace(x, name=self.b.node("Pad", [x.name, pads, self.byte(x.zero_point)], output, name))

    def embed_channels(
        self, x: Uint8Tensor, channels: int, pad: int, stride: int, output: str, name: str
    ) -> Uint8Tensor:
        """x[:, :, ::stride, ::stride] with ``pad`` zero channels on each side, as a uint8 QLinearConv 1x1.

        Its int8 weights copy input channel c to output channel pad + c (a 1, else 0), weight scale 1, output
        scale and zero point those of x: the accumulator is the integer (byte − zero point) and the multiplier
        float32(s · 1) / s is exactly 1, so every byte is copied; the added channels hold the zero point, the
        integer 0. ONNX Runtime runs this region channels-last, where its strided Slice and channel Pad ran as
        slow copies (ResNet-20's two option-A shortcuts: 0.45 ms of Slice and Pad in a 10.2 ms call at batch 64,
        ``benchmarks/ort_profile.py``).
        """
        weight = np.zeros((channels + 2 * pad, channels, 1, 1), np.int8)
        weight[pad + np.arange(channels), np.arange(channels)] = 1
        w = [self.b.initializer(f"{name}.embed", weight), self.scale(1.0), self.b.constant(np.int8(0), np.int8)]
        attrs = {"kernel_shape": [1, 1], "strides": [stride, stride]}
        inputs = [*self.quant_inputs(x), *w, self.scale(x.scale), self.byte(x.zero_point)]
        return replace(x, name=self.b.node("QLinearConv", inputs, output, f"{name}/embed", **attrs))

    def integer_preserving(self, node: DeployNode) -> None:
        """pad_channels / subsample_pad / maxpool / flatten directly on uint8."""
        x = self.u8[node.inputs[0]]
        if node.op == "pad_channels":
            self.u8[node.output] = self.pad_channels(x, 0, node.attrs["pad"], node.output, node.name)
        elif node.op == "subsample_pad":
            channels = self.channels[node.inputs[0]]
            self.u8[node.output] = self.embed_channels(x, channels, node.attrs["pad"], 2, node.output, node.name)
        else:  # MaxPool and Flatten read uint8 as they are
            self.u8[node.output] = replace(x, name=onnx_builder.emit_float_op(self.b, node, [x.name], node.output))

    def run(self) -> dict[str, dict]:
        """Write the nodes; returns {deploy tensor: {"scale", "zero_point"}} of the uint8 tensors."""
        for node in self.graph.nodes:
            quantized_output = node.attrs.get("out_quant") is not None
            if node.op == "qconv" and quantized_output:
                self.conv(node)
            elif node.op == "qlinear" and quantized_output:
                self.quantized_linear(node)
            elif node.op == "quantize":
                self.quantize(node)
            elif node.op in INTEGER_PRESERVING_OPS and node.inputs[0] in self.u8:
                self.integer_preserving(node)
        self.as_float(self.graph.output_name)  # float ops are written when something reads them
        return {t: {"scale": q.scale, "zero_point": q.zero_point} for t, q in self.u8.items()}


def write_ort(
    graph: DeployGraph, opset: int = onnx_builder.DEFAULT_OPSET, metadata: dict | None = None
) -> onnx.ModelProto:
    """ONNX Runtime–targeted int8 ONNX of an integer-dialect graph (see the module docstring).

    Every residual QLinearAdd is first checked against the installed ONNX Runtime
    (:func:`inexact_adds`); a quantizer whose Add would round any input pair differently from
    the reference keeps a float Add (DequantizeLinear, Add, Clip, QuantizeLinear) instead.

    Args:
        graph: the lowered graph (:func:`export.lower.lower`).
        opset: ONNX opset of the default domain (13..21); ``com.microsoft`` opset 1.
        metadata: ``metadata_props``; the ``uint8_tensors``, ``float_residual_adds`` and ``x64quantprecision``
            entries are added.

    Returns:
        The model: input "input" float32 [batch, C, H, W], output "logits" float32 [batch, classes];
        each quantized deploy tensor is a uint8 tensor of the same name.
    """
    if graph.dialect != "integer":
        raise FatqError("write_ort needs a lowered (integer) graph; call export.lower.lower first.")
    b = onnx_builder.OnnxBuilder(opset)
    writer = _OrtWriter(graph, b)
    uint8 = writer.run()
    float_adds = inexact_adds(writer.adds)
    if float_adds:
        b = onnx_builder.OnnxBuilder(opset)
        uint8 = _OrtWriter(graph, b, frozenset(float_adds)).run()
    extra = {METADATA_KEY: uint8, "float_residual_adds": sorted(float_adds), PRECISION_KEY: writer.saturating}
    return onnx_builder.make_model(
        graph, b, {**(metadata or {}), **extra}, onnx_builder.output_classes(graph), {MS_DOMAIN: MS_OPSET}
    )


def inexact_adds(checks: list[AddCheck]) -> set[str]:
    """Quantizers whose QLinearAdd, in the installed ONNX Runtime, differs from the reference anywhere.

    Every pair of input bytes the two tensors can hold (at most 256 x 256) goes through ONNX
    Runtime's QLinearAdd in one session, and the clamped result is compared with what the deploy
    reference computes: clamp(round_half_even((A·s_a + B·s_c) / s), qmin, qmax) in float32. The
    kernel on this machine decides; ONNX Runtime's ARM kernel uses fixed-point arithmetic and may
    round a near-tie differently (``fatq-export --check`` on that machine measures it).
    """
    if not checks:
        return set()
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes, inputs, outputs, initializers, feeds, expected = [], [], [], [], {}, {}
    for i, check in enumerate(checks):
        bytes_a = np.arange(check.a.qmin, check.a.qmax + 1) + check.a.zero_point
        bytes_c = np.arange(check.c.qmin, check.c.qmax + 1) + check.c.zero_point
        grid_a, grid_c = (g.reshape(-1).astype(np.uint8) for g in np.meshgrid(bytes_a, bytes_c))
        feeds[f"a{i}"], feeds[f"c{i}"] = grid_a, grid_c
        params = [
            (f"sa{i}", np.float32(check.a.scale)),
            (f"za{i}", np.uint8(check.a.zero_point)),
            (f"sc{i}", np.float32(check.c.scale)),
            (f"zc{i}", np.uint8(check.c.zero_point)),
            (f"s{i}", np.float32(check.scale)),
            (f"z{i}", np.uint8(check.zero_point)),
        ]
        initializers += [numpy_helper.from_array(np.asarray(v), n) for n, v in params]
        names = [f"a{i}", f"sa{i}", f"za{i}", f"c{i}", f"sc{i}", f"zc{i}", f"s{i}", f"z{i}"]
        nodes.append(helper.make_node("QLinearAdd", names, [f"y{i}"], domain=MS_DOMAIN))
        inputs += [helper.make_tensor_value_info(n, TensorProto.UINT8, [grid_a.size]) for n in names[0:4:3]]
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.UINT8, [grid_a.size]))
        real = (grid_a.astype(np.float32) - np.float32(check.a.zero_point)) * np.float32(check.a.scale) + (
            grid_c.astype(np.float32) - np.float32(check.c.zero_point)
        ) * np.float32(check.c.scale)
        expected[f"y{i}"] = np.clip(np.round(real / np.float32(check.scale)), check.qmin, check.qmax)
    model = helper.make_model(
        helper.make_graph(nodes, "qlinear_add_check", inputs, outputs, initializers),
        opset_imports=[helper.make_opsetid("", onnx_builder.DEFAULT_OPSET), helper.make_opsetid(MS_DOMAIN, MS_OPSET)],
        ir_version=helper.find_min_ir_version_for([helper.make_opsetid("", onnx_builder.DEFAULT_OPSET)]),
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    results = dict(zip((o.name for o in outputs), session.run(None, feeds), strict=True))
    inexact = set()
    for i, check in enumerate(checks):
        got = np.clip(results[f"y{i}"].astype(np.int32) - check.zero_point, check.qmin, check.qmax)
        if not np.array_equal(got, expected[f"y{i}"]):
            inexact.add(check.quantizer)
    return inexact


def uint8_tensors(model: onnx.ModelProto) -> dict[str, dict] | None:
    """{tensor: {"scale", "zero_point"}} of a file written by :func:`write_ort`, else None."""
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    return None
