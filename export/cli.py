"""``fatq-export``: a trained fatq checkpoint -> QDQ int8 ONNX (or float ONNX), checked and linted.

    fatq-export CKPT --format onnx [-o OUT] [--opset N] [--calib-data DIR] [--check ...]
    fatq-export CKPT --format onnx-ort ...       (same integers, for ONNX Runtime's CPU kernels)
    fatq-export CKPT --format onnx-openvino ...  (same integers, for OpenVINO's CPU plugin)
    fatq-export --lint model.onnx

Writes OUT (ONNX, with provenance in ``metadata_props``), OUT's ``.deploy.npz`` (the folded
deploy graph the file was written from, see :mod:`export.deploy_graph`) and, for int8 files, OUT's
``.reference.pt``: the checkpoint moved onto the engine's grid (:mod:`export.engine_exact`), i.e. the
PyTorch model the file computes, which ``--check`` and ``fatq-bench --reference`` compare against. Every file is checked
against DEPLOY.md's rules before it is written (:mod:`export.graph_check`); nothing is written
on an error. ``--check`` runs it in ONNX Runtime (OpenVINO for ``onnx-openvino`` files) against
the deploy reference and the PyTorch model (:mod:`export.parity`) and exits 1 below ``--min-agreement``.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import torch

from fatq.cli_common import run_cli, write_bytes_atomic, write_json_atomic
from fatq.errors import FatqError

FORMATS = ("onnx", "onnx-ort", "onnx-openvino", "onnx-fp32", "trt")
INT8_FORMATS = ("onnx", "onnx-ort", "onnx-openvino")
DEFAULT_SUFFIX = {"onnx": ".onnx", "onnx-ort": ".ort.onnx", "onnx-openvino": ".ov.onnx", "onnx-fp32": ".fp32.onnx"}
# formats for one engine's own ops -> what the lint note says they are for
ENGINE_SPECIFIC = {
    "onnx-ort": "ONNX Runtime's CPU kernels (uint8, zero points, com.microsoft ops)",
    "onnx-openvino": "OpenVINO (its FakeQuantize op)",
}
METADATA_FORMAT = {"onnx": "qdq-int8", "onnx-ort": "ort-uint8", "onnx-openvino": "openvino-fq", "onnx-fp32": "fp32"}
DEFAULT_CHECK_IMAGES = 2000
CALIB_BATCH_SIZE = 64


def build_parser() -> argparse.ArgumentParser:
    from export.qdq_writer import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

    parser = argparse.ArgumentParser(
        prog="fatq-export",
        description="Export a fatq checkpoint to QDQ int8 ONNX (or float ONNX) for integer inference engines.",
    )
    parser.add_argument("checkpoint", nargs="?", help="fatq checkpoint (.pt) to export")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="onnx",
        help="onnx: portable QDQ int8 for TensorRT, OpenVINO and ONNX Runtime (default); onnx-ort: the same "
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
        "calibration (for quantizers the model keeps float: edge_inputs/residual_inputs float)"
    )
    calib.add_argument(
        "--calib-data", help="dataset directory or .tar.gz; its train split calibrates disabled quantizers"
    )
    calib.add_argument(
        "--calib-batches", type=int, default=16, help=f"calibration batches of {CALIB_BATCH_SIZE} images (default 16)"
    )
    calib.add_argument("--calib-method", default="percentile", help="minmax, percentile (default), entropy or mse")
    check = parser.add_argument_group("check")
    check.add_argument(
        "--check",
        action="store_true",
        help="run the file in ONNX Runtime (OpenVINO for onnx-openvino) against the reference and the model",
    )
    check.add_argument(
        "--check-images",
        type=int,
        help=f"images to check (default {DEFAULT_CHECK_IMAGES} with --data-dir, else 256 random)",
    )
    check.add_argument("--data-dir", help="dataset for --check (its test split); random inputs without it")
    check.add_argument(
        "--min-agreement", type=float, default=99.9, help="min top-1 agreement %% engine vs model (default 99.9)"
    )
    check.add_argument(
        "--min-int8-identical",
        type=float,
        default=99.99,
        help="min %% of identical int8 values per tensor (default 99.99)",
    )
    parser.add_argument(
        "--as-trained",
        action="store_true",
        help="export the model exactly as trained: do not move its biases onto the engine's int32 grid "
        "nor its BN scales off rounding ties (export/engine_exact.py); no .reference.pt is written and "
        "--check compares with the model as trained",
    )
    parser.add_argument("--json", help="write the export (and check) report as JSON here")
    parser.add_argument(
        "--lint", metavar="FILE", help="only check FILE against the deployment rules (exit 1 on findings)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


# --- lint -----------------------------------------------------------------------------------


def lint(path: str) -> int:
    import onnx

    from export.graph_check import check_model
    from export.openvino_writer import is_openvino_model
    from export.ort_writer import uint8_tensors

    try:
        model = onnx.load(path)
    except (OSError, ValueError) as exc:
        raise FatqError(f"cannot read {path} as ONNX ({type(exc).__name__}).") from None
    except Exception as exc:  # protobuf's DecodeError has no stable import path
        raise FatqError(f"{path} is not an ONNX model ({type(exc).__name__}).") from None
    if not model.graph.node:
        raise FatqError(f"{path} is not an ONNX model (no graph).")
    findings = check_model(model)
    for finding in findings:
        print(finding)
    own = "onnx-ort" if uint8_tensors(model) is not None else "onnx-openvino" if is_openvino_model(model) else None
    if findings and own:
        print(
            f"{path}: written by fatq-export --format {own} for {ENGINE_SPECIFIC[own]} by design; export --format "
            "onnx for the other engines.",
            file=sys.stderr,
        )
    print(f"{path}: {len(findings)} finding(s)" if findings else f"{path}: clean", file=sys.stderr)
    return 1 if findings else 0


# --- export ---------------------------------------------------------------------------------


def _output_path(args) -> Path:
    checkpoint = Path(args.checkpoint)
    out = Path(args.output) if args.output else checkpoint.with_name(checkpoint.stem + DEFAULT_SUFFIX[args.format])
    if not out.parent.is_dir():
        raise FatqError(f"output directory {out.parent} does not exist.")
    if out.suffix != ".onnx":
        raise FatqError(f"output {out} must end in .onnx.")
    return out


def deploy_graph_path(onnx_path: str | Path) -> Path:
    """Where the deploy graph of an exported file lives: model.onnx -> model.deploy.npz."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.stem + ".deploy.npz")


def reference_checkpoint_path(onnx_path: str | Path) -> Path:
    """Where the PyTorch model an int8 file computes is saved: model.onnx -> model.reference.pt."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.stem + ".reference.pt")


def _check_finite(model: torch.nn.Module) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FatqError(f"checkpoint tensor {name} holds NaN or Inf values.")


def _image_size(data: dict) -> int | None:
    size = data.get("input_size") or [3, 32, 32]
    return None if size[-1] == 32 else int(size[-1])


def _normalized(images: torch.Tensor, data: dict) -> torch.Tensor:
    from fatq.data import normalize

    norm = data["normalization"]
    return normalize(images, norm["mean"], norm["std"])


def _calibrate(model, data: dict, args) -> dict | None:
    """Give disabled quantizers 8-bit ranges from real data; returns what was done (or None)."""
    from calibration.passes import activation_quantizers

    disabled = [name for name, q in activation_quantizers(model).items() if not q.enabled]
    if not disabled:
        return None
    if not args.calib_data:
        raise FatqError(
            f"activation quantizer {disabled[0]!r} is disabled (the model keeps that input float; "
            f"{len(disabled)} in all); pass --calib-data DIR to calibrate it."
        )
    if args.calib_batches < 1:
        raise FatqError("--calib-batches must be at least 1.")
    from calibration.passes import calibrate
    from fatq.data import load_split

    split = load_split(args.calib_data, "train", image_size=_image_size(data))
    generator = torch.Generator().manual_seed(0)
    count = min(len(split), args.calib_batches * CALIB_BATCH_SIZE)
    chosen = torch.randperm(len(split), generator=generator)[:count]
    images = _normalized(split.images[chosen], data)
    batches = list(images.split(CALIB_BATCH_SIZE))
    alphas = calibrate(model, batches, method=args.calib_method, quiet=args.quiet)
    return {"method": args.calib_method, "images": count, "split": "train", "quantizers": alphas}


def _metadata(data: dict, checkpoint: Path, graph, args, calibration: dict | None, argv: list[str]) -> dict:
    from fatq.provenance import __version__, git_commit, sha256_file

    spec = data["spec"]
    return {
        "producer": "fatq-export",
        "format": METADATA_FORMAT[args.format],
        "arch": data["arch"],
        "arch_options": data.get("arch_options", {}),
        "bits": f"w{spec['weight_bits']}a{spec['act_bits']}",
        "spec": spec,
        "num_classes": data["num_classes"],
        "normalization": data["normalization"],
        "input_shape": ["batch", *graph.input_shape],
        "class_names": data.get("class_names"),
        "source_checkpoint": checkpoint.name,
        "source_checkpoint_sha256": sha256_file(checkpoint),
        "fatq_version": __version__,
        "git_commit": git_commit(),
        "calibration": calibration if calibration else "none",
        "opset": args.opset,
        "export_command": " ".join(shlex.quote(a) for a in ["fatq-export", *argv]),
    }


def _check_images(data: dict, args, shape: list[int]) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    if args.data_dir:
        from fatq.data import load_split

        split = load_split(args.data_dir, "test", image_size=_image_size(data))
        count = min(len(split), args.check_images or DEFAULT_CHECK_IMAGES)
        if count < 1:
            raise FatqError("--check-images must be at least 1.")
        chosen = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:count]
        return _normalized(split.images[chosen], data), split.labels[chosen], f"test split of {args.data_dir}"
    count = args.check_images or 256
    if count < 1:
        raise FatqError("--check-images must be at least 1.")
    images = torch.randn(count, *shape, generator=torch.Generator().manual_seed(0))
    return images, None, "random normal inputs (no --data-dir)"


def export(args, argv: list[str]) -> int:
    from export.fold import dequantized, fold
    from export.graph_check import assert_deployable
    from export.lower import lower
    from export.openvino_writer import write_openvino
    from export.ort_writer import write_ort
    from export.qdq_writer import write_float, write_qdq
    from fatq.checkpoint import load_fatq_checkpoint, model_from_checkpoint

    if args.format == "trt":
        raise FatqError(
            "--format trt is not available in fatq-export: export --format onnx, then build the engine with "
            "fatq-bench (engines/trt_builder.py) on a machine with TensorRT and a GPU."
        )
    started = time.perf_counter()
    checkpoint = Path(args.checkpoint)
    out = _output_path(args)
    data = load_fatq_checkpoint(checkpoint)
    model = model_from_checkpoint(data).eval()
    _check_finite(model)
    uncalibrated, calibration = None, None
    int8 = args.format in INT8_FORMATS
    if int8 and not model.spec.is_float:
        uncalibrated = copy.deepcopy(model)
        calibration = _calibrate(model, data, args)
        uncalibrated = uncalibrated if calibration else None
    from export.edge_weights import describe, fit_edge_weights_to_int8, refuse_wide_activations  # imported models

    if int8:
        refuse_wide_activations(model)
    edge_requantized = fit_edge_weights_to_int8(model) if int8 else []
    if edge_requantized:
        print(describe(edge_requantized))
    # the float file drops activation quantization anyway: quantizers the model keeps float are fine
    folded = fold(model, list(data["input_size"]), disabled_quantizers="error" if int8 else "skip")
    as_trained, projection = None, None
    if int8:
        if not folded.quantized:
            raise FatqError(f"{checkpoint} holds an FP32 model; export it with --format onnx-fp32.")
        graph = lower(folded)
        if not args.as_trained:
            from export.engine_exact import make_engine_exact

            as_trained = copy.deepcopy(model) if args.check else None  # --check compares with it
            input_size = list(data["input_size"])
            graph, projection = make_engine_exact(model, lambda m: lower(fold(m, input_size)))
    else:
        graph = dequantized(folded)
    graph.meta.update(_metadata(data, checkpoint, graph, args, calibration, argv))
    graph.meta["edge_weight_requantization"] = edge_requantized or "none"
    if projection is not None:
        graph.meta["bias_projection"] = {"reference_checkpoint": reference_checkpoint_path(out).name, **projection}
    writers = {"onnx": write_qdq, "onnx-ort": write_ort, "onnx-openvino": write_openvino, "onnx-fp32": write_float}
    onnx_model = writers[args.format](graph, opset=args.opset, metadata=graph.meta)
    if args.format not in ENGINE_SPECIFIC:  # those use one engine's own ops by design: TensorRT's rules do not apply
        assert_deployable(onnx_model)
    companions = [deploy_graph_path(out)] + ([reference_checkpoint_path(out)] if projection else [])
    try:
        graph.save(deploy_graph_path(out))
        if projection is not None:
            _save_reference(model, data, reference_checkpoint_path(out), graph.meta)
        write_bytes_atomic(out, onnx_model.SerializeToString())
    except BaseException:
        for path in companions:  # no half export: all files or none
            path.unlink(missing_ok=True)
        raise
    elapsed = time.perf_counter() - started
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB, {len(onnx_model.graph.node)} nodes) in {elapsed:.2f} s")
    report = {"output": str(out), "deploy_graph": str(deploy_graph_path(out)), "export_seconds": elapsed, **graph.meta}
    status = 0
    if args.check:
        report["check"], status = _run_check(out, graph, model, data, args, uncalibrated, as_trained)
    if args.json:
        write_json_atomic(args.json, report)
    return status


def _save_reference(model, data: dict, path: Path, meta: dict) -> None:
    """The checkpoint of the PyTorch model the int8 file computes (calibrated, on the engine grid)."""
    from fatq.checkpoint import save_checkpoint

    provenance = {k: meta[k] for k in ("source_checkpoint", "source_checkpoint_sha256", "export_command")}
    save_checkpoint(
        path,
        model,
        data["normalization"],
        data.get("class_names"),
        derived_from=provenance,
        calibration=meta["calibration"],
        bias_projection=meta["bias_projection"],
    )


def _run_check(out: Path, graph, model, data: dict, args, uncalibrated, as_trained) -> tuple[dict, int]:
    from export.parity import compare, float_baseline

    images, labels, source = _check_images(data, args, graph.input_shape)
    if graph.quantized:
        label = "checkpoint, eval mode" + (" (calibrated)" if uncalibrated is not None else "")
        if "bias_projection" in graph.meta:
            label += f", on the engine grid ({reference_checkpoint_path(out).name})"
        compared = model
    elif graph.meta.get("dequantized_from_quantized_model"):
        compared = float_baseline(model)
        label = "checkpoint, eval mode, activation quantizers disabled (the float baseline this file is)"
    else:
        compared, label = model, "checkpoint, eval mode"
    result = compare(out, graph, compared, images, labels, quiet=args.quiet, as_trained=as_trained)
    result.update(data=source, compared_model=label)
    if uncalibrated is not None and labels is not None:
        # the accuracy effect of calibrating the quantizers the model kept float
        result["accuracy"]["checkpoint_uncalibrated"] = _accuracy(uncalibrated, images, labels)
    minimum = result["int8_identical_pct_min"]
    passed = result["top1_agreement_pct"] >= args.min_agreement and (
        minimum is None or minimum >= args.min_int8_identical
    )
    result.update(min_agreement=args.min_agreement, min_int8_identical=args.min_int8_identical, passed=passed)
    _print_check(result)
    return result, 0 if passed else 1


def _accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
            correct += int((model(x).argmax(1) == y).sum())
    return 100.0 * correct / len(labels)


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
    if f"{engine}_vs_as_trained" in r:
        rows += ((f"{engine} vs as trained", r[f"{engine}_vs_as_trained"]),)
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
    print(f"  {'PASSED' if r['passed'] else 'FAILED'} (min agreement {r['min_agreement']} %)")


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.lint:
        if args.checkpoint:
            raise FatqError("--lint takes only the ONNX file; drop the checkpoint argument.")
        return lint(args.lint)
    if not args.checkpoint:
        raise FatqError("give a checkpoint to export (or --lint FILE).")
    return export(args, argv)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: exit 0 on success, 1 when a check fails, 2 on bad input."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
