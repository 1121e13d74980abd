"""The paper's comparison at a CPU budget: FAT against its own ablation and PTQ, each deployed as an int8 file.

Every row builds one ResNet-20 checkpoint on CIFAR-10 (the JPEG split) and evaluates it twice on the test
split: the PyTorch model as trained, and its exported int8 QDQ file (``fatq-export --format onnx --check``)
in ONNX Runtime, with the check's top-1 agreement between the engine and the file's ``.reference.pt``.

Row groups (``--groups``, comma-separated; each row is run once and cached under ``--work-dir/rows``):

- ``paper``: W5A5/W4A4/W3A3/W2A2 x {FAT, the same quantizers with ``--no-transform``, ``fatq-ptq`` with
  bias correction}, each training row ``--epochs`` (default 1) from the public FP32 ResNet-20; the
  progressive 5 -> 4 -> 3 -> 2 schedule (each stage ``--epochs`` from the one above, the 5-bit stage being
  the FAT W5A5 row); the FAT authors' two shared checkpoints imported with ``fatq-import`` and evaluated,
  and each fine-tuned ``--epochs`` as a W4A4 fatq model.
- ``paper-start``: FAT W4A4 and W2A2 from FP32 without the warm start (``--paper-start``), against the
  ``paper`` rows that have it.
- ``mask-init``: FAT W4A4/W3A3/W2A2 with ``--mask-init unsaturated`` (the mask starts outside the float32
  saturation of sigmoid), against the ``paper`` rows.
- ``trt``: FAT W4A4 trained with TensorRT's quantizer placement (``--target trt``), against the paper row.

Usage::

    python benchmarks/paper_table.py --data-dir ../shared/datasets --pretrained-dir ../shared/pretrained \\
        --work-dir paper-out --groups paper

A row whose command fails is recorded with its exit status and the table goes on.

The paper's full recipe (400 epochs per training row, the reference's schedule scaled by fatq-train's defaults:
lr 0.04, x0.1 at epochs 150 and 225, batch 256, weight decay 5e-4), for a machine with a GPU::

    python benchmarks/paper_table.py --groups paper --epochs 400 --device cuda --work-dir paper-400
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module below
from fatq_tools import tool  # noqa: E402

from engines.host import int8_flags_summary  # noqa: E402

PUBLIC_FP32 = "resnet20-cifar10-fp32.th"
REFERENCE_FP32 = "fat-reference/resnet_20_32bit.pth.tar"
REFERENCE_W4 = "fat-reference/resnet_20_4bit.pth.tar"


@dataclass
class Row:
    """One checkpoint to build and evaluate.

    ``make`` is the command that writes ``checkpoint`` (None: ``checkpoint`` comes from ``after``'s row);
    ``after`` names rows whose checkpoints this one starts from; ``fmt`` is the export format evaluated.
    """

    name: str
    group: str
    method: str
    bits: str
    make: list[str] | None
    checkpoint: Path
    train_json: Path | None = None
    after: list[str] = field(default_factory=list)
    fmt: str = "onnx"
    note: str = ""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=os.environ.get("FATQ_DATA_DIR"))
    p.add_argument("--pretrained-dir", type=Path, default=os.environ.get("FATQ_PRETRAINED_DIR"))
    p.add_argument("--work-dir", type=Path, default=Path("paper-out"))
    p.add_argument("--groups", default="paper", help="comma-separated: paper, paper-start, mask-init, trt")
    p.add_argument("--epochs", type=int, default=1, help="epochs of every training row (default 1)")
    p.add_argument("--check-images", type=int, default=10000)
    p.add_argument("--device", default="cpu", help="training device: cpu (default) or cuda")
    p.add_argument("--only", default=None, help="comma-separated row names to run, in this order (default: all)")
    p.add_argument("--table-only", action="store_true", help="tabulate the rows already built; run nothing")
    args = p.parse_args(argv)
    if args.table_only:  # only the saved rows are read; no row's command runs, so no data is needed
        args.data_dir, args.pretrained_dir = Path(args.data_dir or "."), Path(args.pretrained_dir or ".")
        return args
    if args.data_dir is None or not Path(args.data_dir).exists():
        sys.exit("paper_table.py: --data-dir (or FATQ_DATA_DIR) must name the CIFAR-10 data.")
    if args.pretrained_dir is None or not (Path(args.pretrained_dir) / PUBLIC_FP32).is_file():
        sys.exit(f"paper_table.py: --pretrained-dir (or FATQ_PRETRAINED_DIR) must hold {PUBLIC_FP32}.")
    return args


def train_row(name, group, method, bits, pretrained, args, extra=(), after=()) -> Row:
    """A fatq-train row: ``--epochs`` from ``pretrained`` (a path, or the row named in ``after``)."""
    job = args.work_dir / "jobs" / name
    command = [tool("fatq-train"), "--arch", "resnet20", "--bits", str(bits), "--pretrained", str(pretrained)]
    command += ["--data-dir", str(args.data_dir), "--epochs", str(args.epochs), "--device", args.device]
    command += ["--job-dir", str(job), "--json", str(job.with_suffix(".train.json")), "--quiet", *extra]
    return Row(name, group, method, f"W{bits}A{bits}", command, job / "best.pt", job.with_suffix(".train.json"),
               list(after))  # fmt: skip


def rows_of(args) -> list[Row]:
    """Every row of the selected groups, in an order where each row's sources come first."""
    fp32 = args.pretrained_dir / PUBLIC_FP32
    jobs = args.work_dir / "jobs"
    groups = set(args.groups.split(","))
    rows: list[Row] = []
    if "paper" in groups:
        for bits in (4, 2, 5, 3):
            rows.append(train_row(f"fat-w{bits}", "paper", "FAT", bits, fp32, args))
            rows.append(train_row(f"notransform-w{bits}", "paper", "no transform", bits, fp32, args,
                                  ["--no-transform"]))  # fmt: skip
            ptq = jobs / f"ptq-w{bits}.pt"
            command = [tool("fatq-ptq"), str(fp32), "--arch", "resnet20", "--bits", str(bits)]
            command += ["--data-dir", str(args.data_dir), "-o", str(ptq), "--json", str(ptq.with_suffix(".json"))]
            rows.append(Row(f"ptq-w{bits}", "paper", "fatq-ptq + bias correction", f"W{bits}A{bits}",
                            command + ["--quiet"], ptq))  # fmt: skip
        source = "fat-w5"
        for bits in (4, 3, 2):
            name = f"progressive-w{bits}"
            rows.append(train_row(name, "paper", "FAT progressive", bits, jobs / source / "best.pt", args,
                                  after=[source]))  # fmt: skip
            source = name
        for name, file, bits, fmt in (("reference-fp32", REFERENCE_FP32, 32, "onnx-fp32"),
                                      ("reference-w4", REFERENCE_W4, 4, "onnx")):  # fmt: skip
            imported = jobs / f"{name}.pt"
            command = [tool("fatq-import"), str(args.pretrained_dir / file), "--arch", "resnet20"]
            command += ["--bits", str(bits), "-o", str(imported)]
            label = "FP32" if bits == 32 else f"W{bits}A{bits}"
            rows.append(Row(name, "paper", "FAT authors' checkpoint, imported", label, command, imported, fmt=fmt))
            rows.append(train_row(f"{name}-finetuned", "paper", "FAT authors' checkpoint + fatq FAT", 4, imported,
                                  args, ["--shortcut", "B"], after=[name]))  # fmt: skip
    if "paper-start" in groups:
        for bits in (4, 2):
            rows.append(train_row(f"fat-w{bits}-paper-start", "paper-start", "FAT, --paper-start", bits, fp32, args,
                                  ["--paper-start"]))  # fmt: skip
    if "mask-init" in groups:
        for bits in (4, 3, 2):
            rows.append(train_row(f"fat-w{bits}-mask-unsaturated", "mask-init", "FAT, --mask-init unsaturated",
                                  bits, fp32, args, ["--mask-init", "unsaturated"]))  # fmt: skip
    if "trt" in groups:
        rows.append(train_row("fat-w4-target-trt", "trt", "FAT, --target trt", 4, fp32, args, ["--target", "trt"]))
    if args.only:  # in the order given
        by_name = {r.name: r for r in rows}
        rows = [by_name[name] for name in args.only.split(",") if name in by_name]
    return rows


def run(command: list[str], log: Path) -> tuple[int, float]:
    """Run ``command`` with its output appended to ``log``; (exit status, seconds)."""
    start = time.monotonic()
    with log.open("a") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
    return code, time.monotonic() - start


def model_top1(row: Row, args, log: Path) -> float | None:
    """Top-1 of the PyTorch model on the test split: from the training JSON, else ``fatq-train --eval-only``."""
    if row.train_json is not None and row.train_json.is_file():
        return json.loads(row.train_json.read_text())["top1"]
    report = row.checkpoint.with_suffix(".eval.json")
    command = [tool("fatq-train"), "--eval-only", str(row.checkpoint), "--data-dir", str(args.data_dir)]
    command += ["--device", "cpu", "--json", str(report), "--quiet"]
    code, _ = run(command, log)
    return json.loads(report.read_text())["top1"] if code == 0 else None


def deployed(row: Row, args, log: Path) -> dict:
    """fatq-export --check of the row's checkpoint in ONNX Runtime; the check's figures."""
    onnx = row.checkpoint.with_name(row.checkpoint.stem + f"-{row.name}.onnx")
    report = onnx.with_suffix(".export.json")
    command = [tool("fatq-export"), str(row.checkpoint), "--format", row.fmt, "-o", str(onnx), "--check"]
    command += ["--check-images", str(args.check_images), "--data-dir", str(args.data_dir)]
    command += ["--calib-data", str(args.data_dir), "--json", str(report), "--quiet"]
    code, seconds = run(command, log)
    if not report.is_file():
        return {"export_exit": code}
    check = json.loads(report.read_text())["check"]
    return {
        "export_exit": code,
        "export_seconds": round(seconds, 1),
        "engine": check["engine"],
        "engine_top1": check["accuracy"][check["engine"]],
        "agreement_with_reference": check[f"{check['engine']}_vs_reference"]["top1_agreement_pct"],
        "check_passed": check["passed"],
        "images": check["images"],
    }


def run_row(row: Row, args) -> dict:
    """Build the row's checkpoint (unless cached) and evaluate it; the row's result, also saved as JSON."""
    saved = args.work_dir / "rows" / f"{row.name}.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    log = args.work_dir / "logs" / f"{row.name}.log"
    result = {"name": row.name, "group": row.group, "method": row.method, "bits": row.bits, "format": row.fmt}
    print(f"paper_table.py: {row.name} ...", flush=True)
    code, seconds = run(row.make, log)
    result.update(make_exit=code, make_seconds=round(seconds, 1))
    if code == 0 and row.checkpoint.is_file():
        result["model_top1"] = model_top1(row, args, log)
        result.update(deployed(row, args, log))
    saved.write_text(json.dumps(result, indent=2))
    print(f"paper_table.py: {row.name}: {result}", flush=True)
    return result


def cell(value, digits=2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(results: list[dict]) -> str:
    lines = [
        "| row | method | bits | model top-1 % | int8 file in ORT top-1 % | ORT vs the model it computes % | build s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        failed = "" if r.get("make_exit") == 0 else f" (exit {r.get('make_exit')})"
        lines.append(
            f"| {r['name']}{failed} | {r['method']} | {r['bits']} | {cell(r.get('model_top1'))} "
            f"| {cell(r.get('engine_top1'))} | {cell(r.get('agreement_with_reference'))} "
            f"| {cell(r.get('make_seconds'), 0)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    for sub in ("rows", "logs", "jobs"):
        (args.work_dir / sub).mkdir(parents=True, exist_ok=True)
    results = []
    for row in rows_of(args):
        if args.table_only:
            saved = args.work_dir / "rows" / f"{row.name}.json"
            results += [json.loads(saved.read_text())] if saved.is_file() else []
            continue
        missing = [a for a in row.after if not (args.work_dir / "rows" / f"{a}.json").is_file()]
        if missing:
            print(f"paper_table.py: {row.name} skipped: {', '.join(missing)} not built.", flush=True)
            continue
        results.append(run_row(row, args))
    text = table(results)
    header = (
        f"paper_table.py --groups {args.groups} --epochs {args.epochs}; {platform.processor() or platform.machine()}"
        f", {os.cpu_count()} cores, {int8_flags_summary()}\n\n"
    )
    print(header + text)
    (args.work_dir / f"table-{args.groups.replace(',', '+')}.md").write_text(header + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
