"""ResNet-20 W4A4 on ONNX Runtime and OpenVINO: int8 against fp32 (and OpenVINO bf16), side by side.

Exports a trained W4A4 checkpoint four times — ``fatq-export --format onnx`` (the portable QDQ
file), ``--format onnx-ort`` (the same integers as uint8 QOperator ops, for ONNX Runtime only),
``--format onnx-openvino`` (the same integers with the 4-bit quantizers as OpenVINO FakeQuantize
ops, for OpenVINO only) and ``--format onnx-fp32`` — runs ``fatq-bench`` on the four files in one
process (interleaved timing, same threads; each engine runs the portable file, its own file and
the fp32 file) and prints the README table: latency and throughput per file, engine and precision,
each int8 run's speed-up over the same engine's fp32 run, top-1 on the test split and top-1
agreement of each int8 run with the PyTorch model its engine computes on its file (the
``.reference.pt`` fatq-export writes beside it; for ONNX Runtime on the portable file, whose float
biases it rounds to int32, that checkpoint's deploy form), from one short extra call per run.

OpenVINO's fp32 run is forced to f32 (``INFERENCE_PRECISION_HINT=f32``); its bf16 mode is a
separate, labelled row (on CPUs without native BF16 the table says so).

Targets (2 threads): OpenVINO int8 >= 1.5x its fp32 throughput at batch 64, ONNX Runtime int8
>= 1.0x its fp32, both >= 99.9 % top-1 agreement. They are printed as met/missed, not asserted:
this is a measurement, and numbers from a shared, busy machine are not the project's figures.

Usage::

    python benchmarks/engines_resnet20.py --checkpoint runs/resnet20-w4a4/best.pt \\
        --data-dir ../shared/datasets --threads 2 --work-dir bench-out
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module below
from fatq_tools import engine_agreement, run_tool, tool  # noqa: E402

TARGETS = {"openvino": 1.5, "ort": 1.0}  # int8 / fp32 throughput at the largest batch
MIN_AGREEMENT = 99.9
# fatq-export format -> file name suffix (fatq-bench labels runs by the name before the first dot)
GATE_OK = (0, 1)  # 1 = fatq-bench's gate; the table still shows why
EXPORTS = {"onnx": "", "onnx-ort": "-ort", "onnx-openvino": "-ov", "onnx-fp32": "-fp32"}


def _run(report: dict, label: str, batch: int) -> dict | None:
    return next((r for r in report["runs"] if r["label"] == label and r["batch_size"] == batch), None)


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _file_kind(config: dict) -> str:
    if config["precision"] != "int8":
        return "folded float twin"
    if config["model"].endswith("-ort.onnx"):
        return "onnx-ort file (uint8 QOperator)"
    if config["model"].endswith("-ov.onnx"):
        return "onnx-openvino file (FakeQuantize)"
    return "portable QDQ file"


def _speedups(report: dict, batch: int) -> dict[str, float]:
    """{int8 run label: its throughput over the same engine's fp32 run} at ``batch``."""
    return {
        r["numerator"]: r["throughput_ratio"]
        for r in report["ratios"]
        if r["kind"] == "int8/fp32" and r["batch_size"] == batch
    }


def readme_table(report: dict) -> str:
    """The markdown table for the README: one row per file, engine and precision."""
    batches = report["settings"]["batch_sizes"]
    small, large = min(batches), max(batches)
    speedups = _speedups(report, large)
    lines = [
        f"| engine | file, precision | median ms (batch {small}) | images/s (batch {large}) | int8 / fp32 "
        f"(batch {large}) | top-1 % | agreement % |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for config in report["configs"]:
        label, engine, precision = config["label"], config["engine"], config["precision"]
        name = f"{_file_kind(config)}, {precision}"
        if engine == "openvino" and precision == "fp32":
            name += " (forced f32)"
        elif engine == "openvino" and precision == "bf16":
            native = config["options"].get("cpu_native_bf16")
            name += " mode" + ("" if native else " (no native BF16 on this CPU)")
        small_run, large_run = _run(report, label, small), _run(report, label, large)
        speedup = speedups.get(label)
        accuracy = report["accuracy"].get(label, {}).get("top1")
        agreement = report["agreement"].get(label, {}).get("top1_agreement_pct")
        version = config["engine_version"].split("-")[0]
        lines.append(
            f"| {engine} {version} | {name} | {_fmt(small_run and small_run['latency_ms']['median'], '.3f')} "
            f"| {_fmt(large_run and large_run['throughput_ips'], ',.0f')} | "
            f"{'**' + _fmt(speedup, '.2f') + '×**' if speedup else '–'} | {_fmt(accuracy, '.2f')} | "
            f"{_fmt(agreement, '.2f')} |"
        )
    reference = report.get("reference") or {}
    if "top1" in reference:
        spec = reference["spec"]
        bits = f"W{spec['weight_bits']}A{spec['act_bits']}"
        lines.append(
            f"| PyTorch {reference['arch']} (eval, fake-quant) | {bits} | – | – | – | {reference['top1']:.2f} | 100 |"
        )
    return "\n".join(lines)


def targets(report: dict) -> list[str]:
    """One line per int8 run with a target: measured value and met/missed."""
    large = max(report["settings"]["batch_sizes"])
    configs = {c["label"]: c for c in report["configs"]}
    out = []
    for label, ratio in _speedups(report, large).items():
        config = configs[label]
        bound = TARGETS.get(config["engine"])
        if bound is not None:
            verdict = "met" if ratio >= bound else "MISSED"
            out.append(
                f"{config['engine']} int8/fp32 at batch {large}, {_file_kind(config)}: {ratio:.2f}× "
                f"(target >= {bound}×) {verdict}"
            )
    for label, values in report["agreement"].items():
        if configs.get(label, {}).get("precision") == "int8":
            pct = values["top1_agreement_pct"]
            verdict = "met" if pct >= MIN_AGREEMENT else "MISSED"
            out.append(f"{label} top-1 agreement: {pct:.2f} % (target >= {MIN_AGREEMENT} %) {verdict}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="trained ResNet-20 W4A4 fatq checkpoint")
    parser.add_argument("--data-dir", type=Path, required=True, help="CIFAR-10 directory (test split)")
    parser.add_argument("--work-dir", type=Path, help="where the ONNX files and reports go (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per engine (default 2)")
    parser.add_argument("--batch-sizes", default="1,64", help="comma-separated (default 1,64)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up calls per run and batch size (default 20)")
    parser.add_argument("--iterations", type=int, default=200, help="timed calls per run and batch (default 200)")
    parser.add_argument("--limit", type=int, help="evaluate on this many test images (default all)")
    args = parser.parse_args(argv)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fatq-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    files = {fmt: work / f"resnet20-w4a4{suffix}.onnx" for fmt, suffix in EXPORTS.items()}
    export = tool("fatq-export")
    for fmt, path in files.items():
        run_tool([export, str(args.checkpoint), "--format", fmt, "-o", str(path)], ok=GATE_OK)
    # the PyTorch model the int8 file computes (fatq-export writes it beside the file; README, Export)
    reference = work / "resnet20-w4a4.reference.pt"
    report_path = work / "bench.json"
    bench = [tool("fatq-bench"), *map(str, files.values()), "--engine", "ort", "--engine", "openvino",
             "--precision", "int8", "--precision", "fp32", "--precision", "bf16",
             "--batch-sizes", args.batch_sizes, "--warmup", str(args.warmup), "--iterations", str(args.iterations),
             "--threads", str(args.threads), "--data-dir", str(args.data_dir), "--reference", str(reference),
             "--json", str(report_path), "--markdown", str(work / "bench.md"), "--plot", str(work / "bench.png"),
             "--quiet"]  # fmt: skip
    if args.limit:
        bench += ["--limit", str(args.limit)]
    run_tool(bench, ok=GATE_OK)
    report = json.loads(report_path.read_text())
    # agreement of each int8 run with the model its engine computes on its file (ONNX Runtime rounds the
    # portable file's float biases to int32: fatq-bench's deploy mode), not with the one --reference above
    for config in report["configs"]:
        if config["precision"] == "int8":
            extra = ["--limit", str(args.limit)] if args.limit else []
            found = engine_agreement(Path(config["model"]), config["engine"], args.data_dir, args.threads, extra)
            report["agreement"][config["label"]] = found
    host, settings, spec = report["host"], report["settings"], report["reference"]["spec"]
    print()
    print(
        f"{report['reference']['arch']} W{spec['weight_bits']}A{spec['act_bits']}, {settings['eval_inputs']}, "
        f"{args.threads} threads, {host['cpu']}, fatq {report['fatq_version']} ({report['git_commit'][:12]}); "
        f"interleaved timing, {settings['iterations']} iterations after {settings['warmup']} warm-up."
    )
    print()
    print(readme_table(report))
    print()
    for line in targets(report):
        print(line)
    print(f"\nreports: {report_path}, {work / 'bench.md'}, {work / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
