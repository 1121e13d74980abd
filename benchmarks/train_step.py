"""Median training-step time: FAT W4A4 vs the same model without the transform vs FP32.

The models train side by side in one process, one step each in turn, so a change in machine
load hits all alike; the ratios are the figures to quote. Each step is what ``fatq-train`` does:
autocast (with --amp), forward with the weight paths batched over layers of equal shape
(:mod:`fatq.weight_groups`), cross-entropy, backward, SGD with the recipe's parameter groups.
Inputs are random normalized images (speed does not depend on data). Variants: fat,
fat-per-layer (the same model with every layer's weight path run on its own, as before the
batching), no-transform, fp32, and on CUDA fat-graph (the fat step captured once as a CUDA graph
and replayed: what launch overhead costs; a measurement, not a fatq-train option).

    python benchmarks/train_step.py --device cpu --steps 10
    python benchmarks/train_step.py --device cuda --batch-size 256 --steps 50 --amp
    python benchmarks/train_step.py --arch resnet18 --image-size 224 --batch-size 16 --variants fat

The target is FAT <= 1.15 x the plain quantized step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F

from fatq import __version__
from fatq.distributed import resolve_device
from fatq.layers import QUANTIZED_LAYERS
from fatq.train import TrainConfig, autocast_context, build_model, build_optimizer, default_lr
from fatq.weight_groups import grouped_weights, weight_groups

VARIANTS = ("fat", "fat-per-layer", "no-transform", "fp32", "fat-graph")
PER_LAYER = ("fat-per-layer",)  # variants whose weight paths run layer by layer


def variants(arch: str, bits: int) -> dict[str, TrainConfig]:
    """The models compared: FAT (batched weight paths, per layer, CUDA graph), the plain uniform quantizer
    (transform off), FP32."""
    fat = TrainConfig(arch=arch, data_dir="-", weight_bits=bits, act_bits=bits)
    return {
        "fat": fat,
        "fat-per-layer": fat,
        "no-transform": TrainConfig(arch=arch, data_dir="-", weight_bits=bits, act_bits=bits, transform=False),
        "fp32": TrainConfig(arch=arch, data_dir="-", weight_bits=32, act_bits=32, lr=default_lr(32)),
        "fat-graph": fat,
    }


def batched(model, groups: list | None):
    """The weight-path context of a step: ``groups`` (:func:`weight_groups`) batched, or None: layer by layer."""
    return nullcontext() if groups is None else grouped_weights(model, groups)


def train_step(model, optimizer, images, labels, device: torch.device, amp: bool, groups: list | None) -> None:
    """One training step as fatq-train takes it (autocast, forward, loss, backward, SGD)."""
    with autocast_context(device, amp), batched(model, groups):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def timed(step, device: torch.device, clock) -> float:
    """Seconds of ``step()``, the device synchronized before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def graphed_step(step) -> Callable[[], None]:
    """``step`` captured as one CUDA graph (after three eager warm-up steps on a side stream, as PyTorch's
    whole-network capture example does); returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def weight_path_time(model: torch.nn.Module, clock, device: torch.device, groups: list | None) -> float:
    """Seconds for forward + backward of every quantized layer's weight path (transform + quantizer)."""
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    with batched(model, groups):
        total = sum(layer.quantized_weight().square().sum() for layer in layers)
    total.backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def machine_facts(device: torch.device) -> dict:
    facts = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fatq": __version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["cuda"] = torch.version.cuda
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32, help="side of the random square inputs")
    parser.add_argument(
        "--variants",
        default="fat,fat-per-layer,no-transform,fp32,fat-graph",
        help=f"comma-separated subset of {', '.join(VARIANTS)} (fat-graph: CUDA only)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU)")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=("wall", "cpu"),
        help="wall: elapsed time; cpu: CPU time of the calling thread, which a loaded machine does not "
        "inflate (CPU only, and only meaningful with --threads 1, where all work runs in that thread)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        parser.error("--clock cpu needs --device cpu and --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    torch.manual_seed(0)
    size = (args.batch_size, 3, args.image_size, args.image_size)
    images = torch.randn(size, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    chosen = args.variants.split(",")
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if "fat-graph" in chosen and device.type != "cuda":
        print("note: fat-graph needs CUDA; left out")
        chosen.remove("fat-graph")
    runs = {}
    for name, cfg in variants(args.arch, args.bits).items():
        if name not in chosen:
            continue
        model = build_model(cfg, num_classes=10).to(device).train()
        optimizer = build_optimizer(model, cfg)
        groups = None if name in PER_LAYER else weight_groups(model)  # once, as fatq-train's Trainer does
        step = partial(train_step, model, optimizer, images, labels, device, args.amp, groups)
        if name == "fat-graph":
            try:
                step = graphed_step(step)
            except Exception as error:  # a measurement: report why capture failed and go on without it
                print(f"note: fat-graph left out, capture failed: {type(error).__name__}: {str(error)[:300]}")
                continue
        runs[name] = (model, step, [], groups)

    load_before = os.getloadavg()
    for index in range(args.warmup + args.steps):
        for _, step, times, _ in runs.values():  # interleaved: load changes hit all models alike
            seconds = timed(step, device, clock)
            if index >= args.warmup:
                times.append(seconds)
    # the weight path alone (transform + quantizer, forward and backward, all layers): the part FAT
    # adds, measured without the activation work whose timing noise can hide it in a full step
    weight_path = {name: [] for name in ("fat", "fat-per-layer", "no-transform") if name in runs}
    for index in range(args.warmup + 5 * args.steps):
        for name, times in weight_path.items():
            seconds = weight_path_time(runs[name][0], clock, device, runs[name][3])
            if index >= args.warmup:
                times.append(seconds)
    load_after = os.getloadavg()

    medians = {name: statistics.median(times) for name, (_, _, times, _) in runs.items()}
    pairs = (
        ("fat", "no-transform"),
        ("fat", "fp32"),
        ("no-transform", "fp32"),
        ("fat", "fat-per-layer"),
        ("fat-graph", "fat"),
    )
    ratios = {f"{a} / {b}": medians[a] / medians[b] for a, b in pairs if a in medians and b in medians}
    facts = machine_facts(device)
    print(f"{args.arch} W{args.bits}A{args.bits} training step, batch {args.batch_size}, amp {args.amp}, "
          f"{args.steps} timed steps per model (median, {args.clock} clock)")  # fmt: skip
    print("  " + ", ".join(f"{k} {v}" for k, v in facts.items()))
    print(f"  load average before/after (1 min): {load_before[0]:.2f} / {load_after[0]:.2f}")
    for name, seconds in medians.items():
        print(f"  {name:13s} {seconds * 1000:9.1f} ms/step  {args.batch_size / seconds:8.1f} images/s")
    for name, value in ratios.items():
        print(f"  {name:21s} {value:.3f}")
    paths = {name: statistics.median(times) for name, times in weight_path.items()}
    for name, seconds in paths.items():
        print(f"  weight path alone, {name}: {seconds * 1000:.1f} ms")
    if "fat" in paths and "no-transform" in paths:  # the FAT-overhead figures need both
        added = paths["fat"] - paths["no-transform"]
        print(
            f"  weight path alone: fat {paths['fat'] * 1000:.1f} ms, no-transform {paths['no-transform'] * 1000:.1f} "
            f"ms: the transform adds {added * 1000:.1f} ms = {100 * added / medians['no-transform']:.1f} % "
            "of a plain step"
        )
        verdict = "meets" if ratios["fat / no-transform"] <= 1.15 else "misses"
        print(f"  FAT overhead {100 * (ratios['fat / no-transform'] - 1):+.1f} % ({verdict} the <= 15 % target)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "arch": args.arch,
                    "bits": args.bits,
                    "batch_size": args.batch_size,
                    "image_size": args.image_size,
                    "amp": args.amp,
                    "steps": args.steps,
                    "clock": args.clock,
                    "median_s": medians,
                    "ratios": ratios,
                    "weight_path_median_s": paths,
                    "load_average": [load_before[0], load_after[0]],
                    **facts,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
