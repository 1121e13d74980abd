"""Weight initialisation helpers shared by the model definitions."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from fatq.transform import FATTransform


def network_layers(model: nn.Module) -> Iterator[nn.Conv2d | nn.Linear]:
    """Conv2d and Linear layers of the network itself, in ``model.modules()`` order.

    The mask layer inside each :class:`FATTransform` is also an ``nn.Linear``, but it must keep
    its own initialisation (every entry 1 / C_out, METHOD.md §1.4); a model that re-initialised
    "every Linear" would silently randomise the masks. Iterate over this instead.
    """
    masks = {id(m) for t in model.modules() if isinstance(t, FATTransform) for m in t.modules()}
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and id(module) not in masks:
            yield module


def reset_batchnorm(model: nn.Module) -> None:
    """Every BatchNorm starts as the identity map: weight 1, bias 0."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
