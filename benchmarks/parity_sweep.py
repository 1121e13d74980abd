"""Parity sweep: every int8 format of every given checkpoint, in the engine ``--check`` runs it in, on the test split.

For each checkpoint and each int8 format (``onnx``, ``onnx-ort``, ``onnx-openvino``) this runs
``fatq-export CKPT --format F --check --check-images N --json`` and tabulates what the check measured against
the file's ``.reference.pt``: top-1 agreement, the lowest share of identical integers over the observed
tensors, and the first tensor (in graph order) where engine and reference part. The portable file's check runs
ONNX Runtime; its OpenVINO agreement comes from one ``fatq-bench --engine openvino --reference`` call.

Usage::

    python benchmarks/parity_sweep.py A/last.pt B/last.pt --data-dir ../shared/datasets --work-dir sweep-out

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

FORMATS = {"onnx": "", "onnx-ort": "-ort", "onnx-openvino": "-ov"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", type=Path, help="fatq checkpoints (W/A-quantized)")
    p.add_argument("--data-dir", type=Path, default=os.environ.get("FATQ_DATA_DIR"))
    p.add_argument("--check-images", type=int, default=10000)
    p.add_argument("--work-dir", type=Path, default=Path("sweep-out"))
    args = p.parse_args(argv)
    if args.data_dir is None or not Path(args.data_dir).exists():
        sys.exit("parity_sweep.py: --data-dir (or FATQ_DATA_DIR) must name the test data.")
    missing = [str(c) for c in args.checkpoints if not c.is_file()]
    if missing:
        sys.exit(f"parity_sweep.py: no checkpoint at {', '.join(missing)}.")
    return args


def check(checkpoint: Path, fmt: str, out: Path, args) -> dict:
    """fatq-export --check of one format; returns the check part of its JSON report."""
    report = out.with_suffix(".json")
    command = [tool("fatq-export"), str(checkpoint), "--format", fmt, "-o", str(out), "--check", "--quiet"]
    command += ["--check-images", str(args.check_images), "--data-dir", str(args.data_dir), "--json", str(report)]
    run_tool(command, ok=(0, 1))  # 1 = a failed check: still a row
    return json.loads(report.read_text())["check"]


def openvino_agreement(onnx_path: Path, args) -> float | None:
    """Top-1 agreement of OpenVINO on the portable file with its .reference.pt (fatq-bench)."""
    report = onnx_path.with_name(onnx_path.stem + "-openvino.json")
    reference = onnx_path.with_name(onnx_path.stem + ".reference.pt")
    command = [tool("fatq-bench"), str(onnx_path), "--engine", "openvino", "--batch-sizes", "64", "--warmup", "0"]
    command += ["--iterations", "1", "--data-dir", str(args.data_dir), "--limit", str(args.check_images)]
    command += ["--reference", str(reference), "--json", str(report), "--quiet"]
    run_tool(command, ok=(0, 1))  # 1 = fatq-bench's gate (none is set here)
    agreement = json.loads(report.read_text())["agreement"]
    return next(iter(agreement.values()))["top1_agreement_pct"] if agreement else None


def row(name: str, fmt: str, result: dict) -> dict:
    identical = result["int8_identical_pct"]
    first = next((tensor for tensor, pct in identical.items() if pct < 100.0), None)
    return {
        "model": name,
        "file": fmt,
        "engine": result["engine"],
        "images": result["images"],
        "agreement": result["top1_agreement_pct"],
        "min_identical": result["int8_identical_pct_min"],
        "first_differing": first,
        "unobserved": len(result.get("unobserved_int8_tensors", [])),
        "passed": result["passed"],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, checkpoint in enumerate(args.checkpoints):
        name = f"{index}-{checkpoint.parent.name}"
        for fmt, suffix in FORMATS.items():
            out = args.work_dir / f"{name}{suffix}.onnx"
            rows.append(row(name, fmt, check(checkpoint, fmt, out, args)))
            if fmt == "onnx":
                rows.append({**rows[-1], "engine": "openvino", "agreement": openvino_agreement(out, args),
                             "min_identical": None, "first_differing": None, "passed": None})  # fmt: skip
    lines = [
        "| model | file | engine | images | agreement % | min identical % | first differing tensor | check |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        identical = "–" if r["min_identical"] is None else f"{r['min_identical']:.4f}"
        passed = "–" if r["passed"] is None else ("passed" if r["passed"] else "FAILED")
        lines.append(
            f"| {r['model']} | {r['file']} | {r['engine']} | {r['images']} | {r['agreement']:.2f} | {identical} "
            f"| {r['first_differing'] or '–'} | {passed} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    (args.work_dir / "sweep.md").write_text(text)
    (args.work_dir / "sweep.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
