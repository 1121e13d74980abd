"""Quantized layers: FAT conv/linear for the body, 8-bit conv/linear for the first and last layers.

Every quantized layer is a subclass of the plain torch layer (so FP32 state dicts load into it)
and owns three children with uniform names, which configs, calibration and export address by
path: ``weight_transform`` (FAT transform or Identity), ``weight_quantizer`` and
``input_quantizer``.

In eval mode with gradients off, the integer weights are computed once and cached; the cache is
keyed by the version counters of the parameters it depends on, so an optimizer step or a
``load_state_dict`` invalidates it. That mode also computes the conv/linear the way an integer
engine does: on the integers of the input and the weights, exactly (a float32 sum of integer
products is exact while every partial sum stays below 2^24), then times s_x · s_w. In real
arithmetic this is the same function as the fake-quant forward; in float32 it removes the
rounding of a float sum of fake-quant products (up to ~1e-5 relative after cancellation), which
is enough to send values that sit within that distance of a rounding boundary of the next
quantizer to the other side than the engine does. Layers whose sums could reach 2^24 keep the
fake-quant form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fatq.transform import FATTransform

EXACT_FLOAT32_SUM = 2**24


class _QuantizedWeightMixin:
    """Shared weight path: transform -> quantizer, with the eval-mode cache and integer forward."""

    weight: nn.Parameter
    weight_transform: nn.Module
    weight_quantizer: nn.Module
    input_quantizer: nn.Module

    def _init_weight_path(
        self, out_channels: int, row_length: int, weight_quantizer, input_quantizer, transform: bool, mask_init: str
    ) -> None:
        """transform (FAT over rows of ``row_length``, or Identity) -> weight quantizer; the input quantizer."""
        self.weight_transform = FATTransform(out_channels, row_length, mask_init) if transform else nn.Identity()
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    def _cache_key(self) -> tuple:
        params = [self.weight, *self.weight_transform.parameters(), *self.weight_quantizer.parameters()]
        # a rule switch without parameters (SignedMaxWeightQuantizer.int8_fallback) also changes the integers
        rule = getattr(self.weight_quantizer, "int8_fallback", None)
        return (rule, *((p.data_ptr(), p._version, p.device) for p in params))

    def transformed_weight(self) -> Tensor:
        """The weight after the FAT transform (what the quantizer sees), float32, shape of ``weight``."""
        return self.weight_transform(self.weight)

    def weight_integers(self) -> tuple[Tensor, Tensor]:
        """Integer weights (float dtype, shape of ``weight``) and scale, as the forward uses them."""
        with torch.no_grad():
            return self.weight_quantizer.integers(self.transformed_weight())

    def quantized_weight(self) -> Tensor:
        """Fake-quantized weight = integers * scale (cached in eval mode without grad; batched with the
        layers of equal shape inside :func:`fatq.weight_groups.grouped_weights`)."""
        if self.training or torch.is_grad_enabled():
            grouped = getattr(self, "_grouped_weight", None)
            if grouped is not None:
                return grouped
            return self.weight_quantizer(self.transformed_weight())
        return self._eval_weights()[0]

    def _eval_weights(self) -> tuple[Tensor, Tensor, Tensor, bool]:
        """(integers * scale, integers, scale, integer forward is exact), cached."""
        key = self._cache_key()
        if getattr(self, "_cached_key", None) != key:
            integers, scale = self.weight_integers()
            fan_in = integers[0].numel()
            levels = max(abs(v) for v in self.input_quantizer.int_range)
            exact = fan_in * levels * float(integers.abs().max()) < EXACT_FLOAT32_SUM
            self._cached = (integers * scale, integers, scale, exact)
            self._cached_key = key
        return self._cached

    def _integer_forward(self, x: Tensor, op) -> Tensor | None:
        """op(q_x, q_w) * s_x * s_w + bias in eval mode when exact there, else None (see module doc)."""
        if self.training or torch.is_grad_enabled() or not self.input_quantizer.enabled:
            return None
        if torch.is_autocast_enabled(x.device.type):  # fp16/bf16 sums are not exact
            return None
        _, integers, weight_scale, exact = self._eval_weights()
        if not exact:
            return None
        # the module call (not .integers()) so that hooks on the quantizer see it, as in training;
        # q · s / s rounds back to q exactly (|q| <= 255, one float32 rounding in between)
        input_scale = self.input_quantizer.scale
        q_x = (self.input_quantizer(x) / input_scale).round_()
        acc = op(q_x, integers)
        # per-channel weight scales are [C_out, 1, ...]: move C_out to dim 1 of the output
        scale = input_scale * weight_scale.reshape(1, -1, *([1] * (acc.dim() - 2)))
        out = acc * scale
        return out if self.bias is None else out + self.bias.reshape(1, -1, *([1] * (acc.dim() - 2)))


class QuantConv2d(_QuantizedWeightMixin, nn.Conv2d):
    """Conv2d with quantized input and weights.

    Args:
        weight_quantizer: a weight quantizer module.
        input_quantizer: an :class:`ActivationQuantizer`.
        transform: apply the FAT transform before quantizing the weights.
        mask_init: the transform's mask initialisation ("paper" or "unsaturated").
        *args, **kwargs: as for ``nn.Conv2d``.
    """

    def __init__(
        self,
        *args,
        weight_quantizer: nn.Module,
        input_quantizer: nn.Module,
        transform: bool,
        mask_init: str = "paper",
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        row = self.weight[0].numel()  # C_in/groups * k_h * k_w
        self._init_weight_path(self.out_channels, row, weight_quantizer, input_quantizer, transform, mask_init)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C_in, H, W] -> [B, C_out, H', W']."""
        exact = self._integer_forward(x, lambda q_x, q_w: self._conv_forward(q_x, q_w, None))
        if exact is not None:
            return exact
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QuantLinear(_QuantizedWeightMixin, nn.Linear):
    """Linear with quantized input and weights (see :class:`QuantConv2d`)."""

    def __init__(
        self,
        *args,
        weight_quantizer: nn.Module,
        input_quantizer: nn.Module,
        transform: bool,
        mask_init: str = "paper",
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        out, row = self.out_features, self.in_features
        self._init_weight_path(out, row, weight_quantizer, input_quantizer, transform, mask_init)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C_in] -> [B, C_out]."""
        exact = self._integer_forward(x, F.linear)
        if exact is not None:
            return exact
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)


QUANTIZED_LAYERS = (QuantConv2d, QuantLinear)
