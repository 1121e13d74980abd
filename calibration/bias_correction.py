"""Empirical bias correction for post-training quantization (Nagel et al. 2019, "Data-Free
Quantization", §4.2, in its empirical form).

Quantizing weights and activations shifts the mean of every layer's output: rounding errors do
not average out per channel (a channel's weights round the same way for every input), and the
clipping of activation ranges removes tails. With a few calibration batches this is measured and
removed: in forward order, for every BatchNorm (and every quantized linear with a bias that no
BatchNorm follows) the per-channel mean of its output in the quantized model is compared with the
FP32 model's on the same images, and the difference is added to its bias (BatchNorm β). Each layer
is corrected with every earlier correction already in place, so the errors a correction leaves
downstream are measured again, not double-counted.

Only biases move; weights, their integers and all quantizer ranges are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from fatq.io import progress
from fatq.layers import QUANTIZED_LAYERS


def _bias_layers(model: nn.Module) -> list[str]:
    """Paths of the layers whose output mean a bias can move: BatchNorms and biased quantized layers."""
    paths = []
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.affine
            or isinstance(module, QUANTIZED_LAYERS)
            and module.bias is not None
        ):
            paths.append(name)
    return paths


def _channel_means(model: nn.Module, paths: list[str], batches: Iterable[Tensor]) -> dict[str, Tensor]:
    """Mean over images and positions of each path's output, per channel (float64 [C]), keyed in
    the order the forward pass first reached each path."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(paths, 0)
    modules = dict(model.named_modules())

    def hook(path):
        def record(module, args, out):
            values = out.detach().double().transpose(0, 1).reshape(out.shape[1], -1)
            sums[path] = sums.get(path, 0) + values.sum(dim=1)
            counts[path] += values.shape[1]

        return record

    handles = [modules[p].register_forward_hook(hook(p)) for p in paths]
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    return {p: sums[p] / counts[p] for p in paths if p in sums}


def correct_biases(
    quantized: nn.Module, reference: nn.Module, batches: Iterable[Tensor], quiet: bool = False
) -> dict[str, float]:
    """Shift biases of ``quantized`` (in place) so its per-channel output means match ``reference``'s.

    Args:
        quantized: the calibrated quantized model (eval mode).
        reference: the FP32 model it was made from, with the same module paths (eval mode).
        batches: calibration batches (iterable more than once), normalized float [B, C, H, W].
        quiet: no progress bar.

    Returns:
        {layer path: largest |shift| of its bias}.
    """
    quantized.eval()
    reference.eval()
    batches = list(batches)
    references = dict(reference.named_modules())
    paths = [p for p in _bias_layers(quantized) if p in references]
    # keys in the order the forward pass reached them (module order need not be that order);
    # layers the forward pass does not reach are absent
    targets = _channel_means(reference, paths, batches)
    modules = dict(quantized.named_modules())
    shifts = {}
    for path in progress(targets, total=len(targets), desc="bias correction", quiet=quiet):
        current = _channel_means(quantized, [path], batches)[path]
        shift = targets[path] - current
        with torch.no_grad():
            modules[path].bias += shift.to(modules[path].bias.dtype)
        shifts[path] = float(shift.abs().max())
    return shifts
