"""Write an integer deploy graph as ONNX for OpenVINO's CPU plugin (``--format onnx-openvino``).

Why a third int8 file: the portable QDQ file (:mod:`export.qdq_writer`) can enforce a b-bit range
such as [0, 15] only with a float ``Clip`` between int8 Q/DQ pairs. OpenVINO turns every Q → DQ
pair into a ``FakeQuantize`` with 256 levels and fuses those into its int8 convolutions, but it
runs each such Clip as a separate f32 pass, and after a conv it fuses a chain of two
quantizations and a clamp into the conv's epilogue. Writing them as below made a ResNet-20 W4A4
8–13 % faster in an interleaved A/B and 1.75× instead of 1.51× its fp32 twin in the README's run of
``benchmarks/engines_resnet20.py``.

OpenVINO's own quantization op says the same thing in one node: ``FakeQuantize(x, lo·s, hi·s,
lo·s, hi·s, levels = hi − lo + 1)`` is clamp(round((x − lo·s) / s), 0, hi − lo) · s + lo·s, the
quantizer itself. Its ONNX frontend reads it from the ``org.openvinotoolkit`` domain. This writer
is the QDQ writer with every quantizer of :data:`FAKE_QUANTIZE_LEVELS` levels written as that one
node on the quantizer's own grid:

- a conv/linear's output quantizer: ``Conv → FakeQuantize`` instead of ``Conv → Q → DQ → Clip →
  Q → DQ``. Where :func:`export.lower.lower` widened the integers (stored as j·q at scale s / j
  so an engine's int32 bias is fine-grained), the FakeQuantize stays on the coarse grid s: the
  values j·q · s / j = q · s are the same reals, and OpenVINO adds the bias in float after the
  int8 convolution, so the widening has nothing to do there;
- a quantizer of a float tensor (a residual sum): ``FakeQuantize`` instead of ``Clip → Q → DQ``.

Every other quantizer is written exactly as in the QDQ file. Measured with openvino 2026.4.1 on a
16-channel FakeQuantize → int8 Conv (numpy reference): 16 and 256 levels are exact and run the
conv on u8; 8 and 128 levels make it fall back to an f32 conv; 15 and 255 levels give wrong
results. Hence only 16 levels — the 4-bit quantizers of W4A4 models, the headline configuration —
take the new form, and 256 levels where they are unsigned: the [0, 255] quantizers of a ``--target cpu`` model
(QuantSpec ``full_range_8bit``), which no int8 Q/DQ can hold and which OpenVINO runs as uint8 like NNCF's
8-bit quantizers. Other 2-, 3- and 8-bit quantizers keep their Q/DQ. ``fatq-export --check`` runs the
file through OpenVINO and compares the logits and every integer it can observe without perturbing
OpenVINO (:mod:`engines.deploy_check`) with the deploy reference, so a different OpenVINO version that
broke this would fail the check.

**Residual branch quantizers** (a conv's 16- or 256-level output quantizer that only float ops read: the
branch term of a residual Add, the signed [−128, 127] ``branch_quantizer`` of a ``--target cpu`` model) are
written as ``Conv(bias + (−qmin − ¼)·s) → Relu → FakeQuantize(in [−¼·s, (levels − 1 − ¼)·s], out [qmin·s,
qmax·s])``: the same quantizer in real arithmetic (the shifted grid starts ¼ step below zero, so the Relu only
moves values that round to the lowest level anyway). Why: OpenVINO's CPU plugin fuses Conv → FakeQuantize →
Add → FakeQuantize into one int8 conv, as it does with NNCF's graphs, but appends a FakeQuantize that is the
conv's *first* post-op, followed by a sum and another FakeQuantize, without its rounding ("drop rounding one
special residual pattern … unsafe optimization", ``DnnlPostOpsComposer::compose`` in
``src/plugins/intel_cpu/src/dnnl_postops_composer.cpp``, and the same rule in the legacy conv node), which
changed 4–5 % of a ResNet-20 W4A4's top-1 predictions. The Relu is a post-op ahead of it, so the rounding
stays; the Add still fuses as a sum (``isSuitableParentForFusingSumActivation`` in the plugin's
``snippets_mark_skipped.cpp`` accepts a FakeQuantize whose parent is fused with the conv), and the Relu stays
because ``ReluFakeQuantizeFusion`` drops a Relu only before a FakeQuantize whose input_low is ≥ 0. Measured
with openvino 2026.4.1 on the 150-step ResNet-20 W4A4 ``--target cpu``: logits bit-identical to the
``.reference.pt`` on all 10,000 test images, and the 9 Add + FakeQuantize passes gone (5 elementwise passes,
as in NNCF's IR, against 12 with the previous Q → DQ → ulp-wide Clip form, which ended the conv's epilogue at
the branch quantizer). Kept in that Q → DQ → Clip form: 255-level ones (the default placement's [−127, 127];
OpenVINO computes a 255-level FakeQuantize wrongly), and those of branch convs with 8-bit activations or weights
(measured on W4A4 and W8A8 only). The
shifted form computes the quantizer's t with a larger float error (the grid offset of 128 levels added in
float32), and an 8-bit conv's accumulator values lie too densely for the export's moves to keep them that far
from rounding boundaries (:mod:`export.engine_exact`): on the W8A8 ResNet-20 of the same run, 767 branch
values in 2,000 test images rounded the other way (99.85 % top-1 agreement; 100.00 % in the Q → DQ → Clip
form).

For OpenVINO only: ONNX Runtime and TensorRT do not read ``org.openvinotoolkit`` ops. The
``fake_quantized_tensors`` metadata entry lists the quantizers written as FakeQuantize.
"""

from __future__ import annotations

import numpy as np
import onnx

from export.deploy_graph import DeployGraph, DeployNode
from export.onnx_builder import DEFAULT_OPSET, OnnxBuilder, clip_bounds, make_model, needs_uint8, output_classes
from export.qdq_writer import FLOAT_READERS, QdqWriter
from fatq.errors import FatqError

OPENVINO_DOMAIN = "org.openvinotoolkit"
OPENVINO_OPSET = 1
# quantizer sizes OpenVINO 2026.4 runs exactly and on int8 as FakeQuantize (module docstring); the unsigned
# 256-level ones as well (fake_quantized)
FAKE_QUANTIZE_LEVELS = frozenset({16})
METADATA_KEY = "fake_quantized_tensors"
# residual branch quantizers written as Relu → shifted FakeQuantize (module docstring): sizes OpenVINO runs exactly
BRANCH_LEVELS = frozenset({16, 256})
# where a branch quantizer's shifted input grid starts, in steps below zero: inside (−½, 0), so that the Relu ahead
# of it changes no integer, and below zero, so that ReluFakeQuantizeFusion keeps the Relu
BRANCH_GRID_START = 0.25
# ... and only where the branch conv reads activations of at most this many levels with weights of at most this
# many bits: the W4A4 models it was measured on (module docstring)
BRANCH_INPUT_LEVELS = 16
BRANCH_WEIGHT_BITS = 4


def levels(quant: dict) -> int:
    """Number of integers a quantizer {scale, qmin, qmax} can output."""
    return int(quant["qmax"]) - int(quant["qmin"]) + 1


def fake_quantized(quant: dict) -> bool:
    """Whether this file writes the quantizer as one FakeQuantize: 16 levels, or uint8 ([0, 255], which int8 Q/DQ
    cannot hold; the signed full-range ones stay a bare Q → DQ, which OpenVINO reads as the same)."""
    return levels(quant) in FAKE_QUANTIZE_LEVELS or needs_uint8(quant)


class _OpenVinoWriter(QdqWriter):
    """The QDQ writer, with 16-level and unsigned 256-level quantizers as OpenVINO FakeQuantize nodes."""

    def __init__(self, graph: DeployGraph, builder: OnnxBuilder):
        super().__init__(graph, builder, range_clip="float")
        self.fake_quantized: dict[str, dict] = {}  # deploy tensor -> {scale, levels} of its FakeQuantize

    def fake_quantize(self, x: str, quant: dict, output: str, name: str) -> None:
        """``output`` = FakeQuantize of the float tensor ``x`` on the grid of ``quant`` (expand ignored)."""
        lo, hi = (self.b.constant(bound, np.float32) for bound in clip_bounds(quant))
        count = levels(quant)
        self.b.node("FakeQuantize", [x, lo, hi, lo, hi], output, name, domain=OPENVINO_DOMAIN, levels=count)
        self.float_name[output] = output
        self.fake_quantized[output] = {"scale": float(np.float32(quant["scale"])), "levels": count}

    def int8_output(self, x: str, quant: dict, output: str, name: str, already_quantized: bool) -> None:
        if already_quantized or not fake_quantized(quant):
            super().int8_output(x, quant, output, name, already_quantized)
            return
        self.fake_quantize(x, quant, output, name)

    def requantize(self, x: str, quant: dict, output: str, name: str) -> None:
        if not needs_uint8(quant):  # int8 holds it: DQ → MaxPool/Slice → Q, as in the QDQ file
            super().requantize(x, quant, output, name)
            return
        self.fake_quantize(x, quant, output, name)  # uint8 [0, 255]: x holds integers · s in range already

    def residual_branch(self, node: DeployNode) -> bool:
        """Whether a qconv/qlinear node's output quantizer is a residual branch term written as Relu → shifted
        FakeQuantize (module docstring): 16 or 256 levels, read by float ops only, computed from activations of
        at most 16 levels and weights of at most 4 bits (the W4A4 models; see the module docstring for why not
        8-bit ones)."""
        quant = node.attrs["out_quant"]
        readers = self.readers.get(node.output, [])
        source = self.graph.quant_of(node.inputs[0])
        return (
            quant is not None
            and levels(quant) in BRANCH_LEVELS
            and source is not None
            and levels(source) <= BRANCH_INPUT_LEVELS
            and node.attrs.get("weight_bits", 8) <= BRANCH_WEIGHT_BITS
            and bool(readers)
            and all(reader.op in FLOAT_READERS for reader in readers)
        )

    def bias_offset(self, node: DeployNode) -> float:
        """(−qmin − ¼)·s for a residual branch (its grid shifted to start ¼ step below zero), else 0."""
        if not self.residual_branch(node):
            return 0.0
        quant = node.attrs["out_quant"]
        return float(np.float32(-int(quant["qmin"]) - BRANCH_GRID_START) * np.float32(quant["scale"]))

    def shifted_branch(self, y: str, node: DeployNode) -> None:
        """``node.output`` = the quantizer of the conv output ``y`` (its bias already shifted by
        :meth:`bias_offset`) as Relu → FakeQuantize from the shifted grid back onto [qmin·s, qmax·s]."""
        b, quant = self.b, node.attrs["out_quant"]
        scale, count = np.float32(quant["scale"]), levels(quant)
        inputs = [np.float32(-BRANCH_GRID_START) * scale, np.float32(count - 1 - BRANCH_GRID_START) * scale]
        inputs += list(clip_bounds(quant))
        relu = b.node("Relu", [y], None, f"{node.name}/branch")
        bounds = [b.constant(bound, np.float32) for bound in inputs]
        b.node("FakeQuantize", [relu, *bounds], node.output, node.name, domain=OPENVINO_DOMAIN, levels=count)
        self.float_name[node.output] = node.output
        self.fake_quantized[node.output] = {"scale": float(scale), "levels": count}

    def quantized_output(self, y: str, node: DeployNode) -> None:
        quant = node.attrs["out_quant"]
        if self.residual_branch(node):
            self.shifted_branch(y, node)
            return
        if not fake_quantized(quant):
            super().quantized_output(y, node)
            return
        self.fake_quantize(y, quant, node.output, node.name)


def write_openvino(graph: DeployGraph, opset: int = DEFAULT_OPSET, metadata: dict | None = None) -> onnx.ModelProto:
    """ONNX for OpenVINO of an integer-dialect graph (:func:`export.lower.lower`).

    Args:
        graph: the lowered graph.
        opset: ONNX opset of the default domain (13..21); ``org.openvinotoolkit`` opset 1.
        metadata: string-valued (or JSON-able) ``metadata_props``; :data:`METADATA_KEY` is added.

    Returns:
        The model: input "input" float32 [batch, C, H, W], output "logits" float32 [batch, classes];
        a quantized tensor keeps its deploy-graph name, as the float output of its FakeQuantize or
        as an int8 tensor (as in the QDQ file).
    """
    if graph.dialect != "integer":
        raise FatqError("write_openvino needs a lowered (integer) graph; call export.lower.lower first.")
    b = OnnxBuilder(opset)
    writer = _OpenVinoWriter(graph, b)
    writer.run()
    extra = {METADATA_KEY: writer.fake_quantized}
    return make_model(graph, b, {**(metadata or {}), **extra}, output_classes(graph), {OPENVINO_DOMAIN: OPENVINO_OPSET})
