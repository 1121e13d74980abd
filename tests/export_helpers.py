"""Models with trained-like statistics for the export tests (random weights, realistic ranges)."""

from __future__ import annotations

import torch
from torch import nn

from fatq.models import create_model, model_info
from fatq.quantizers import ActivationQuantizer

IMAGENET_TEST_SIZE = 64  # ImageNet models run at 64x64 in tests (global pooling makes any size work)


def input_shape_for(name: str) -> list[int]:
    """[C, H, W] a test feeds ``name``: its registry size, ImageNet models at 64x64."""
    c, h, w = model_info(name).input_size
    return [c, IMAGENET_TEST_SIZE, IMAGENET_TEST_SIZE] if model_info(name).family == "imagenet" else [c, h, w]


def trained_like(name: str, bits: int | tuple[int, int], seed: int = 0, batch: int = 4, **options) -> nn.Module:
    """A registry model in eval mode whose statistics look trained.

    BatchNorm running statistics are the statistics of a random batch, so
    each BN normalizes its conv's real output scale; γ is random with every 5th channel negative
    and β random; the 8-bit edge/residual quantizers get their ranges from the first batch
    (``init_from_data``) and body activation quantizers a random α in [1.5, 4].
    """
    torch.manual_seed(seed)
    model = create_model(name, bits=bits, **options)
    shape = input_shape_for(name)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 1.0  # running statistics := those of the batch below
    model.train()
    with torch.no_grad():
        model(torch.randn(batch, *shape))
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            channels = module.num_features
            gamma = torch.rand(channels) * 0.8 + 0.6
            gamma[::5] *= -1
            module.weight.data = gamma
            module.bias.data = torch.randn(channels) * 0.3
        elif isinstance(module, ActivationQuantizer) and module.bits < 8:
            module.set_range(1.5 + 2.5 * torch.rand(()).item())
    return model.eval()
