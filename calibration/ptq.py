"""Post-training quantization: an FP32 model -> a calibrated b-bit fatq model (the PTQ baseline).

The PTQ model is the same architecture built with a plain uniform quantizer (no FAT transform),
per-channel weights, and every activation quantizer given its range by calibration:

1. build with ``ptq_spec(bits)`` and load the FP32 weights;
2. per output channel, set the weight clipping threshold to max|W_c| or to the threshold that
   minimises the squared weight error (``weight_method="mse"``);
3. calibrate every activation quantizer (body inputs at b bits, first/last-layer inputs and
   residual Add inputs at 8 bits) with one of the calibrators, in one pass over the
   calibration images, with the weights already quantized (see ``fatq.calibration_pass``);
4. optionally (on by default in fatq-ptq) correct the biases so that every layer's per-channel
   output mean matches the FP32 model's on the calibration images (``calibration.bias_correction``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from calibration.bias_correction import correct_biases
from fatq.calibration_pass import activation_quantizers, calibrate
from fatq.checkpoint import check_layout, init_from_pretrained, is_fatq_checkpoint, read_checkpoint_file
from fatq.data import ImageSplit, normalize
from fatq.errors import FatqError
from fatq.io import progress
from fatq.layers import QUANTIZED_LAYERS
from fatq.metrics import top1_correct
from fatq.models import create_model
from fatq.qconfig import QuantSpec
from fatq.quantizers import PerChannelWeightQuantizer, round_clamp

WEIGHT_METHODS = ("max", "mse")
# Candidate clipping thresholds of the weight MSE search, as fractions of max|W_c|: 0.2 covers
# the optimum of 2-bit Gaussian-like weights (about a third of the max), steps of 1%.
MSE_WEIGHT_FRACTIONS = torch.linspace(0.2, 1.0, 81, dtype=torch.float64)
_MSE_CHUNK_ELEMENTS = 1 << 23  # bounds the [fractions, C, N] float64 work tensors at 64 MiB


def ptq_spec(bits: int) -> QuantSpec:
    """b-bit weights and activations, uniform per-channel weights, calibrated 8-bit edges/residuals."""
    return QuantSpec(
        weight_bits=bits,
        act_bits=bits,
        transform=False,
        per_channel_weights=True,
        edge_inputs="float",
        residual_inputs="float",
    )


def load_fp32_model(
    checkpoint: str | Path, bits: int, arch: str | None, num_classes: int | None
) -> tuple[nn.Module, dict]:
    """Build the b-bit PTQ model of ``checkpoint``'s architecture and load its FP32 weights.

    Args:
        checkpoint: a fatq FP32 checkpoint, or a public ``{"state_dict"}`` one (needs ``arch``).
        bits: PTQ bit-width (2..8).
        arch: architecture name; required for public checkpoints, checked against fatq ones.
        num_classes: classifier outputs for public checkpoints (fatq ones record theirs).

    Returns:
        (model, metadata) with metadata {"normalization", "class_names", "format"}.
    """
    data = read_checkpoint_file(checkpoint)
    check_layout(data, checkpoint)
    if is_fatq_checkpoint(data):
        spec = _recorded_spec(data, checkpoint)
        if not spec.is_float:
            raise FatqError(
                f"{checkpoint} holds a {spec.weight_bits}/{spec.act_bits}-bit model; "
                "PTQ starts from an FP32 checkpoint."
            )
        if arch is not None and arch != data["arch"]:
            raise FatqError(f"{checkpoint} holds a {data['arch']}, not the requested {arch}.")
        model = create_model(
            data["arch"], spec=ptq_spec(bits), num_classes=data["num_classes"], **data.get("arch_options", {})
        )
    else:
        if arch is None:
            raise FatqError(
                f"{checkpoint} is a public checkpoint without fatq metadata; pass --arch to name its model."
            )
        model = create_model(arch, spec=ptq_spec(bits), num_classes=num_classes or 10)
    meta = init_from_pretrained(model, checkpoint)
    return model, meta


def _recorded_spec(data: dict, checkpoint: str | Path) -> QuantSpec:
    """The QuantSpec a fatq checkpoint records; one sentence when it is unreadable."""
    try:
        return QuantSpec.from_dict(data["spec"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise FatqError(f"{checkpoint} records an unreadable quantization spec; it was not written by fatq.") from None


def fp32_twin(model: nn.Module, checkpoint: str | Path) -> nn.Module:
    """The FP32 model of ``model``'s architecture with ``checkpoint``'s weights (eval mode): the
    reference bias correction matches output means against."""
    twin = create_model(model.arch, bits=32, num_classes=model.num_classes, **dict(model.arch_options))
    init_from_pretrained(twin, checkpoint)
    return twin.eval()


def _per_channel(layer: nn.Module) -> Tensor:
    """The layer's (transformed) weight as float64 [C_out, N]."""
    with torch.no_grad():
        return layer.transformed_weight().detach().double().flatten(1)


def mse_weight_alphas(weight: Tensor, levels: int) -> Tensor:
    """Per-channel clipping thresholds minimising sum (W - Q(W))^2 over a grid of fractions of max|W_c|.

    Args:
        weight: float [C_out, N].
        levels: positive integer levels n of the quantizer.

    Returns:
        float64 [C_out] thresholds (max|W_c| where that is optimal, never above it).
    """
    w = weight.double()
    peak = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)  # [C]
    # all fractions of a chunk at once ([F, C, N]): few large ops instead of many small ones
    per_chunk = max(1, _MSE_CHUNK_ELEMENTS // w.numel())
    errors = []
    for fractions in MSE_WEIGHT_FRACTIONS.split(per_chunk):
        scale = (peak[None, :] * fractions[:, None] / levels)[:, :, None]  # [F, C, 1]
        q = round_clamp(w[None], scale, -levels, levels) * scale
        errors.append(((w[None] - q) ** 2).sum(dim=2))  # [F, C]
    best = torch.argmin(torch.cat(errors), dim=0)  # first minimum: the smallest such threshold
    return peak * MSE_WEIGHT_FRACTIONS[best]


def set_weight_ranges(model: nn.Module, method: str = "max") -> dict[str, Tensor]:
    """Set every per-channel weight quantizer's alpha [C_out] by ``method`` ("max" or "mse").

    Returns:
        {weight quantizer path: alpha float32 [C_out]}.
    """
    if method not in WEIGHT_METHODS:
        raise FatqError(f"weight method must be one of {', '.join(WEIGHT_METHODS)}, got {method!r}.")
    alphas = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, QUANTIZED_LAYERS) or not isinstance(layer.weight_quantizer, PerChannelWeightQuantizer):
            continue
        w = _per_channel(layer)
        quantizer = layer.weight_quantizer
        if method == "max":
            alpha = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        else:
            alpha = mse_weight_alphas(w, quantizer.levels)
        with torch.no_grad():
            quantizer.alpha.copy_(alpha.float())
        alphas[f"{name}.weight_quantizer"] = quantizer.alpha.detach().clone()
    return alphas


class NormalizedBatches:
    """Lazily normalized batches of a fixed random subset of images (no augmentation).

    Args:
        images: uint8 [N, 3, H, W].
        normalization: {"mean": [3], "std": [3]}.
        num_batches: batches to yield (fewer if the images run out).
        batch_size: images per batch.
        seed: picks the subset (a class-sorted image folder must not give one class only).
    """

    def __init__(self, images: Tensor, normalization: dict, num_batches: int, batch_size: int, seed: int = 0):
        if num_batches < 1 or batch_size < 1:
            raise FatqError(
                f"need at least one calibration batch of at least one image, got {num_batches}×{batch_size}."
            )
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
        self.indices = order[: num_batches * batch_size]
        self.images, self.normalization, self.batch_size = images, normalization, batch_size

    def __len__(self) -> int:
        return math.ceil(self.indices.numel() / self.batch_size)

    @property
    def num_images(self) -> int:
        return int(self.indices.numel())

    def __iter__(self) -> Iterator[Tensor]:
        for start in range(0, self.indices.numel(), self.batch_size):
            chunk = self.images[self.indices[start : start + self.batch_size]]
            yield normalize(chunk, self.normalization["mean"], self.normalization["std"])


def evaluate_top1(
    model: nn.Module, split: ImageSplit, normalization: dict, batch_size: int = 256, quiet: bool = False
) -> float:
    """Top-1 accuracy (%) of ``model`` on ``split`` in eval mode, without gradients."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        starts = range(0, len(split), batch_size)
        for start in progress(starts, total=len(starts), desc="evaluating", quiet=quiet):
            images = normalize(split.images[start : start + batch_size], normalization["mean"], normalization["std"])
            logits = model(images.to(device))
            correct += top1_correct(logits.cpu(), split.labels[start : start + batch_size])
    return 100.0 * correct / len(split)


def quantize_post_training(
    model: nn.Module,
    batches: NormalizedBatches,
    calib_method: str,
    weight_method: str = "max",
    quiet: bool = False,
    reference: nn.Module | None = None,
    **calib_options,
) -> dict[str, float]:
    """Set weight ranges, calibrate every activation quantizer of ``model`` (in place), and with a
    ``reference`` (its :func:`fp32_twin`) correct its biases against it.

    Returns:
        {activation quantizer path: alpha}.
    """
    set_weight_ranges(model, weight_method)
    alphas = calibrate(
        model, batches, calib_method, quantizers=list(activation_quantizers(model)), quiet=quiet, **calib_options
    )
    if reference is not None:
        correct_biases(model, reference, batches, quiet=quiet)
    return alphas
