"""fatq-ptq: post-training quantization of an FP32 checkpoint (the PTQ baseline).

Example::

    fatq-ptq resnet20-cifar10-fp32.th --arch resnet20 --bits 8 --data-dir DATA \\
        --calib-method entropy --calib-batches 8 -o resnet20-ptq8.pt --json ptq8.json

The output is an ordinary fatq checkpoint (fatq-export and fatq-bench take it like any other),
whose ``ptq`` field records the calibration settings and whose ``metrics`` hold the test
accuracy measured in PyTorch.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from calibration.ptq import (
    WEIGHT_METHODS,
    NormalizedBatches,
    evaluate_top1,
    fp32_twin,
    load_fp32_model,
    quantize_post_training,
)
from fatq.calibrators import CALIBRATORS
from fatq.checkpoint import save_checkpoint
from fatq.cli_common import SentenceParser, run_cli
from fatq.data import load_split
from fatq.errors import FatqError
from fatq.io import write_json_atomic
from fatq.models import model_info
from fatq.output_check import check_distinct_outputs, check_output_file
from fatq.provenance import __version__, git_commit, sha256_file
from fatq.quantizers import FLOAT_BITS, check_bits


def build_parser() -> argparse.ArgumentParser:
    parser = SentenceParser(
        prog="fatq-ptq", description="Post-training quantization of an FP32 checkpoint with calibrated ranges."
    )
    parser.add_argument("checkpoint", type=Path, help="FP32 checkpoint: fatq format, or the public one (with --arch)")
    parser.add_argument("--bits", type=int, required=True, help="weight and activation bits of the body (2..8)")
    parser.add_argument("--data-dir", type=Path, required=True, help="dataset directory (train split calibrates)")
    parser.add_argument(
        "--calib-method", choices=sorted(CALIBRATORS), default="minmax", help="activation range calibrator"
    )
    parser.add_argument("--calib-batches", type=int, default=8, help="calibration batches from the train split")
    parser.add_argument("--batch-size", type=int, default=64, help="images per calibration batch")
    parser.add_argument("--eval-batch-size", type=int, default=256, help="images per evaluation batch")
    parser.add_argument("--percentile", type=float, default=99.99, help="percentile for --calib-method percentile")
    parser.add_argument("--weight-method", choices=WEIGHT_METHODS, default="max", help="per-channel weight ranges")
    parser.add_argument(
        "--no-bias-correction",
        action="store_true",
        help="skip matching every layer's output mean to the FP32 model's (calibration/bias_correction.py)",
    )
    parser.add_argument("--arch", help="architecture of a public checkpoint (fatq checkpoints record theirs)")
    parser.add_argument("--dataset", choices=("cifar10", "imagefolder"), default="cifar10", help="dataset layout")
    parser.add_argument("--seed", type=int, default=0, help="picks the calibration images")
    parser.add_argument("-o", "--output", type=Path, help="output checkpoint (default: <arch>-ptq<bits>-<method>.pt)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a 64-bit integer


def _check_outputs(args: argparse.Namespace, output: Path | None) -> None:
    """The checkpoint and the JSON report can be written and overwrite neither the source nor each other."""
    check_output_file(output, "output checkpoint (-o)")
    check_output_file(args.json, "JSON report (--json)")
    sources = [p for p in (args.checkpoint,) if p.is_file()]
    check_distinct_outputs({"-o": output, "--json": args.json}, sources)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.arch is not None:
        model_info(args.arch)  # unknown names fail before any work
    if args.calib_batches < 1 or args.batch_size < 1 or args.eval_batch_size < 1:
        raise FatqError("--calib-batches, --batch-size and --eval-batch-size must be at least 1.")
    if args.bits == FLOAT_BITS:
        raise FatqError("--bits must be 2..8 for post-training quantization.")
    check_bits(args.bits, "--bits")
    if not 0 < args.percentile <= 100:  # also refuses nan
        raise FatqError(f"--percentile must be in (0, 100], got {args.percentile}.")
    if not 0 <= args.seed < SEED_LIMIT:
        raise FatqError(f"--seed must be in 0..2^63-1, got {args.seed}.")
    if args.checkpoint.is_dir():
        raise FatqError(f"{args.checkpoint} is a directory; give the FP32 checkpoint file.")
    if not args.data_dir.is_dir():
        raise FatqError(f"data directory {args.data_dir} does not exist or is not a directory.")
    calib_options = {"percentile": args.percentile} if args.calib_method == "percentile" else {}
    _check_outputs(args, args.output)
    started = time.monotonic()

    test = load_split(args.data_dir, "test", args.dataset)
    model, meta = load_fp32_model(args.checkpoint, args.bits, args.arch, num_classes=len(test.class_names))
    output = args.output or Path(f"{model.arch}-ptq{args.bits}-{args.calib_method}.pt")
    _check_outputs(args, output)
    if model.num_classes != len(test.class_names):
        raise FatqError(f"the model has {model.num_classes} classes but {args.data_dir} has {len(test.class_names)}.")
    if meta["class_names"] is not None and list(meta["class_names"]) != list(test.class_names):
        raise FatqError(
            f"{args.checkpoint.name} was trained on the classes {meta['class_names'][:4]}, but {args.data_dir} "
            f"has {test.class_names[:4]}; calibration and top-1 would use unrelated labels."
        )
    train = load_split(args.data_dir, "train", args.dataset)
    normalization = meta["normalization"]
    batches = NormalizedBatches(train.images, normalization, args.calib_batches, args.batch_size, args.seed)
    reference = None if args.no_bias_correction else fp32_twin(model, args.checkpoint)
    alphas = quantize_post_training(
        model, batches, args.calib_method, args.weight_method, quiet=args.quiet, reference=reference, **calib_options
    )
    accuracy = evaluate_top1(model, test, normalization, args.eval_batch_size, quiet=args.quiet)

    command = shlex.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    provenance = {
        "command": command,
        "fatq_version": __version__,
        "git_commit": git_commit(),
        "torch": str(torch.__version__),  # TorchVersion is not weights_only-loadable
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    ptq = {
        "calib_method": args.calib_method,
        "calib_options": calib_options,
        "calib_batches": len(batches),
        "calib_images": batches.num_images,
        "batch_size": args.batch_size,
        "calib_split": "train",
        "seed": args.seed,
        "weight_method": args.weight_method,
        "bias_correction": not args.no_bias_correction,
        "source_checkpoint": str(args.checkpoint),
        "source_sha256": sha256_file(args.checkpoint),
        "source_format": meta["format"],
    }
    class_names = meta["class_names"] or test.class_names
    save_checkpoint(
        output,
        model,
        normalization,
        class_names,
        ptq=ptq,
        metrics={"test_top1": accuracy},
        provenance=provenance,
    )
    correction = "bias correction, " if reference is not None else ""
    print(
        f"{model.arch} PTQ W{args.bits}A{args.bits} ({args.calib_method}, weights {args.weight_method}, "
        f"{correction}{batches.num_images} calibration images): test top-1 {accuracy:.2f}% -> {output}"
    )
    if args.json is not None:
        write_json_atomic(
            args.json,
            {
                "arch": model.arch,
                "bits": args.bits,
                "test_top1": accuracy,
                "test_images": len(test),
                "checkpoint": str(output),
                **ptq,
                "activation_alphas": alphas,
                "seconds": round(time.monotonic() - started, 2),
                **provenance,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
