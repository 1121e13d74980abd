"""Streaming loader throughput (JPEG decode + RandomResizedCrop + flip) against the training step it feeds.

Generates an ImageFolder of JPEGs of ImageNet-like sizes and content into a temp dir (mean
about 500 x 375 px: smooth random fields plus fine noise, so files land near ImageNet's
~110 KB average rather than the megabytes of pure noise), then, interleaved in one run:

- the loader (:class:`fatq.streaming.StreamBatches`, training transform) over all images, for
  each worker count, images/s;
- single-image costs in this process: decode (``torchvision.io.decode_image``) and augment
  (the v2 transform) separately, ms/image;
- the training step of the model (``benchmarks/train_step.py``'s step: forward, loss, backward,
  SGD) on random inputs of the same size, images/s.

    python benchmarks/loader.py --images 256 --workers 0,1,2 --arch resnet18 --bits 4 --batch-size 16

Medians over ``--repeats``; quote the ratios. On a machine shared with other jobs, say so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_step.py beside this file
from train_step import machine_facts, timed_step, variants  # noqa: E402

from fatq.streaming import StreamBatches, scan_split, seeded, train_transform  # noqa: E402
from fatq.train import build_model, build_optimizer  # noqa: E402

IDENTITY = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


def generate_jpeg_folder(root: Path, images: int, classes: int = 8, seed: int = 0, quality: int = 90) -> dict:
    """Write ``images`` JPEGs (train/ and a 1-per-class val/) of sizes around 500 x 375; returns size facts."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes, nbytes = [], []
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            width = int(rng.uniform(400, 600))
            height = int(width * rng.choice([0.75, 0.75, 0.75, 1.0, 0.5625, 1.333]))  # mostly 4:3, some portrait
            coarse = rng.integers(0, 256, size=(height // 24 + 2, width // 24 + 2, 3), dtype=np.uint8)
            field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
            pixels = np.clip(field + rng.normal(0, 9, size=field.shape), 0, 255).astype(np.uint8)
            path = folder / f"{i:06d}.jpg"
            Image.fromarray(pixels).save(path, quality=quality)
            if split == "train":
                sizes.append((width, height))
                nbytes.append(path.stat().st_size)
    return {
        "images": images,
        "mean_width": float(np.mean([w for w, _ in sizes])),
        "mean_height": float(np.mean([h for _, h in sizes])),
        "mean_kb": float(np.mean(nbytes) / 1024),
        "quality": quality,
    }


def loader_rate(split, size: int, batch: int, workers: int, epoch: int) -> float:
    """Images/s of one pass of the streaming training loader (time to first batch included)."""
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in StreamBatches(split, size, batch, IDENTITY, torch.device("cpu"),
                                                          epoch=epoch, workers=workers))  # fmt: skip
    return count / (time.perf_counter() - start)


def per_image_costs(split, size: int, samples: int = 32) -> tuple[float, float]:
    """Median ms/image of decode alone and of the training transform alone, on one thread as in a worker.

    DataLoader workers run with one torch thread; with more, a resize of one image is split
    across threads, which on a loaded machine costs far more than it saves (measured: ~25 ms
    instead of ~2 ms per image with 2 threads here).
    """
    from torchvision.io import ImageReadMode, decode_image, read_file

    transform = train_transform(size)
    decode_ms, augment_ms = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for index, path in enumerate(split.files[:samples]):
        data = read_file(path)
        start = time.perf_counter()
        image = decode_image(data, mode=ImageReadMode.RGB)
        middle = time.perf_counter()
        seeded(transform, image, index)
        decode_ms.append((middle - start) * 1000)
        augment_ms.append((time.perf_counter() - middle) * 1000)
    torch.set_num_threads(threads)
    return statistics.median(decode_ms), statistics.median(augment_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="training JPEGs to generate")
    parser.add_argument("--size", type=int, default=224, help="crop side")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=16, help="loader and training-step batch")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="training steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the training step")
    parser.add_argument("--keep", default=None, help="generate the folder here and keep it (default: a temp dir)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    worker_counts = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="fatq-loader-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp) / "jpegs"
        if not (root / "train").is_dir():
            facts = generate_jpeg_folder(root, args.images)
        else:
            facts = {"images": args.images, "note": f"reused {root}"}
        split = scan_split(root, "train")

        torch.manual_seed(0)
        cfg = variants(args.arch, args.bits)["fat"]
        model = build_model(cfg, num_classes=len(split.class_names)).train()
        optimizer = build_optimizer(model, cfg)
        images = torch.randn(args.batch_size, 3, args.size, args.size)
        labels = torch.randint(0, len(split.class_names), (args.batch_size,))
        device = torch.device("cpu")
        timed_step(model, optimizer, images, labels, device, False, time.perf_counter)  # warm-up

        rates = {w: [] for w in worker_counts}
        step_rates, decode_ms, augment_ms = [], [], []
        load_before = os.getloadavg()
        for repeat in range(args.repeats):  # interleaved: a change in machine load hits every figure alike
            for workers in worker_counts:
                rates[workers].append(loader_rate(split, args.size, args.batch_size, workers, epoch=repeat))
            d, a = per_image_costs(split, args.size)
            decode_ms.append(d)
            augment_ms.append(a)
            for _ in range(args.steps):
                seconds = timed_step(model, optimizer, images, labels, device, False, time.perf_counter)
                step_rates.append(args.batch_size / seconds)
        load_after = os.getloadavg()

    medians = {w: statistics.median(r) for w, r in rates.items()}
    step = statistics.median(step_rates)
    machine = machine_facts(device)
    print(f"streaming loader vs {args.arch} W{args.bits}A{args.bits} training step at {args.size}x{args.size}, "
          f"batch {args.batch_size}, {args.repeats} repeats (medians)")  # fmt: skip
    print("  " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    print("  data: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in facts.items()))
    print(f"  load average before/after (1 min): {load_before[0]:.2f} / {load_after[0]:.2f}")
    print(f"  per image, one thread: decode {statistics.median(decode_ms):.2f} ms, "
          f"augment {statistics.median(augment_ms):.2f} ms")  # fmt: skip
    for workers, rate in medians.items():
        print(f"  loader, {workers} workers: {rate:8.1f} images/s  ({rate / step:.2f} x the training step)")
    print(f"  training step:      {step:8.1f} images/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "size": args.size,
                    "batch_size": args.batch_size,
                    "arch": args.arch,
                    "bits": args.bits,
                    "data": facts,
                    "loader_images_per_s": {str(k): v for k, v in medians.items()},
                    "decode_ms": statistics.median(decode_ms),
                    "augment_ms": statistics.median(augment_ms),
                    "train_step_images_per_s": step,
                    "load_average": [load_before[0], load_after[0]],
                    **machine,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
