"""``fatq-bench``: latency, accuracy and parity of models on inference engines, side by side.

Exit status: 0 done (gate passed or not asked), 1 the parity gate failed (which run, by how
much, on stderr), 2 bad input (one sentence on stderr).

Examples::

    fatq-bench w4a4.onnx w4a4-fp32.onnx --engine ort --engine openvino --batch-sizes 1,64 \\
        --data-dir data/ --reference w4a4.pt --min-agreement 99.9 --json bench.json
    fatq-bench w4a4.pt --engine torch --batch-sizes 1,8
    fatq-bench nncf-int8.xml their-model.onnx --data-dir data/ --normalization cifar10

Every output path and flag value is checked before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path

from engines.bench import BenchSettings, run_benchmark
from engines.model_files import CHECKPOINT, ModelFile, inspect_model
from engines.registry import ENGINES, PRECISIONS, RunnerOptions, default_engine
from engines.report import markdown_report, terminal_report, write_plot
from engines.torch_runner import MODES
from engines.trt_builder import TYPINGS
from fatq.checkpoint import CIFAR_NORMALIZATION, IMAGENET_NORMALIZATION, check_layout, load_fatq_checkpoint
from fatq.cli_common import SentenceParser, run_cli
from fatq.errors import FatqError
from fatq.extras import import_extra
from fatq.io import write_json_atomic, write_text_atomic
from fatq.output_check import check_distinct_outputs, check_output_file

NORMALIZATIONS = {"cifar10": CIFAR_NORMALIZATION, "imagenet": IMAGENET_NORMALIZATION}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer 0 or more, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer 0 or more, got {value}")
    return value


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 100.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a value in 0..100, got {value}")
    return value


def _points(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"expected accuracy points in 0..100, got {value}")
    return value


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = SentenceParser(
        prog="fatq-bench",
        description="Benchmark models on inference engines: latency per batch size, accuracy on the test split, "
        "agreement with the PyTorch model, and an accuracy-parity gate for CI.",
    )
    parser.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="ONNX file, TensorRT plan (.plan with .json sidecar) or fatq checkpoint; several are "
        "run side by side (e.g. the QDQ file and its onnx-fp32 twin)",
    )
    parser.add_argument(
        "--engine",
        action="append",
        choices=tuple(ENGINES),
        dest="engines",
        help="engine to run (repeatable); default: ort for ONNX, trt for plans, torch for checkpoints",
    )
    parser.add_argument(
        "--precision",
        action="append",
        choices=PRECISIONS,
        dest="precisions",
        help="precision to run (repeatable); default: each model's own (int8 for QDQ, fp32 for "
        "float); bf16 = OpenVINO's bf16 mode, fp16 = TensorRT/torch-cuda fp16 from a float model",
    )
    parser.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default=(1, 8, 64),
        help="comma-separated (default 1,8,64); a file with a fixed batch runs at that batch only",
    )
    parser.add_argument(
        "--warmup", type=_non_negative_int, default=10, help="untimed calls per run and batch size (default 10)"
    )
    parser.add_argument(
        "--iterations", type=_positive_int, default=50, help="timed calls per run and batch size (default 50)"
    )
    parser.add_argument(
        "--rounds",
        type=_positive_int,
        default=5,
        help="turns the iterations are split into, runs taking turns (default 5)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads per engine (default: all cores of this machine)",
    )
    parser.add_argument("--data-dir", type=Path, help="dataset for top-1/top-5 (its test split)")
    parser.add_argument(
        "--dataset", choices=("cifar10", "imagefolder"), default="cifar10", help="dataset layout (default cifar10)"
    )
    parser.add_argument(
        "--limit",
        type=_positive_int,
        help="evaluate on this many test images, evenly spaced (default all; 256 random inputs without --data-dir)",
    )
    parser.add_argument(
        "--mean",
        type=_floats,
        metavar="M,M,M",
        help="per-channel mean on [0, 1] for files that record no normalization (foreign ONNX, OpenVINO IR)",
    )
    parser.add_argument("--std", type=_floats, metavar="S,S,S", help="per-channel std, with --mean")
    parser.add_argument(
        "--normalization",
        choices=tuple(NORMALIZATIONS),
        help="a named --mean/--std for files that record none (cifar10: fatq's CIFAR-10 statistics; imagenet)",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        metavar="CKPT",
        help="fatq checkpoint whose eval-mode model every run is compared with",
    )
    parser.add_argument(
        "--reference-mode",
        choices=MODES,
        default="eval",
        help="reference model: eval = the trained fake-quant model (default); deploy = its deploy reference, "
        "the same checkpoint with the engines' integer semantics (int32 bias), which int8 engines match exactly",
    )
    parser.add_argument(
        "--min-agreement",
        type=_percent,
        metavar="PCT",
        help="gate: exit 1 if any run's top-1 agreement with --reference is below PCT",
    )
    parser.add_argument(
        "--max-accuracy-drop",
        type=_points,
        metavar="PTS",
        help="gate: exit 1 if any run's top-1 is more than PTS points below the reference's",
    )
    parser.add_argument(
        "--torch-mode",
        choices=MODES,
        default="eval",
        help="torch engines: eval = the trained (fake-quant) model, deploy = export's deploy reference (default eval)",
    )
    parser.add_argument(
        "--trt-typing",
        choices=TYPINGS,
        default="auto",
        help="TensorRT network typing (default auto: strong, weak for fp16 on 10.x)",
    )
    parser.add_argument(
        "--trt-workspace-mib",
        type=_positive_int,
        default=1024,
        help="TensorRT builder workspace limit in MiB (default 1024)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON (docs/bench_schema.md)")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="write the tables as markdown")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of latency, throughput and accuracy")
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no terminal table")
    return parser


def _check_outputs(args: argparse.Namespace) -> None:
    """Every file fatq-bench will write can be written, and none overwrites an input (before any work)."""
    outputs = {"--json": args.json, "--markdown": args.markdown, "--plot": args.plot}
    for (flag, path), what in zip(outputs.items(), ("JSON report", "markdown report", "plot"), strict=True):
        check_output_file(path, f"{what} ({flag})")
    inputs = [Path(m) for m in args.models] + ([args.reference] if args.reference else [])
    check_distinct_outputs(outputs, [p for p in inputs if p.is_file()])
    if args.plot is not None:
        import_extra("matplotlib")  # a missing extra fails now, not after the benchmark


def _normalization(args: argparse.Namespace) -> dict | None:
    """The --mean/--std (or --normalization) for files that record none, or None."""
    if args.normalization is not None:
        if args.mean is not None or args.std is not None:
            raise FatqError("give either --normalization or --mean/--std, not both.")
        return NORMALIZATIONS[args.normalization]
    if (args.mean is None) != (args.std is None):
        raise FatqError("--mean and --std go together (one value per input channel each).")
    if args.mean is None:
        return None
    if len(args.mean) != len(args.std):
        raise FatqError(f"--mean has {len(args.mean)} values, --std {len(args.std)}; give one per channel.")
    if min(args.std) <= 0:
        raise FatqError(f"--std values must be positive, got {list(args.std)}.")
    return {"mean": list(args.mean), "std": list(args.std)}


def _recorded(model: ModelFile, key: str):
    """A JSON value an ONNX file or IR records in its metadata (None when absent or unreadable)."""
    try:
        return json.loads(model.metadata[key]) if key in model.metadata else None
    except ValueError:
        return model.metadata[key]  # plain strings (e.g. arch) are stored unquoted


def _check_reference_fits(models: list[ModelFile], reference: Path) -> None:
    """Refuse a --reference of another architecture or class count than a model records.

    Agreement against another network is meaningless (it reads as 0 %); files that record no
    architecture (foreign ONNX, IR) are not checked.
    """
    data = check_layout(load_fatq_checkpoint(reference), reference)
    for model in models:
        if model.kind == CHECKPOINT:
            recorded = load_fatq_checkpoint(model.path)
            arch, classes = recorded["arch"], recorded["num_classes"]
        else:
            arch, classes = _recorded(model, "arch"), _recorded(model, "num_classes")
        if arch is not None and arch != data["arch"]:
            raise FatqError(
                f"--reference {reference.name} is a {data['arch']}, but {model.path.name} was made from a {arch}; "
                "pass the checkpoint the file was exported from."
            )
        if classes is not None and int(classes) != data["num_classes"]:
            raise FatqError(
                f"--reference {reference.name} has {data['num_classes']} classes, {model.path.name} has {classes}."
            )


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    _check_outputs(args)
    normalization = _normalization(args)
    if args.reference is not None and not args.reference.is_file():
        raise FatqError(f"reference checkpoint {args.reference} does not exist.")
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise FatqError(f"data directory {args.data_dir} does not exist or is not a directory.")
    if args.min_agreement is not None and args.reference is None:
        raise FatqError("--min-agreement needs --reference (agreement is measured against the reference model).")
    if args.max_accuracy_drop is not None and (args.reference is None or args.data_dir is None):
        raise FatqError("--max-accuracy-drop needs --reference and --data-dir.")
    models = [inspect_model(m) for m in args.models]  # each file is read once, here
    if args.reference is not None:
        _check_reference_fits(models, args.reference)
    engines = args.engines or list(dict.fromkeys(default_engine(m) for m in models))
    settings = BenchSettings(
        batch_sizes=args.batch_sizes,
        warmup=args.warmup,
        iterations=args.iterations,
        rounds=args.rounds,
        threads=args.threads or os.cpu_count(),
        data_dir=args.data_dir,
        dataset=args.dataset,
        limit=args.limit,
        reference=args.reference,
        reference_mode=args.reference_mode,
        min_agreement=args.min_agreement,
        max_accuracy_drop=args.max_accuracy_drop,
        normalization=normalization,
        runner_options=RunnerOptions(
            torch_mode=args.torch_mode, trt_typing=args.trt_typing, trt_workspace_mib=args.trt_workspace_mib
        ),
    )
    command = shlex.join(["fatq-bench", *(sys.argv[1:] if argv is None else argv)])
    report = run_benchmark(models, engines, args.precisions, settings, command=command, quiet=args.quiet)
    if args.json:
        write_json_atomic(args.json, report)
    if args.markdown:
        write_text_atomic(args.markdown, markdown_report(report))
    if args.plot:
        write_plot(report, args.plot)
    if not args.quiet:
        print(terminal_report(report))
    gate = report["gate"]
    if not gate["passed"]:
        for reason in gate["reasons"]:
            print(f"fatq-bench: gate failed: {reason}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``fatq-bench``; returns the exit status."""
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
