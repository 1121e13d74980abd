"""fatq's PTQ next to ONNX Runtime's ``quantize_static`` on the same FP32 model and images.

Accuracy only (no timing): the public FP32 ResNet-20 on the JPEG CIFAR-10 test split,

* FP32, exported to ONNX (``torch.onnx.export(..., dynamo=False)``) and run in ONNX Runtime;
* fatq PTQ (``calibration.ptq``) at each ``--bits`` with each calibration method, without and
  with bias correction (``calibration.bias_correction``, ``--bias-correction``), exported
  with ``fatq-export --format onnx`` and run in ONNX Runtime; while the export stage's QDQ
  writer is missing (or fails) the model is evaluated in PyTorch instead, and the table says so
  in its "measured in" column;
* ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel, symmetric int8 activations
  and weights) with MinMax, Entropy and Percentile calibration on the same calibration images,
  run in ONNX Runtime (int8 only: ORT has no 4-bit activation path to compare with).

With ``--fat-checkpoint`` it instead reports a trained W4A4 FAT checkpoint with its first- and
last-layer inputs (i) as trained, (ii) left float (the paper's setting), (iii) recalibrated to
8 bits by each method.

Examples::

    python benchmarks/ptq_vs_ort.py --data-dir DATA --checkpoint PRETRAINED/resnet20-cifar10-fp32.th
    python benchmarks/ptq_vs_ort.py --data-dir DATA --checkpoint ... --limit 500 --calib-batches 2  # smoke
    python benchmarks/ptq_vs_ort.py --data-dir DATA --fat-checkpoint runs/resnet20-w4a4.pt
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from calibration.ptq import NormalizedBatches, evaluate_top1, fp32_twin, load_fp32_model, quantize_post_training
from fatq.calibration_pass import calibrate
from fatq.calibrators import CALIBRATORS
from fatq.checkpoint import init_from_pretrained, load_fatq_checkpoint, model_from_checkpoint, save_checkpoint
from fatq.data import ImageSplit, load_split, normalize
from fatq.layers import QUANTIZED_LAYERS
from fatq.models import create_model
from fatq.provenance import __version__, git_commit
from fatq.quantizers import MaxAbsWeightQuantizer

ORT_METHODS = ("MinMax", "Entropy", "Percentile")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True, help="CIFAR-10 directory (train calibrates, test evaluates)")
    p.add_argument("--checkpoint", type=Path, help="FP32 checkpoint (fatq or public format)")
    p.add_argument("--arch", default="resnet20", help="architecture of a public checkpoint")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4], help="fatq PTQ bit-widths")
    p.add_argument("--methods", nargs="+", default=list(CALIBRATORS), choices=list(CALIBRATORS))
    p.add_argument("--ort-methods", nargs="*", default=list(ORT_METHODS), choices=ORT_METHODS)
    p.add_argument("--weight-method", choices=("max", "mse"), default="max", help="fatq per-channel weight ranges")
    p.add_argument(
        "--bias-correction", choices=("on", "off", "both"), default="both", help="fatq PTQ rows with/without it"
    )
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="picks the calibration images")
    p.add_argument("--limit", type=int, help="evaluate on the first N test images only (smoke runs)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime and torch threads")
    p.add_argument("--fat-checkpoint", type=Path, help="report a W4A4 FAT checkpoint's edge-input calibration instead")
    p.add_argument("--work-dir", type=Path, help="keep checkpoints and ONNX files here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    return p.parse_args(argv)


# --- ONNX Runtime ------------------------------------------------------------------------------


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_top1(path: Path, split: ImageSplit, normalization: dict, threads: int, batch: int = 250) -> float:
    """Top-1 (%) of an ONNX classifier run in ONNX Runtime (single input [N, 3, H, W])."""
    session = ort_session(path, threads)
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    batch = fixed if isinstance(fixed, int) else batch
    correct = 0
    for start in range(0, len(split), batch):
        images = normalize(split.images[start : start + batch], normalization["mean"], normalization["std"]).numpy()
        logits = session.run(None, {name: images})[0]
        correct += int((logits.argmax(axis=1) == split.labels[start : start + batch].numpy()).sum())
    return 100.0 * correct / len(split)


def export_fp32_onnx(model: torch.nn.Module, path: Path, input_size) -> None:
    model.eval()
    torch.onnx.export(
        model,
        torch.zeros(1, *input_size),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


class _Reader:
    """ORT CalibrationDataReader over the same calibration batches fatq uses."""

    def __init__(self, batches: NormalizedBatches, name: str):
        self._iter = (b.numpy() for b in batches)
        self.name = name

    def get_next(self):
        batch = next(self._iter, None)
        return None if batch is None else {self.name: batch}


def ort_quantize(fp32_onnx: Path, out: Path, batches: NormalizedBatches, method: str) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_onnx), str(prepared))
    quantize_static(
        str(prepared),
        str(out),
        _Reader(batches, "input"),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )


# --- fatq models -------------------------------------------------------------------------------


def export_ours(checkpoint: Path, onnx_path: Path) -> str | None:
    """Run fatq-export; returns None on success, else the reason ours falls back to PyTorch."""
    from export.pipeline import export_checkpoint
    from fatq.errors import FatqError

    try:
        export_checkpoint(checkpoint, "onnx", output=onnx_path, quiet=True)
    except FatqError as exc:
        return f"fatq-export failed: {str(exc)[:200]}"
    return None


def evaluate_ours(model, checkpoint: Path, normalization, test, threads, notes: list, work: Path) -> tuple[float, str]:
    """Accuracy of a fatq checkpoint in ORT (via fatq-export), else in PyTorch (noted)."""
    onnx_path = work / f"{checkpoint.stem}.onnx"
    reason = export_ours(checkpoint, onnx_path)
    if reason is None:
        return ort_top1(onnx_path, test, normalization, threads), "onnxruntime"
    if reason not in notes:
        notes.append(reason)
    return evaluate_top1(model, test, normalization, quiet=True), "pytorch*"


def edge_input_quantizers(model) -> list[str]:
    """Paths of the input quantizers of the first/last layers (those with 8-bit max|W| weights)."""
    return [
        f"{name}.input_quantizer"
        for name, layer in model.named_modules()
        if isinstance(layer, QUANTIZED_LAYERS) and isinstance(layer.weight_quantizer, MaxAbsWeightQuantizer)
    ]


# --- modes -------------------------------------------------------------------------------------


def run_ptq_comparison(args, test, train, work: Path, notes: list) -> list[dict]:
    rows = []
    fp32 = create_model(args.arch, bits=32, num_classes=len(test.class_names))
    meta = init_from_pretrained(fp32, args.checkpoint)
    normalization = meta["normalization"]
    fp32_onnx = work / "fp32.onnx"
    export_fp32_onnx(fp32, fp32_onnx, tuple(test.images.shape[1:]))
    fp32_acc = ort_top1(fp32_onnx, test, normalization, args.threads)
    rows.append({"model": "FP32", "bits": 32, "method": "-", "top1": fp32_acc, "measured_in": "onnxruntime"})
    print(f"FP32: {fp32_acc:.2f}", file=sys.stderr)

    def batches():
        return NormalizedBatches(train.images, normalization, args.calib_batches, args.batch_size, args.seed)

    corrections = {"on": [True], "off": [False], "both": [False, True]}[args.bias_correction]
    for bits, corrected, method in itertools.product(args.bits, corrections, args.methods):
        started = time.monotonic()
        model, _ = load_fp32_model(args.checkpoint, bits, args.arch, num_classes=len(test.class_names))
        reference = fp32_twin(model, args.checkpoint) if corrected else None
        quantize_post_training(model, batches(), method, args.weight_method, quiet=True, reference=reference)
        name = "fatq PTQ + bias correction" if corrected else "fatq PTQ"
        ckpt = work / f"ours-w{bits}-{method}{'-bc' if corrected else ''}.pt"
        save_checkpoint(ckpt, model, normalization, test.class_names, ptq={"calib_method": method})
        acc, where = evaluate_ours(model, ckpt, normalization, test, args.threads, notes, work)
        rows.append({"model": name, "bits": bits, "method": method, "top1": acc, "measured_in": where})
        print(f"{name} W{bits}A{bits} {method}: {acc:.2f} ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    for method in args.ort_methods:
        started = time.monotonic()
        out = work / f"ort-int8-{method}.onnx"
        ort_quantize(fp32_onnx, out, batches(), method)
        acc = ort_top1(out, test, normalization, args.threads)
        rows.append(
            {"model": "ORT quantize_static", "bits": 8, "method": method, "top1": acc, "measured_in": "onnxruntime"}
        )
        print(f"ORT int8 {method}: {acc:.2f} ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    return rows


def run_fat_edges(args, test, train, work: Path, notes: list) -> list[dict]:
    data = load_fatq_checkpoint(args.fat_checkpoint)
    normalization = data["normalization"]
    model = model_from_checkpoint(data)
    edges = edge_input_quantizers(model)
    if not edges:
        raise SystemExit(f"{args.fat_checkpoint} has no 8-bit first/last layers to calibrate.")
    label = f"FAT W{model.spec.weight_bits}A{model.spec.act_bits}"
    modules = dict(model.named_modules())
    trained_enabled = {p: modules[p].enabled for p in edges}
    rows = []
    as_trained = "edge inputs as trained (" + ("int8" if all(trained_enabled.values()) else "float") + ")"
    acc, where = evaluate_ours(model, args.fat_checkpoint, normalization, test, args.threads, notes, work)
    rows.append({"model": label, "bits": model.spec.act_bits, "method": as_trained, "top1": acc, "measured_in": where})
    for p in edges:
        modules[p].enabled = False
    acc = evaluate_top1(model, test, normalization, quiet=True)
    rows.append(
        {
            "model": label,
            "bits": model.spec.act_bits,
            "method": "edge inputs float",
            "top1": acc,
            "measured_in": "pytorch",
        }
    )
    for method in args.methods:
        # calibrate() disables the targets while collecting, so each method starts from the same state
        batches = NormalizedBatches(train.images, normalization, args.calib_batches, args.batch_size, args.seed)
        calibrate(model, batches, method, quantizers=edges, quiet=True)
        ckpt = work / f"fat-edges-{method}.pt"
        save_checkpoint(ckpt, model, normalization, test.class_names, edge_calibration={"calib_method": method})
        acc, where = evaluate_ours(model, ckpt, normalization, test, args.threads, notes, work)
        rows.append(
            {
                "model": label,
                "bits": model.spec.act_bits,
                "method": f"edge inputs int8, {method}",
                "top1": acc,
                "measured_in": where,
            }
        )
        print(f"{label} edges {method}: {acc:.2f}", file=sys.stderr)
    return rows


def environment() -> dict:
    import onnx
    import onnxruntime

    return {
        "fatq": __version__,
        "git_commit": git_commit(),
        "torch": str(torch.__version__),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if (args.checkpoint is None) == (args.fat_checkpoint is None):
        raise SystemExit("pass exactly one of --checkpoint (PTQ comparison) or --fat-checkpoint (edge inputs).")
    torch.set_num_threads(args.threads)
    test = load_split(args.data_dir, "test")
    if args.limit:
        test = ImageSplit(test.images[: args.limit], test.labels[: args.limit], test.class_names)
    train = load_split(args.data_dir, "train")
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        run = run_fat_edges if args.fat_checkpoint else run_ptq_comparison
        rows = run(args, test, train, work, notes)
    env = environment()
    calib_images = min(args.calib_batches * args.batch_size, len(train))
    setup = f"{len(test)} test images, {calib_images} calibration images (train split, seed {args.seed})"
    if args.fat_checkpoint:
        setup += f"; checkpoint {args.fat_checkpoint.name}, first/last-layer inputs recalibrated"
    else:
        setup += f"; fatq weights: per-channel {args.weight_method}; ORT: QDQ, per-channel, symmetric int8"
    print(f"\n{setup}\n")
    print("| model | W/A bits | calibration | top-1 (%) | measured in |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['bits']} | {r['method']} | {r['top1']:.2f} | {r['measured_in']} |")
    for note in notes:
        print(f"\n\\* evaluated in PyTorch because {note}.")
    print("\n" + ", ".join(f"{k} {v}" for k, v in env.items()))
    if args.json:
        command = shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
        args.json.write_text(
            json.dumps({"rows": rows, "notes": notes, "environment": env, "command": command}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
