"""Quantized layers: FAT conv/linear for the body, 8-bit conv/linear for the first and last layers.

Every quantized layer is a subclass of the plain torch layer (so FP32 state dicts load into it)
and owns three children with uniform names, which configs, calibration and export address by
path: ``weight_transform`` (FAT transform or Identity), ``weight_quantizer`` and
``input_quantizer``.

In eval mode with gradients off, the quantized weight is computed once and cached; the cache is
keyed by the version counters of the parameters it depends on, so an optimizer step or a
``load_state_dict`` invalidates it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fatq.transform import FATTransform


class _QuantizedWeightMixin:
    """Shared weight path: transform -> quantizer, with the eval-mode cache."""

    weight: nn.Parameter
    weight_transform: nn.Module
    weight_quantizer: nn.Module

    def _cache_key(self) -> tuple:
        params = [self.weight, *self.weight_transform.parameters(), *self.weight_quantizer.parameters()]
        return tuple((p.data_ptr(), p._version, p.device) for p in params)

    def transformed_weight(self) -> Tensor:
        """The weight after the FAT transform (what the quantizer sees), float32, shape of ``weight``."""
        return self.weight_transform(self.weight)

    def weight_integers(self) -> tuple[Tensor, Tensor]:
        """Integer weights (float dtype, shape of ``weight``) and scale, as the forward uses them."""
        with torch.no_grad():
            return self.weight_quantizer.integers(self.transformed_weight())

    def quantized_weight(self) -> Tensor:
        """Fake-quantized weight = integers * scale (cached in eval mode without grad)."""
        if self.training or torch.is_grad_enabled():
            return self.weight_quantizer(self.transformed_weight())
        key = self._cache_key()
        if getattr(self, "_cached_key", None) != key:
            self._cached_weight = self.weight_quantizer(self.transformed_weight())
            self._cached_key = key
        return self._cached_weight


class QuantConv2d(_QuantizedWeightMixin, nn.Conv2d):
    """Conv2d with quantized input and weights.

    Args:
        weight_quantizer: a weight quantizer module.
        input_quantizer: an :class:`ActivationQuantizer`.
        transform: apply the FAT transform before quantizing the weights.
        *args, **kwargs: as for ``nn.Conv2d``.
    """

    def __init__(self, *args, weight_quantizer: nn.Module, input_quantizer: nn.Module, transform: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_transform = FATTransform(self.out_channels) if transform else nn.Identity()
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C_in, H, W] -> [B, C_out, H', W']."""
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QuantLinear(_QuantizedWeightMixin, nn.Linear):
    """Linear with quantized input and weights (see :class:`QuantConv2d`)."""

    def __init__(self, *args, weight_quantizer: nn.Module, input_quantizer: nn.Module, transform: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_transform = FATTransform(self.out_features) if transform else nn.Identity()
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C_in] -> [B, C_out]."""
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)


QUANTIZED_LAYERS = (QuantConv2d, QuantLinear)
