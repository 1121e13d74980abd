"""Quantization settings of a model and the layer factory every model definition calls.

A model definition never picks layer classes itself: it asks a :class:`LayerFactory` for its
first conv, body convs, last linear and residual quantizers, so the FP32 model (bits 32) and
every FAT variant share one definition.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from fatq.errors import FatqError
from fatq.layers import QuantConv2d, QuantLinear
from fatq.quantizers import (
    FLOAT_BITS,
    ActivationQuantizer,
    MaxAbsWeightQuantizer,
    PerChannelWeightQuantizer,
    PowerOfTwoWeightQuantizer,
    ReferenceOrderWeightQuantizer,
    SignedMaxWeightQuantizer,
    TopClampActivationQuantizer,
    UniformWeightQuantizer,
    check_bits,
)

QSPEC_VERSION = 1
EDGE_MODES = ("int8", "float")
EDGE_WEIGHT_RULES = ("max_abs", "signed_max")
ACT_CLAMPS = ("both", "top")
WEIGHT_ROUNDINGS = ("scale", "reference")
TARGETS = ("portable", "trt", "cpu")
MASK_INITS = ("paper", "unsaturated")


@dataclass(frozen=True)
class QuantSpec:
    """How a model is quantized.

    Attributes:
        weight_bits: body weight bits, 2..8, or 32 for full precision.
        act_bits: body activation bits, 2..8, or 32.
        edge_inputs: "int8" quantizes the inputs of the first conv and last linear to 8 bits with
            ranges initialised from data and learned (the model that trains is the model that
            deploys); "float" leaves them float as the paper does (export calibrates them).
        residual_inputs: "int8" or "float" for the 8-bit quantizers on both inputs of each
            residual Add (needed by integer engines); "float" leaves them to calibration.
        transform: apply the FAT transform (False: plain uniform quantizer, for ablations).
        power_of_two: logarithmic weight levels instead of uniform.
        per_channel_weights: one clipping threshold per output channel for every weight
            quantizer, first/last included (PTQ models; their ranges are calibrated).
        act_alpha_init: initial alpha_a of body activation quantizers (5.0 CIFAR, 8.0 ImageNet).
        weight_alpha_init: initial alpha_w (3.0).
        edge_weights: first/last-layer weight rule: "max_abs" (METHOD.md §3 project rule) or
            "signed_max" (the reference code's max(W) scale without clamp; imported checkpoints).
        act_clamp: body activation clamp: "both" (project rule, [0, m] with m capped at 127) or
            "top" (the reference code: clamp(x/α, max=1), m = 2^b − 1; post-ReLU inputs only).
        weight_rounding: operation order of the body weight integers: "scale" (round(W_t / (α_w/n)))
            or "reference" (round(clamp(W_t/α_w, −1, 1) · n), the reference code's; ties can differ).
        target: quantizer placement. "portable": both inputs of every residual Add quantized to
            8 bits (every engine computes the model exactly). "trt": TensorRT's placement (NVIDIA's
            QDQ placement guide, ModelOpt's ONNX quantizer): the shortcut input of a residual Add is
            quantized, the conv branch stays float, so TensorRT can fuse Conv+BN+Add+ReLU with an
            int8 residual input; the model that trains is the graph TensorRT fuses. "cpu": the CPU
            engines' fusions (docs/performance.md): a residual block's input is quantized once, by its
            first conv's input quantizer, and an identity (or option-A) shortcut reads those integers
            instead of an 8-bit quantizer of its own, so each block runs as conv, conv, one Add with
            one requantization (ONNX Runtime: QLinearConv, QLinearConv, QLinearAdd; OpenVINO: two int8
            convs and one Add + FakeQuantize pass), and the stem runs once. The identity path then
            carries b-bit values (in MobileNetV2 the shortcut reads the expansion conv's input integers).
            Signed 8-bit activation quantizers (the image's, each branch's) use all 256 int8 levels,
            [-128, 127], so the engines' int8/uint8 saturation is their clamp (no Clip pass in the ONNX
            Runtime file); signed b-bit body inputs (MobileNetV2's) use all 2^b, e.g. [-8, 7] at 4 bits.
        full_range_8bit: every 8-bit activation quantizer uses all 256 values of its engine type, signed
            [-128, 127] (int8) and unsigned [0, 255] (uint8), body quantizers of A8 models included
            (target "cpu" only; ``fatq-train --target cpu`` sets it). Engines with uint8 (the ``onnx-ort``
            and ``onnx-openvino`` files) then run every 8-bit quantizer as their own 256-level kind, with
            no clamp pass; the TensorRT file (int8 only) cannot hold the unsigned ones. Without it, target
            "cpu" makes only the signed edge and residual quantizers full range (the models trained before
            this field existed).
        mask_init: initial FAT mask layer T: "paper" (every entry 1/C_out, METHOD.md §1.4) or
            "unsaturated" (3/(C_out·sqrt(N))): see :class:`fatq.transform.FATTransform`.
    """

    weight_bits: int = FLOAT_BITS
    act_bits: int = FLOAT_BITS
    edge_inputs: str = "int8"
    residual_inputs: str = "int8"
    transform: bool = True
    power_of_two: bool = False
    act_alpha_init: float = 5.0
    weight_alpha_init: float = 3.0
    per_channel_weights: bool = False
    edge_weights: str = "max_abs"
    act_clamp: str = "both"
    weight_rounding: str = "scale"
    target: str = "portable"
    mask_init: str = "paper"
    full_range_8bit: bool = False

    def __post_init__(self):
        check_bits(self.weight_bits, "weight bits")
        check_bits(self.act_bits, "activation bits")
        for name in ("edge_inputs", "residual_inputs"):
            if getattr(self, name) not in EDGE_MODES:
                raise FatqError(f"{name} must be one of {EDGE_MODES}, got {getattr(self, name)!r}.")
        for name, allowed in (
            ("edge_weights", EDGE_WEIGHT_RULES),
            ("act_clamp", ACT_CLAMPS),
            ("weight_rounding", WEIGHT_ROUNDINGS),
            ("target", TARGETS),
            ("mask_init", MASK_INITS),
        ):
            if getattr(self, name) not in allowed:
                raise FatqError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if (self.weight_bits == FLOAT_BITS) != (self.act_bits == FLOAT_BITS):
            raise FatqError("weights and activations must both be quantized or both be 32-bit.")
        if self.full_range_8bit and self.target != "cpu":
            raise FatqError(f"full_range_8bit applies to target 'cpu' only, not {self.target!r}.")

    @property
    def is_float(self) -> bool:
        return self.weight_bits == FLOAT_BITS

    def to_dict(self) -> dict:
        return {"version": QSPEC_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> QuantSpec:
        """The spec of ``to_dict``; fields it lacks (an older fatq's) take their defaults.

        Raises:
            FatqError: ``data`` has a version or settings this fatq does not know (a newer fatq wrote it):
                dropping them would build another model than the one that was trained.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields - {"version"})
        version = data.get("version", QSPEC_VERSION)
        if unknown or not isinstance(version, int) or version > QSPEC_VERSION:
            what = f"settings {', '.join(unknown)}" if unknown else f"version {version!r}"
            raise FatqError(
                f"the quantization spec has {what} that this fatq (spec version {QSPEC_VERSION}) does not know: "
                "a newer fatq wrote it; read it with that version."
            )
        return cls(**{k: v for k, v in data.items() if k in fields})

    @classmethod
    def from_bits(cls, bits: int | tuple[int, int], **kwargs) -> QuantSpec:
        """``bits`` is one width for both, or (weight_bits, act_bits)."""
        w, a = (bits, bits) if isinstance(bits, int) else bits
        return cls(weight_bits=w, act_bits=a, **kwargs)


class LayerFactory:
    """Builds the layers of one model according to a :class:`QuantSpec`."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec

    def _body_weight_quantizer(self, out_channels: int) -> nn.Module:
        if self.spec.per_channel_weights:
            return PerChannelWeightQuantizer(self.spec.weight_bits, out_channels)
        if self.spec.power_of_two:
            cls = PowerOfTwoWeightQuantizer
        else:
            cls = ReferenceOrderWeightQuantizer if self.spec.weight_rounding == "reference" else UniformWeightQuantizer
        return cls(self.spec.weight_bits, self.spec.weight_alpha_init)

    def _edge_weight_quantizer(self, out_channels: int) -> nn.Module:
        if self.spec.per_channel_weights:
            return PerChannelWeightQuantizer(8, out_channels)
        return SignedMaxWeightQuantizer() if self.spec.edge_weights == "signed_max" else MaxAbsWeightQuantizer()

    def _body_input_quantizer(self, signed: bool) -> ActivationQuantizer:
        if self.spec.act_clamp == "top":
            if signed:
                raise FatqError(
                    "act_clamp 'top' (the reference code's clamp) is defined only for post-ReLU inputs; "
                    "this model has a body layer with a signed input."
                )
            return TopClampActivationQuantizer(self.spec.act_bits, self.spec.act_alpha_init)
        full_range = self._full_range(signed, self.spec.act_bits)
        return ActivationQuantizer(self.spec.act_bits, signed, self.spec.act_alpha_init, full_range=full_range)

    def _full_range(self, signed: bool, bits: int = 8) -> bool:
        """Whether a ``bits``-bit activation quantizer uses all 2^bits integers (target "cpu": signed ones always,
        e.g. [-8, 7] at 4 bits, one 16-level FakeQuantize in OpenVINO where the symmetric 15 levels are separate
        Clip -> Q passes; unsigned 8-bit ones with ``full_range_8bit``)."""
        return (self.spec.full_range_8bit and bits == 8) or (signed and self.spec.target == "cpu")

    def _edge_input_quantizer(self, signed: bool, mode: str) -> ActivationQuantizer:
        full_range = self._full_range(signed)
        return ActivationQuantizer(8, signed, enabled=mode == "int8", init_from_data=True, full_range=full_range)

    def first_conv(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = False
    ) -> nn.Conv2d:
        """First conv: 8-bit max|W| weights, 8-bit signed input (the normalized image)."""
        if self.spec.is_float:
            return nn.Conv2d(in_ch, out_ch, kernel, stride, padding, bias=bias)
        return QuantConv2d(
            in_ch,
            out_ch,
            kernel,
            stride,
            padding,
            bias=bias,
            weight_quantizer=self._edge_weight_quantizer(out_ch),
            input_quantizer=self._edge_input_quantizer(True, self.spec.edge_inputs),
            transform=False,
        )

    def conv(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = False,
        signed_input: bool = False,
    ) -> nn.Conv2d:
        """Body conv: FAT-transformed b-bit weights, b-bit input (unsigned after ReLU)."""
        if self.spec.is_float:
            return nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=bias)
        return QuantConv2d(
            in_ch,
            out_ch,
            kernel,
            stride,
            padding,
            groups=groups,
            bias=bias,
            weight_quantizer=self._body_weight_quantizer(out_ch),
            input_quantizer=self._body_input_quantizer(signed_input),
            transform=self.spec.transform,
            mask_init=self.spec.mask_init,
        )

    def linear(self, in_f: int, out_f: int, bias: bool = True, signed_input: bool = False) -> nn.Linear:
        """Body linear (e.g. VGG-16's hidden classifier layers)."""
        if self.spec.is_float:
            return nn.Linear(in_f, out_f, bias=bias)
        return QuantLinear(
            in_f,
            out_f,
            bias=bias,
            weight_quantizer=self._body_weight_quantizer(out_f),
            input_quantizer=self._body_input_quantizer(signed_input),
            transform=self.spec.transform,
            mask_init=self.spec.mask_init,
        )

    def last_linear(self, in_f: int, out_f: int, bias: bool = True, signed_input: bool = False) -> nn.Linear:
        """Classifier: 8-bit max|W| weights, 8-bit input (pooled features, unsigned after ReLU)."""
        if self.spec.is_float:
            return nn.Linear(in_f, out_f, bias=bias)
        return QuantLinear(
            in_f,
            out_f,
            bias=bias,
            weight_quantizer=self._edge_weight_quantizer(out_f),
            input_quantizer=self._edge_input_quantizer(signed_input, self.spec.edge_inputs),
            transform=False,
        )

    @property
    def shares_block_input(self) -> bool:
        """Whether an identity shortcut reads its block's first conv's input integers (target "cpu")."""
        return not self.spec.is_float and self.spec.target == "cpu"

    def residual_quantizer(self, signed: bool, branch: bool = False) -> nn.Module:
        """8-bit quantizer on one input of a residual Add (Identity in the FP32 model).

        ``branch``: the input is the conv branch, which TensorRT's placement (target "trt") leaves
        float so that the conv, its BN, the Add and the ReLU fuse into one int8 kernel. An unsigned
        shortcut (identity or option A) under target "cpu" reads the block's quantized input instead.
        """
        if self.spec.is_float or (branch and self.spec.target == "trt"):
            return nn.Identity()
        if not branch and not signed and self.shares_block_input:
            return nn.Identity()
        enabled = self.spec.residual_inputs == "int8"
        return ActivationQuantizer(8, signed, enabled=enabled, init_from_data=True, full_range=self._full_range(signed))
