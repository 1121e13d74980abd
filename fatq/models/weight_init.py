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


def torchvision_init(model: nn.Module, nonlinearity: str = "leaky_relu") -> None:
    """torchvision's VGG/MobileNetV2 scheme: Kaiming-normal (fan_out) convs, N(0, 0.01) linears,
    zero biases, identity BatchNorms. ``nonlinearity`` as torch.nn.init takes it (VGG: "relu";
    MobileNetV2 keeps the default "leaky_relu" with slope 0, i.e. the same gain)."""
    for m in network_layers(model):
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=nonlinearity)
        else:
            nn.init.normal_(m.weight, 0, 0.01)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    reset_batchnorm(model)
