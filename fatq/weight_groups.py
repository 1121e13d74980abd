"""The training forward's weight paths, batched over layers of equal shape (speed on CUDA).

Each quantized layer runs its weight path (FAT transform, then the weight quantizer) as about 25
small kernels forward and backward. On a GPU these are launch-bound: on an H200 the 18 body layers
of ResNet-20 spent 17 ms of a 55 ms training step in the transform alone (benchmarks/train_step.py).
Most layers of a CNN share a weight shape (ResNet-20: three shapes for 16 body layers), so
:func:`grouped_weights` stacks each group's weights, masks and clipping thresholds and runs the path
once per group: the same functions of the same parameters, with the FFT, the channel-mixing mask
(a batched matmul) and the quantizer's elementwise passes batched.

The values equal the per-layer path's up to float32 rounding (reduction order, batched FFT); a test
checks forward and gradients against it. Evaluation and export keep the per-layer path
(``_QuantizedWeightMixin.quantized_weight`` outside this context), so the integers export writes
are those the exported model computes, whichever path trained it.

    groups = weight_groups(model)  # once: the grouping is fixed by the model (~0.3 ms for ResNet-20)
    with grouped_weights(model, groups):
        loss = criterion(model(images), labels)
    loss.backward()
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from fatq.layers import QUANTIZED_LAYERS
from fatq.quantizers import UniformWeightQuantizer, _learned_scale_quant, uniform_integers
from fatq.transform import FATTransform


def _group_key(layer: nn.Module) -> tuple | None:
    """Layers with equal keys are batched; None: this layer keeps its own path."""
    quantizer = layer.weight_quantizer
    if type(quantizer) is not UniformWeightQuantizer:  # per-channel, power-of-two, edge rules: own path
        return None
    transform = layer.weight_transform
    fat = isinstance(transform, FATTransform)
    if not fat and not isinstance(transform, nn.Identity):
        return None
    weight = layer.weight
    return (fat, tuple(weight.shape), weight.dtype, weight.device, quantizer.levels)


def weight_groups(model: nn.Module) -> list[list[nn.Module]]:
    """The model's quantized layers in groups of two or more that :func:`grouped_weights` batches."""
    groups: dict[tuple, list[nn.Module]] = defaultdict(list)
    for module in model.modules():
        if isinstance(module, QUANTIZED_LAYERS):
            key = _group_key(module)
            if key is not None:
                groups[key].append(module)
    return [layers for layers in groups.values() if len(layers) > 1]


def batched_fat_transform(weights: Tensor, masks: Tensor) -> Tensor:
    """:class:`FATTransform` of L layers at once.

    Args:
        weights: [L, C_out, N] float32, each layer's weight as rows.
        masks: [L, C_out, C_out], each layer's ``mask.weight``.
    Returns: [L, C_out, N] float32, layer l equal to ``FATTransform.forward`` of layer l (up to rounding).
    """
    with torch.autocast(device_type=weights.device.type, enabled=False):  # as FATTransform: float32 FFTs
        w = weights.to(torch.promote_types(weights.dtype, torch.float32))
        std, mean = torch.std_mean(w.detach(), dim=(1, 2), keepdim=True)  # per layer, as FATTransform
        spectrum = torch.fft.fft((w - mean) / std, dim=-1)  # complex [L, C_out, N]
        gate = torch.sigmoid(torch.bmm(masks.to(w.dtype), spectrum.abs()))  # mask(|S|^T)^T = M @ |S|
        return torch.fft.ifft(spectrum * gate, dim=-1).real


def _group_forward(layers: list[nn.Module]) -> list[Tensor]:
    """Fake-quantized weights of one group, one per layer (shape of its ``weight``), with gradients."""
    first = layers[0]
    shape = first.weight.shape
    weights = torch.stack([layer.weight for layer in layers]).reshape(len(layers), shape[0], -1)
    if isinstance(first.weight_transform, FATTransform):
        masks = torch.stack([layer.weight_transform.mask.weight for layer in layers])
        weights = batched_fat_transform(weights, masks)
    quantizer = first.weight_quantizer
    levels = quantizer.levels
    alpha = torch.stack([layer.weight_quantizer.alpha for layer in layers]).reshape(-1, 1, 1)  # [L, 1, 1]
    integers = uniform_integers(weights, alpha, levels)
    fake_quant = _learned_scale_quant(weights, alpha, integers, levels, -levels, levels, False)
    return [w.reshape(shape) for w in fake_quant.unbind(0)]


@contextmanager
def grouped_weights(model: nn.Module, groups: list[list[nn.Module]] | None = None):
    """Inside: every batched layer's ``quantized_weight()`` returns its group's result (computed on entry).

    Only in training with gradients (the path the optimizer steps through); layers outside any group,
    and every layer in evaluation, use their own path. ``groups``: :func:`weight_groups` of ``model``,
    computed once by the caller that enters this every step (default: computed here).
    """
    layers = []
    if model.training and torch.is_grad_enabled():
        for group in weight_groups(model) if groups is None else groups:
            for layer, weight in zip(group, _group_forward(group), strict=True):
                layer._grouped_weight = weight
                layers.append(layer)
    try:
        yield
    finally:
        for layer in layers:
            layer._grouped_weight = None
