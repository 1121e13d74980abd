"""Model registry: ``@register_model`` and ``create_model(name, bits=…, num_classes=…)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from fatq.errors import FatqError
from fatq.qconfig import LayerFactory, QuantSpec


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about an architecture.

    Attributes:
        name: registry name, e.g. "resnet20".
        builder: ``builder(factory, num_classes, in_channels=C, **options) -> nn.Module``.
        input_size: (C, H, W) the model is defined for.
        family: "cifar" or "imagenet" (picks defaults such as alpha_a init).
        options: keyword options with their defaults (e.g. {"shortcut": "A"}).
    """

    name: str
    builder: Callable[..., nn.Module]
    input_size: tuple[int, int, int]
    family: str
    options: dict


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, input_size: tuple[int, int, int], family: str, **options):
    """Decorator registering ``builder(factory, num_classes, **options)`` under ``name``."""

    def wrap(builder):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelInfo(name, builder, input_size, family, dict(options))
        return builder

    return wrap


def list_models() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """The registry entry of ``name``; a clear error listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FatqError(f"unknown architecture {name!r}; known: {', '.join(list_models())}.") from None


def create_model(
    name: str,
    bits: int | tuple[int, int] | None = 32,
    num_classes: int = 10,
    spec: QuantSpec | None = None,
    in_channels: int | None = None,
    **options,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: registry name (see :func:`list_models`).
        bits: one width for weights and activations, or (weight_bits, act_bits); 32 = FP32.
            Ignored when ``spec`` is given.
        num_classes: classifier outputs.
        spec: full quantization settings (overrides ``bits``).
        in_channels: image channels of the input (default: the registered C, 3); 1 for a grayscale
            dataset. Part of the input size a checkpoint records, not of ``arch_options``.
        **options: architecture options, e.g. ``shortcut="B"`` for CIFAR ResNets.

    Returns:
        The model, with attributes ``arch``, ``spec``, ``arch_options`` and ``in_channels`` recorded for
        checkpoints.
    """
    info = model_info(name)
    unknown = set(options) - set(info.options)
    if unknown:
        raise FatqError(f"{name} has no option(s) {sorted(unknown)}; it takes {sorted(info.options) or 'none'}.")
    resolved = {**info.options, **options}
    if spec is None:
        alpha = 8.0 if info.family == "imagenet" else 5.0
        spec = QuantSpec.from_bits(bits if bits is not None else 32, act_alpha_init=alpha)
    in_channels = info.input_size[0] if in_channels is None else int(in_channels)
    if in_channels < 1:
        raise FatqError(f"{name} needs at least one input channel, got {in_channels}.")
    model = info.builder(LayerFactory(spec), num_classes, in_channels=in_channels, **resolved)
    model.arch = name
    model.in_channels = in_channels
    model.spec = spec
    model.arch_options = resolved
    model.num_classes = num_classes
    return model
