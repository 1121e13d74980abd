"""Where the FAT mask is saturated, and how the reference recipe brings it out of saturation.

The mask of a FAT layer is sigmoid(S) with S = T(|FFT(rows)|) (METHOD.md §1.4). With the paper's
initialisation T = 1/C_out, S is the mean spectral magnitude over output channels, about 0.886·sqrt(N)
for standardized rows of length N; sigmoid(S) is exactly 1.0 in float32 once S > ~16.6, and then the
mask has no gradient (torch's sigmoid backward is g·y·(1 − y) = 0 at y = 1).

This script prints, per FAT layer of each given model:

- N, C_out, mean entry of T (1/C_out at the paper's initialisation), mean and min of S, the share of
  mask entries exactly 1.0, the mask's range;

and a closed-form account of how T leaves saturation without any gradient: SGD with momentum μ and
weight decay λ on T alone (v ← μ·v + λ·T; T ← T − η_t·v) shrinks T by a factor f(t) under the step
schedule; a layer leaves saturation once f(t)·max S < 16.6. It prints f after the fatq 1-epoch budget
and after the reference's 400 epochs, and the step at which each layer of the first model leaves
saturation under the reference recipe.

Models: ``--public FP32.th`` (the W<b>A<b> FAT model fatq-train starts from it, before any step),
fatq checkpoints (``--checkpoint``), FAT reference checkpoints (``--reference FILE.pth.tar``, imported).

Usage::

    python benchmarks/mask_saturation.py --public ../shared/pretrained/resnet20-cifar10-fp32.th \\
        --checkpoint paper-out/jobs/fat-w4/best.pt \\
        --reference ../shared/pretrained/fat-reference/resnet_20_4bit.pth.tar --json mask-saturation.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fatq.checkpoint import init_from_pretrained, load_fatq_checkpoint, model_from_checkpoint
from fatq.models.registry import create_model
from fatq.qconfig import QuantSpec
from fatq.reference_import import import_reference
from fatq.transform import FATTransform

SATURATION = 16.6  # sigmoid(x) rounds to 1.0 in float32 above ~16.64 (exp(-x) < 2^-24)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--public", type=Path, help="public FP32 ResNet-20 checkpoint (its W4A4 FAT model at init)")
    p.add_argument("--bits", type=int, default=4, help="bits of the model built from --public (default 4)")
    p.add_argument("--checkpoint", type=Path, action="append", default=[], help="fatq checkpoint (repeatable)")
    p.add_argument("--reference", type=Path, action="append", default=[], help="FAT reference checkpoint")
    p.add_argument("--json", type=Path, help="also write the figures here")
    # the reference CIFAR recipe (METHOD.md §4): T lr 0.02, weight decay 1e-4, momentum 0.9, batch 256,
    # 400 epochs with x0.1 at 150 and 225
    p.add_argument("--steps-per-epoch", type=int, default=196)
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    return p.parse_args(argv)


@torch.no_grad()
def mask_logits(weight: torch.Tensor, transform: FATTransform) -> torch.Tensor:
    """S [C_out, N] of one layer: weight [C_out, ...] and its FAT transform (METHOD.md §1.1-1.4)."""
    w = weight.float()
    rows = ((w - w.mean()) / w.std()).reshape(w.shape[0], -1)
    magnitude = torch.fft.fft(rows, dim=-1).abs()  # [C_out, N]
    return transform.mask(magnitude.t()).t()


def layer_figures(name: str, weight: torch.Tensor, transform: FATTransform) -> dict:
    """Saturation figures of one layer."""
    s = mask_logits(weight, transform)
    gate = torch.sigmoid(s)
    return {
        "layer": name,
        "n": s.shape[1],
        "c_out": s.shape[0],
        "t_mean": transform.mask.weight.mean().item(),
        "t_init": 1.0 / s.shape[0],
        "s_mean": s.mean().item(),
        "s_min": s.min().item(),
        "s_max": s.max().item(),
        "saturated_pct": 100.0 * (gate == 1.0).float().mean().item(),
        "mask_min": gate.min().item(),
        "mask_max": gate.max().item(),
    }


def fat_layers(model) -> dict:
    """{name: module} of the layers with a FAT transform."""
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, "weight_transform", None), FATTransform)}


def model_figures(model) -> list[dict]:
    return [layer_figures(name, m.weight, m.weight_transform) for name, m in fat_layers(model).items()]


def decay_factors(args, momentum: float | None = None) -> list[float]:
    """T(t)/T(0) after each step t of the schedule, with zero gradient (weight decay only).

    ``momentum`` overrides ``args.momentum`` (0: plain SGD, for comparison)."""
    momentum = args.momentum if momentum is None else momentum
    t, v, factors = 1.0, 0.0, []
    milestones = (150 * args.epochs // 400 * args.steps_per_epoch, 225 * args.epochs // 400 * args.steps_per_epoch)
    for step in range(args.epochs * args.steps_per_epoch):
        lr = args.lr * 0.1 ** sum(step >= m for m in milestones)
        v = momentum * v + args.weight_decay * t
        t -= lr * v
        factors.append(t)
    return factors


def saturated_share(s: torch.Tensor, factor: float) -> float:
    """% of mask entries exactly 1.0 in float32 once T (hence S, linear in T) is scaled by ``factor``."""
    return 100.0 * (torch.sigmoid(s * factor) == 1.0).float().mean().item()


def first_step_below(factors: list[float], s: torch.Tensor, share_pct: float) -> int | None:
    """First step whose decay factor leaves at most ``share_pct`` % of the entries saturated, or None.

    The factors decrease monotonically (T stays positive), so the share does too: bisect."""
    if saturated_share(s, factors[-1]) > share_pct:
        return None
    low, high = 0, len(factors) - 1
    while low < high:
        mid = (low + high) // 2
        if saturated_share(s, factors[mid]) <= share_pct:
            high = mid
        else:
            low = mid + 1
    return low + 1


def table(title: str, rows: list[dict]) -> str:
    lines = [
        f"### {title}",
        "",
        "| layer | N | C_out | mean T (init 1/C_out) | mean S | min S | mask == 1.0 | mask range |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['n']} | {r['c_out']} | {r['t_mean']:.5f} ({r['t_init']:.5f}) | {r['s_mean']:.2f} "
            f"| {r['s_min']:.2f} | {r['saturated_pct']:.1f} % | {r['mask_min']:.4f}–{r['mask_max']:.4f} |"
        )
    return "\n".join(lines) + "\n"


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    models: dict[str, list[dict]] = {}
    start = None  # the model at initialisation, whose S the decay model scales
    if args.public:
        start = create_model("resnet20", spec=QuantSpec.from_bits(args.bits), num_classes=10)
        init_from_pretrained(start, args.public)
        models[f"W{args.bits}A{args.bits} FAT from {args.public.name}, before any step"] = model_figures(start)
    for path in args.checkpoint:
        models[f"fatq checkpoint {path}"] = model_figures(model_from_checkpoint(load_fatq_checkpoint(path)))
    for path in args.reference:
        model, _ = import_reference(path, "resnet20", 4)
        models[f"reference checkpoint {path.name}"] = model_figures(model)
    if not models:
        sys.exit("mask_saturation.py: give --public, --checkpoint or --reference.")
    factors = decay_factors(args)
    one_epoch = factors[args.steps_per_epoch - 1]
    leaving = {}
    for name, layer in (fat_layers(start) if start is not None else {}).items():
        s = mask_logits(layer.weight, layer.weight_transform)
        leaving[name] = {
            "saturated_pct_at_init": saturated_share(s, 1.0),
            "saturated_pct_after_schedule": saturated_share(s, factors[-1]),
            "step_at_most_50pct": first_step_below(factors, s, 50.0),
            "step_at_most_1pct": first_step_below(factors, s, 1.0),
        }
    summary = {
        "decay_factor_after_1_epoch": one_epoch,
        "decay_factor_after_all_epochs": factors[-1],
        "decay_factor_without_momentum_all_epochs": decay_factors(args, momentum=0.0)[-1],
        "step_leaving_saturation": leaving,
        "schedule": {k: getattr(args, k) for k in ("steps_per_epoch", "epochs", "lr", "weight_decay", "momentum")},
    }
    for title, rows in models.items():
        print(table(title, rows))
    print(f"T decay by weight decay alone: x{one_epoch:.5f} after 1 epoch, x{factors[-1]:.4f} after {args.epochs} "
          f"epochs (x{summary['decay_factor_without_momentum_all_epochs']:.4f} without momentum)")  # fmt: skip
    if leaving:
        print("\nSaturated mask entries of the model at init as T decays (no gradient), reference schedule:\n")
        print("| layer | at init | after the schedule | <= 50 % from step (epoch) | <= 1 % from step (epoch) |")
        print("|---|---:|---:|---:|---:|")

        def when(step):
            return "never" if step is None else f"{step} ({step / args.steps_per_epoch:.1f})"

        for layer, r in leaving.items():
            print(f"| {layer} | {r['saturated_pct_at_init']:.1f} % | {r['saturated_pct_after_schedule']:.1f} % "
                  f"| {when(r['step_at_most_50pct'])} | {when(r['step_at_most_1pct'])} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"models": models, **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
