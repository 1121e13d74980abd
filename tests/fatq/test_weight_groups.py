"""The batched weight paths (fatq.weight_groups) against each layer's own path."""

from __future__ import annotations

import pytest
import torch

from fatq import QuantSpec, create_model
from fatq.layers import QUANTIZED_LAYERS
from fatq.transform import FATTransform
from fatq.weight_groups import batched_fat_transform, grouped_weights, weight_groups


def perturbed_model(arch: str, transform: bool = True) -> torch.nn.Module:
    """A training-mode model whose masks and clipping thresholds differ from layer to layer (as after
    training), so a batched path that mixed up layers would show."""
    torch.manual_seed(0)
    model = create_model(arch, spec=QuantSpec(4, 4, transform=transform)).train()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, QUANTIZED_LAYERS):
                if isinstance(layer.weight_transform, FATTransform):
                    mask = layer.weight_transform.mask.weight
                    mask.add_(0.05 * torch.randn_like(mask) / mask.shape[0])
                alpha = getattr(layer.weight_quantizer, "alpha", None)
                if alpha is not None and alpha.dim() == 0:
                    alpha.mul_(0.8 + 0.4 * torch.rand(()))
    return model


def quantized_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)]


def test_groups_of_resnet20_are_its_three_body_shapes():
    groups = weight_groups(create_model("resnet20", spec=QuantSpec(4, 4)))
    assert sorted(len(g) for g in groups) == [5, 5, 6]  # 16x16, 32x32, 64x64 3x3 convs; the edges stay alone
    for group in groups:
        assert len({tuple(layer.weight.shape) for layer in group}) == 1


def test_batched_transform_equals_each_layers_transform():
    torch.manual_seed(1)
    transforms = [FATTransform(8, 36) for _ in range(3)]
    for t in transforms:
        torch.nn.init.normal_(t.mask.weight, std=0.2)
    weights = torch.randn(3, 8, 4, 3, 3)
    batched = batched_fat_transform(weights.reshape(3, 8, -1), torch.stack([t.mask.weight for t in transforms]))
    for index, t in enumerate(transforms):
        torch.testing.assert_close(batched[index].reshape(8, 4, 3, 3), t(weights[index]), rtol=0, atol=2e-6)


@pytest.mark.parametrize("arch, transform", [("resnet20", True), ("resnet20", False), ("mobilenetv2", True)])
def test_grouped_weights_and_gradients_equal_the_per_layer_path(arch, transform):
    model = perturbed_model(arch, transform)
    layers = quantized_layers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    probes = [torch.randn_like(layer.weight) for layer in layers]

    def weights_and_grads(grouped: bool):
        with grouped_weights(model) if grouped else torch.enable_grad():
            weights = [layer.quantized_weight() for layer in layers]
        loss = sum((w * p).sum() for w, p in zip(weights, probes, strict=True))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [w.detach() for w in weights], grads

    own, own_grads = weights_and_grads(False)
    grouped, grouped_grads = weights_and_grads(True)
    for a, b in zip(own, grouped, strict=True):
        # the same integers times the same scale, except where float32 rounding of the transform moved a
        # value across a rounding boundary (none on these models)
        assert torch.equal(a, b)
    for a, b in zip(own_grads, grouped_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            # sums taken in another order: a threshold's gradient sums terms of both signs over every weight,
            # so its float32 error scales with the terms (measured: up to 2e-4 of the result), not the result
            assert (b - a).abs().max() <= 1e-3 * a.abs().max()


def test_grouped_weights_only_in_training_with_gradients_and_cleared_after():
    model = perturbed_model("resnet20")
    layers = quantized_layers(model)
    with grouped_weights(model):
        assert sum(getattr(layer, "_grouped_weight", None) is not None for layer in layers) == 16
    assert all(getattr(layer, "_grouped_weight", None) is None for layer in layers)
    model.eval()
    with torch.no_grad(), grouped_weights(model):
        assert all(getattr(layer, "_grouped_weight", None) is None for layer in layers)
