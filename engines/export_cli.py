"""``fatq-export``: a trained fatq checkpoint -> QDQ int8 ONNX (or float ONNX), checked and linted.

    fatq-export CKPT --format onnx [-o OUT] [--opset N] [--calib-data DIR] [--check ...]
    fatq-export CKPT --format onnx-ort ...       (same integers, for ONNX Runtime's CPU kernels)
    fatq-export CKPT --format onnx-openvino ...  (same integers, for OpenVINO's CPU plugin)
    fatq-export --lint model.onnx [--target trt|ort|openvino] [--trt-version 10.0]

Writes OUT (ONNX, with provenance in ``metadata_props``), OUT's ``.deploy.npz`` (the folded
deploy graph the file was written from, see :mod:`export.deploy_graph`) and, for int8 files, OUT's
``.reference.pt``: the PyTorch model the file's engines compute (:mod:`export.engine_exact`: the model as
trained, moved off rounding ties, and for ``onnx-ort`` with its biases on the int32 grid), which
``--check`` and ``fatq-bench --reference`` compare against. A
portable file is checked against the TensorRT rules of :mod:`export.lint_rules` before it is written;
nothing is written on an error. ``--lint`` runs the same rule table on any file
(:func:`export.lint_rules.main_lint`). ``--format trt`` writes the ``--format onnx`` file and builds a
TensorRT plan from it (:func:`engines.trt_builder.build_plan_from_onnx`) where TensorRT and a GPU exist;
elsewhere it exits 2 with one sentence before writing anything.
``--check`` runs it in ONNX Runtime (OpenVINO for ``onnx-openvino`` files, or ``--check-engine``) against
the deploy reference and the model that engine computes (:mod:`engines.deploy_check`) and exits 1 below
``--min-agreement``.

This module only parses, calls :func:`export.pipeline.export_checkpoint` (and
:func:`engines.deploy_check.check_export`) and prints. It lives in ``engines`` rather than
``export`` because ``--check`` runs engines: the dependency rule is one-way (``engines`` may
import ``export``, never the reverse; docs/architecture.md), so the command that uses both sits
in the upper package, like fatq-bench (:mod:`engines.cli`).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from engines.deploy_check import DEFAULT_CHECK_IMAGES, check_export, check_images
from export.edge_weights import describe
from export.formats import FORMATS
from export.lint_rules import DEFAULT_TRT_VERSION, TARGETS
from export.onnx_builder import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from export.pipeline import CALIB_BATCH_SIZE, CalibrationSettings, export_checkpoint
from fatq.calibrators import CALIBRATORS
from fatq.cli_common import SentenceParser, run_cli
from fatq.errors import FatqError
from fatq.io import write_json_atomic

# the engines --check can run (engines.deploy_check observes their tensors)
CHECK_ENGINES = ("ort", "openvino")
# --check bounds (top-1 agreement %, identical integers % per tensor): exact parity, and the bound of a
# --target trt model in the CPU engines (see check_bounds; measured in docs/tensorrt.md)
EXACT_BOUNDS = (99.9, 99.99)
FLOAT_BRANCH_BOUNDS = (99.5, 98.0)


def build_parser() -> argparse.ArgumentParser:
    parser = SentenceParser(
        prog="fatq-export",
        description="Export a fatq checkpoint to QDQ int8 ONNX (or float ONNX) for integer inference engines.",
    )
    parser.add_argument("checkpoint", nargs="?", help="fatq checkpoint (.pt) to export")
    parser.add_argument(
        "--format",
        choices=(*FORMATS, "trt"),
        default="onnx",
        help="onnx: the TensorRT QDQ int8 file (float biases, opset 20), which OpenVINO and ONNX Runtime also "
        "read (default); trt: that file and a TensorRT int8 plan built from it (-o names the .plan; needs TensorRT "
        "and a GPU); onnx-ort: the same "
        "integers as uint8 QOperator ops, faster in ONNX Runtime, for nothing else (export/ort_writer.py); "
        "onnx-openvino: the same integers with 4-bit quantizers as OpenVINO FakeQuantize ops, faster in "
        "OpenVINO, for nothing else (export/openvino_writer.py); onnx-fp32: folded float",
    )
    parser.add_argument(
        "-o",
        "--output",
        help="output .onnx path (default: beside the checkpoint, <stem>.onnx / .ort.onnx / .ov.onnx / .fp32.onnx)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})",
    )
    calib = parser.add_argument_group(
        "calibration (ranges of quantizers the model keeps float; the values the engine-exact moves avoid)"
    )
    calib.add_argument(
        "--calib-data",
        help="dataset directory or .tar.gz; its train split calibrates disabled quantizers, and the engine-exact "
        "moves avoid crossing the values its images reach (recommended: the moved model then stays the model "
        "as trained on nearly every input)",
    )
    calib.add_argument(
        "--calib-batches", type=int, default=16, help=f"calibration batches of {CALIB_BATCH_SIZE} images (default 16)"
    )
    calib.add_argument(
        "--calib-method",
        default="percentile",
        choices=sorted(CALIBRATORS),
        help="minmax, percentile (default), entropy or mse",
    )
    check = parser.add_argument_group("check")
    check.add_argument(
        "--check",
        action="store_true",
        help="run the file in ONNX Runtime (OpenVINO for onnx-openvino) against the reference and the model",
    )
    check.add_argument(
        "--check-engine",
        choices=CHECK_ENGINES,
        help="run --check in this engine instead (one that reads the format): e.g. openvino on the TensorRT "
        "file computes its float biases as TensorRT does",
    )
    check.add_argument(
        "--check-images",
        type=int,
        help=f"images to check (default {DEFAULT_CHECK_IMAGES} with --data-dir, else 256 random)",
    )
    check.add_argument("--data-dir", help="dataset for --check (its test split); random inputs without it")
    check.add_argument(
        "--min-agreement",
        type=float,
        help=f"min top-1 agreement %% engine vs model (default {EXACT_BOUNDS[0]}; {FLOAT_BRANCH_BOUNDS[0]} for a "
        "--target trt model, whose branch convs the CPU engines run in float)",
    )
    check.add_argument(
        "--min-int8-identical",
        type=float,
        help=f"min %% identical int8s per tensor, unless every value the engine computes differently is a "
        f"rounding tie (default {EXACT_BOUNDS[1]}; {FLOAT_BRANCH_BOUNDS[1]} for --target trt)",
    )
    parser.add_argument(
        "--as-trained",
        action="store_true",
        help="export the model exactly as trained: do not move residual-sum ranges off rounding ties, nor (onnx-ort) "
        "biases onto the int32 grid and BN scales off ties (export/engine_exact.py); no .reference.pt is written, "
        "the report counts the residual sums an engine may round another way, and --check compares with the model "
        "as trained",
    )
    parser.add_argument("--json", help="write the export (and check) report as JSON here")
    lint = parser.add_argument_group("lint")
    lint.add_argument(
        "--lint",
        metavar="FILE",
        help="only check FILE against the rules of --target (export/lint_rules.py): exit 1 on findings, 0 clean",
    )
    lint.add_argument(
        "--target", choices=TARGETS, default="trt", help="the engine whose rules --lint applies (default trt)"
    )
    lint.add_argument(
        "--trt-version",
        default=DEFAULT_TRT_VERSION,
        help=f"TensorRT release line for --target trt: 10.0, 10.1, 10.15 or 11 (default {DEFAULT_TRT_VERSION})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


# --- lint -----------------------------------------------------------------------------------


def lint(path: str, target: str, trt_version: str) -> int:
    """:func:`export.lint_rules.main_lint`, plus a note when FILE is an engine-specific fatq file (its
    own ops by design, so the portable rules do not apply). Exit 1 on findings, 0 clean."""
    from export.formats import format_of
    from export.lint_rules import load_model, main_lint

    status = main_lint(path, target, trt_version)
    own = format_of(load_model(path))
    if status and own is not None and own.purpose is not None:
        print(
            f"{path}: written by fatq-export --format {own.name} for {own.purpose} by design; export --format "
            "onnx for the other engines.",
            file=sys.stderr,
        )
    return status


# --- export ---------------------------------------------------------------------------------


def export_plan(args, argv: list[str]) -> int:
    """``--format trt``: the TensorRT ONNX file (``<plan stem>.onnx`` and its companions), then a strongly
    typed int8 plan built from it. TensorRT and a GPU are checked first: without them nothing is written."""
    from pathlib import Path

    from engines.trt_builder import PLAN_SUFFIXES, BuildSettings, build_plan_from_onnx, require_gpu
    from fatq.extras import import_extra

    checkpoint = Path(args.checkpoint)
    plan = Path(args.output) if args.output else checkpoint.with_name(checkpoint.stem + ".plan")
    if plan.suffix not in PLAN_SUFFIXES:
        raise FatqError(f"--format trt writes a TensorRT plan: -o must end in {' or '.join(PLAN_SUFFIXES)}.")
    if args.check:
        raise FatqError("--check runs ONNX Runtime or OpenVINO; check a plan with fatq-bench --engine trt --reference.")
    import_extra("tensorrt")
    require_gpu()
    args.format, args.output = "onnx", str(plan.with_suffix(".onnx"))
    status = export(args, argv)
    sidecar = build_plan_from_onnx(args.output, plan, BuildSettings("int8"))
    print(f"wrote {plan} (TensorRT {sidecar.get('tensorrt_version', '?')})")
    return status


def export(args, argv: list[str]) -> int:
    """Run the export (and ``--check``) the parsed flags ask for; returns the exit status."""
    if args.format == "trt":
        return export_plan(args, argv)
    _check_arguments(args)
    result = export_checkpoint(
        args.checkpoint,
        args.format,
        output=args.output,
        opset=args.opset,
        calibration=CalibrationSettings(args.calib_data, args.calib_batches, args.calib_method),
        engine_exact=not args.as_trained,
        keep_as_trained=args.check and not args.as_trained,  # --check compares with it
        command=" ".join(shlex.quote(a) for a in ["fatq-export", *argv]),
        quiet=args.quiet,
    )
    out, nodes = result.output, len(result.onnx_model.graph.node)
    if result.graph.meta.get("edge_weight_requantization", "none") != "none":
        print(describe(result.graph.meta["edge_weight_requantization"]))
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB, {nodes} nodes) in {result.seconds:.2f} s")
    report = result.report()
    status = 0
    if args.check:
        try:  # data the check cannot use: the export's files go too (a failed export leaves nothing)
            images, labels, source = check_images(
                result.checkpoint, args.data_dir, args.check_images, result.graph.input_shape
            )
        except FatqError:
            for path in (out, *result.companions):
                path.unlink(missing_ok=True)
            raise
        min_agreement, min_identical = check_bounds(result.graph.meta, args.min_agreement, args.min_int8_identical)
        report["check"] = check_export(
            result, images, labels, source, min_agreement, min_identical, quiet=args.quiet, engine=args.check_engine
        )
        _print_check(report["check"])
        status = 0 if report["check"]["passed"] else 1
    if args.json:
        write_json_atomic(args.json, report)
    return status


def _check_arguments(args) -> None:
    """Every flag and output location is usable, before anything is computed or written."""
    from pathlib import Path

    from export.formats import companion_path
    from export.pipeline import output_path
    from fatq.output_check import check_distinct_outputs, check_output_file

    for flag, value in (("--min-agreement", args.min_agreement), ("--min-int8-identical", args.min_int8_identical)):
        if value is not None and not 0 <= value <= 100:
            raise FatqError(f"{flag} is a percentage between 0 and 100, got {value}.")
    if args.calib_batches < 1:
        raise FatqError(f"--calib-batches must be at least 1, got {args.calib_batches}.")
    if args.calib_data is not None and not Path(args.calib_data).exists():
        raise FatqError(f"calibration data {args.calib_data} does not exist.")
    if args.check_engine and not args.check:
        raise FatqError("--check-engine applies to --check; add --check.")
    if args.check_engine and args.check_engine not in FORMATS[args.format].engines:
        raise FatqError(f"--format {args.format} files do not run in {args.check_engine}.")
    if args.check_images is not None and args.check_images < 1:
        raise FatqError(f"--check-images must be at least 1, got {args.check_images}.")
    if args.check and args.data_dir is not None and not Path(args.data_dir).exists():
        raise FatqError(f"data directory {args.data_dir} does not exist.")
    checkpoint = Path(args.checkpoint)
    if checkpoint.is_dir():
        raise FatqError(f"{checkpoint} is a directory; give the checkpoint file (e.g. {checkpoint}/best.pt).")
    out = output_path(checkpoint, FORMATS[args.format], args.output)
    companions = [companion_path(out, suffix) for suffix in FORMATS[args.format].companions]
    check_output_file(out, "ONNX file (-o)")
    check_output_file(Path(args.json) if args.json else None, "JSON report (--json)")
    check_distinct_outputs({"-o": out, "--json": args.json}, [checkpoint] if checkpoint.is_file() else [])
    if args.json and Path(args.json).resolve() in {c.resolve() for c in companions}:
        raise FatqError(f"--json {args.json} would overwrite a file of the export; choose another file.")


def check_bounds(meta: dict, min_agreement: float | None, min_identical: float | None) -> tuple[float, float]:
    """The --check bounds: the given ones, else exact parity, or the float-branch bound for a
    TensorRT-placement model (its conv branches have no output quantizer: ONNX Runtime and OpenVINO
    run those convs in float with their own summation order, where TensorRT's int8 kernel sums exactly;
    a float result near a rounding boundary of the next quantizer can then round the other way)."""
    trt_placement = meta.get("spec", {}).get("target") == "trt"
    bounds = FLOAT_BRANCH_BOUNDS if trt_placement else EXACT_BOUNDS
    if trt_placement and (min_agreement is None or min_identical is None):
        print(
            f"placement trt: the CPU engines run the branch convs in float; check bounds {bounds[0]} % agreement, "
            f"{bounds[1]} % identical integers (exact parity holds only for TensorRT's arithmetic, not run here)"
        )
    return (
        bounds[0] if min_agreement is None else min_agreement,
        bounds[1] if min_identical is None else min_identical,
    )


def _print_check(r: dict) -> None:
    acc = r["accuracy"]

    def pct(value):
        return "n/a" if value is None else f"{value:.2f} %"

    print(f"check on {r['images']} images ({r['data']}); model: {r['compared_model']}")
    engine = r["engine"]
    print(f"  {'pair':<28} {'top-1 agree':>12} {'max |dlogit|':>13} {'mean |dlogit|':>14}")
    rows = (
        (f"{engine} vs checkpoint", r),
        ("reference vs checkpoint", r["reference_vs_checkpoint"]),
        (f"{engine} vs reference", r[f"{engine}_vs_reference"]),
    )
    for key, label in (("file_reference", "file's model"), ("as_trained", "as trained")):
        if f"{engine}_vs_{key}" in r:
            rows += ((f"{engine} vs {label}", r[f"{engine}_vs_{key}"]),)
    for label, row in rows:
        print(
            f"  {label:<28} {row['top1_agreement_pct']:>11.3f}% {row['max_abs_logit_diff']:>13.6f} "
            f"{row['mean_abs_logit_diff']:>14.6f}"
        )
    accuracies = ", ".join(f"{k} {pct(v)}" for k, v in acc.items())
    print(f"  accuracy: {accuracies}")
    if r["int8_tensors"]:
        worst = min(r["int8_identical_pct"], key=r["int8_identical_pct"].get)
        low = r["int8_identical_pct_min"]
        unobserved = f", {len(r['unobserved_int8_tensors'])} unobserved" if r["unobserved_int8_tensors"] else ""
        print(
            f"  int8 identical ({engine} vs reference): min {low:.4f} % over {r['int8_tensors']} tensors "
            f"(worst {worst}{unobserved})"
        )
        local = r["local_differences"]
        if local["values"]:
            print(
                f"  computed differently on equal inputs: {local['values']} values, {local['at_ties']} of them "
                f"rounding ties (within float error of k + 1/2; the largest distance "
                f"{local['max_tie_distance_levels']:.1e} levels); everything else that differs was computed from these"
            )
            for example in local["examples"]:
                if not example["tie"]:
                    print(
                        f"    not a tie: image {example['image']} {example['tensor']}{example['index']}: reference "
                        f"{example['reference']}, {engine} {example['engine']} (t = {example['t']:.6f} at "
                        f"{example['rounded_at']})"
                    )
    print(f"  {'PASSED' if r['passed'] else 'FAILED'} (min agreement {r['min_agreement']} %)")


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.lint:
        if args.checkpoint:
            raise FatqError("--lint takes only the ONNX file; drop the checkpoint argument.")
        return lint(args.lint, args.target, args.trt_version)
    if not args.checkpoint:
        raise FatqError("give a checkpoint to export (or --lint FILE).")
    return export(args, argv)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: exit 0 on success, 1 when a check fails, 2 on bad input."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
