"""Parity sweep: every int8 format of every given checkpoint, in every engine that reads it, on the test split.

For each checkpoint and each (int8 format, engine) pair of :data:`CHECKS` this runs ``fatq-export CKPT
--format F --check --check-engine E --check-images N --json`` and tabulates what the check measured against the
model that engine computes on that file (the file's ``.reference.pt``, or for ONNX Runtime on the float-bias
TensorRT file the deploy graph with int32 biases): top-1 agreement, the lowest share of identical integers
over the observed tensors, the first tensor (in graph order) where engine and reference part, how many values
the engine computes differently on equal inputs and how many of those are rounding ties
(:mod:`engines.local_differences`), and the agreement with the model as trained.

Usage::

    python benchmarks/parity_sweep.py A/last.pt B/last.pt --data-dir ../shared/datasets --work-dir sweep-out \
        [--calib-data ../shared/datasets]   # for models that keep edge inputs float
        [--formats onnx,onnx-openvino]      # a subset of the int8 formats

A check that fails its thresholds is a row of the table, not an error of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module below
from fatq_tools import run_tool, tool  # noqa: E402

from engines.host import cpu_name, int8_flags_summary  # noqa: E402

# (format, output suffix, engine): every int8 file in every CPU engine that reads it
CHECKS = (
    ("onnx", "", "ort"),
    ("onnx", "", "openvino"),
    ("onnx-ort", "-ort", "ort"),
    ("onnx-openvino", "-ov", "openvino"),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", type=Path, help="fatq checkpoints (W/A-quantized)")
    p.add_argument("--data-dir", type=Path, default=os.environ.get("FATQ_DATA_DIR"))
    p.add_argument("--check-images", type=int, default=10000)
    p.add_argument("--work-dir", type=Path, default=Path("sweep-out"))
    p.add_argument("--calib-data", type=Path, help="calibration data for models that keep edge inputs float")
    p.add_argument(
        "--formats",
        default=",".join(dict.fromkeys(fmt for fmt, _, _ in CHECKS)),
        help="comma-separated int8 formats to check (default: all)",
    )
    args = p.parse_args(argv)
    unknown = set(args.formats.split(",")) - {fmt for fmt, _, _ in CHECKS}
    if unknown:
        p.error(f"--formats: no int8 format {', '.join(sorted(unknown))}")
    if args.data_dir is None or not Path(args.data_dir).exists():
        sys.exit("parity_sweep.py: --data-dir (or FATQ_DATA_DIR) must name the test data.")
    missing = [str(c) for c in args.checkpoints if not c.is_file()]
    if missing:
        sys.exit(f"parity_sweep.py: no checkpoint at {', '.join(missing)}.")
    return args


def check(checkpoint: Path, fmt: str, engine: str, out: Path, args) -> dict:
    """fatq-export --check of one format in one engine; returns the check part of its JSON report."""
    report = out.with_name(f"{out.stem}-{engine}.json")
    if report.is_file() and out.is_file():  # measured by an earlier run of this sweep into the same --work-dir
        return json.loads(report.read_text())["check"]
    command = [tool("fatq-export"), str(checkpoint), "--format", fmt, "-o", str(out), "--check", "--quiet"]
    command += ["--check-engine", engine, "--check-images", str(args.check_images), "--data-dir", str(args.data_dir)]
    command += ["--json", str(report)] + (["--calib-data", str(args.calib_data)] if args.calib_data else [])
    run_tool(command, ok=(0, 1))  # 1 = a failed check: still a row
    return json.loads(report.read_text())["check"]


def row(name: str, fmt: str, result: dict) -> dict:
    identical = result["int8_identical_pct"]
    first = next((tensor for tensor, pct in identical.items() if pct < 100.0), None)
    engine = result["engine"]
    as_trained = result.get(f"{engine}_vs_as_trained")
    return {
        "model": name,
        "file": fmt,
        "engine": engine,
        "compared": "deploy graph, int32 biases" if "file_reference" in result["accuracy"] else ".reference.pt",
        "images": result["images"],
        "agreement": result["top1_agreement_pct"],
        "min_identical": result["int8_identical_pct_min"],
        "first_differing": first,
        "unobserved": len(result.get("unobserved_int8_tensors", [])),
        "local": result.get("local_differences"),
        "as_trained": as_trained["top1_agreement_pct"] if as_trained else None,
        "accuracy": result["accuracy"].get(engine),
        "passed": result["passed"],
    }


def _local(r: dict) -> str:
    """ "values (of them ties)" the engine computed differently on equal inputs; "–" where none differ."""
    local = r.get("local")
    if local is None:  # a report written before the check counted them
        return "–" if r["min_identical"] in (None, 100.0) else "n/a"
    return "–" if local["values"] == 0 else f"{local['values']} ({local['at_ties']})"


def table(rows: list[dict]) -> str:
    lines = [
        "| model | file | engine | compared with | agreement % | min identical % | first differing tensor "
        "| computed differently (ties) | vs as trained % | top-1 % | check |",
        "|---|---|---|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        identical = "–" if r["min_identical"] is None else f"{r['min_identical']:.5f}"
        trained = "–" if r["as_trained"] is None else f"{r['as_trained']:.2f}"
        lines.append(
            f"| {r['model']} | {r['file']} | {r['engine']} | {r['compared']} | {r['agreement']:.2f} | {identical} "
            f"| {r['first_differing'] or '–'} | {_local(r)} | {trained} | {r['accuracy']:.2f} | "
            f"{'passed' if r['passed'] else 'FAILED'} |"
        )
    return "\n".join(lines) + "\n"


def exportable(checkpoint: Path, fmt: str) -> bool:
    """Whether fatq-export writes ``fmt`` for this checkpoint: a model with uint8 quantizers (QuantSpec
    ``full_range_8bit``, trained with ``--target cpu``) has no TensorRT file (``--format onnx``, int8 only)."""
    from fatq.checkpoint import load_fatq_checkpoint

    return fmt != "onnx" or not load_fatq_checkpoint(checkpoint)["spec"].get("full_range_8bit", False)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, checkpoint in enumerate(args.checkpoints):
        name = f"{index}-{checkpoint.parent.name}"
        formats = [fmt for fmt in args.formats.split(",") if exportable(checkpoint, fmt)]
        if "onnx" in args.formats.split(",") and "onnx" not in formats:
            print(f"{name}: no onnx file (uint8 quantizers: --target cpu); skipped", flush=True)
        for fmt, suffix, engine in (check for check in CHECKS if check[0] in formats):
            out = args.work_dir / f"{name}{suffix}.onnx"
            rows.append(row(name, fmt, check(checkpoint, fmt, engine, out, args)))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = f"CPU: {cpu_name()}; {int8_flags_summary()}\n\n" + table(rows)
    print(text)
    (args.work_dir / "sweep.md").write_text(text)
    (args.work_dir / "sweep.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
