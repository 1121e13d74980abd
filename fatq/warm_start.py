"""Start a quantized model initialised from FP32 weights where the FP32 model is, not at chance.

Why it starts at chance (measured, docs/import.md): the FAT transform standardizes W by its σ, so
the quantized weight α_w · q / n is in units of σ (α_w = 3 clips at ≈ 3σ) and every FAT conv's
output is ≈ 1/σ times the FP32 conv's (σ ≈ 0.03–0.2 in ResNet-20), while BatchNorm still holds the
FP32 running statistics; the following BN then outputs values 5–30× too large until ~50 train-mode
steps have replaced them. The reference code starts the same way (the paper's start).

:func:`warm_start` re-estimates what depends on that scale on a few training batches, without any
gradient step: (0) for layers without the transform (``--no-transform``, the FAT ablation), α_w := 3·σ(W):
their quantizer sees W itself, not W/σ, so the init α_w = 3.0 (3σ in FAT's standardized units) would
clip at 15–100σ and round nearly every 2–4-bit weight to 0; this gives the ablation FAT's starting clip;
(1) BN running statistics with the quantized weights and float activations,
(2) activation ranges α_a from those float activations (the PTQ calibrators, MSE by default),
(3) BN statistics again with every quantizer active. Parameters other than α_a and those α_w are untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fatq.calibration_pass import calibrate
from fatq.quantizers import ActivationQuantizer, UniformWeightQuantizer

# 4 batches of 128 images: enough for BN means/variances and α_a, and ~1 min of CPU for ResNet-20 here
DEFAULT_BATCHES = 4
DEFAULT_BATCH_SIZE = 128


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def reestimate_batchnorm(model: nn.Module, batches: Sequence[Tensor]) -> None:
    """Replace every BN's running mean/var by their average over ``batches`` (train-mode forward, no grad)."""
    norms = _batchnorms(model)
    momenta = [bn.momentum for bn in norms]
    was_training = model.training
    try:
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches
        model.train()
        with torch.no_grad():
            for images in batches:
                model(images)
    finally:
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)


def warm_start(model: nn.Module, batches: Sequence[Tensor], method: str = "mse") -> dict:
    """Re-estimate BN statistics and activation ranges of a freshly initialised quantized model, in place.

    Args:
        model: a quantized fatq model just initialised from an FP32 (or other) checkpoint.
        batches: a few normalized training batches [B, C, H, W] on the model's device.
        method: activation-range calibrator (fatq.calibrators: minmax, percentile, entropy, mse).

    Returns:
        {"batches", "images", "method", "act_alpha": {quantizer path: α_a}} for the run's records.
    """
    weight_alphas = untransformed_weight_alphas(model)  # (0)
    quantizers = {n: q for n, q in model.named_modules() if isinstance(q, ActivationQuantizer) and q.enabled}
    for q in quantizers.values():
        q.enabled = False
    try:
        reestimate_batchnorm(model, batches)  # (1) float activations, quantized weights
    finally:
        for q in quantizers.values():
            q.enabled = True
    model.eval()
    alphas = calibrate(model, batches, method=method, quantizers=list(quantizers), quiet=True)  # (2)
    reestimate_batchnorm(model, batches)  # (3) everything quantized
    return {
        "batches": len(batches),
        "images": sum(len(b) for b in batches),
        "method": method,
        "act_alpha": alphas,
        "weight_alpha_of_untransformed_layers": weight_alphas,
    }


@torch.no_grad()
def untransformed_weight_alphas(model: nn.Module) -> dict[str, float]:
    """Set α_w = spec.weight_alpha_init · σ(W) in every body layer without the FAT transform; {layer: α_w}.

    FAT's quantizer reads W_t in units of σ(W), where α_w = 3 clips at 3σ; without the transform it reads
    W in its own units, so the same clip is 3·σ(W).
    """
    spec = getattr(model, "spec", None)
    factor = spec.weight_alpha_init if spec is not None else 3.0
    alphas = {}
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if (
            isinstance(getattr(module, "weight_transform", None), nn.Identity)
            and isinstance(quantizer, UniformWeightQuantizer)
            and quantizer.alpha.numel() == 1
        ):
            quantizer.alpha.fill_(factor * module.weight.float().std().item())
            alphas[name] = quantizer.alpha.item()
    return alphas


def training_batches(images: Tensor, normalization: dict, batch_size: int, count: int, seed: int) -> list[Tensor]:
    """``count`` normalized batches of un-augmented training images (uint8 [N, C, H, W]), seeded."""
    from fatq.data import normalize

    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[: batch_size * count]
    picked = images[chosen.to(images.device)]
    return [normalize(b, normalization["mean"], normalization["std"]) for b in picked.split(batch_size)]
