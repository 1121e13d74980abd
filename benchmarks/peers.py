"""fatq's int8 files against the engines' own 8-bit PTQ graphs of the same network, side by side.

For each network (a public FP32 CIFAR-10 checkpoint, or any FP32 fatq checkpoint given with ``--fp32
ARCH=PATH``, e.g. a MobileNetV2 trained by ``fatq-train --bits 32``, for which no public one exists) this
script builds:

- the FP32 ONNX file a user has (``torch.onnx.export`` of the FP32 model, dynamic batch);
- the peers' graphs at their documented best settings, from that file and 512 training images:
  - OpenVINO: NNCF ``nncf.quantize`` (default preset) -> OpenVINO IR (``.xml`` + ``.bin``);
  - ONNX Runtime: ``quant_pre_process`` then ``quantize_static`` U8S8 (activations QUInt8, weights QInt8),
    per-channel, MinMax, as QDQ and as QOperator (ORT's documented x86 setting, DEPLOY.md);
- fatq's W4A4 and W8A8 models, fine-tuned ``--max-steps`` steps from the same FP32 checkpoint with
  ``fatq-train`` once per ``--targets`` placement: ``portable`` exported as the file each engine runs
  fastest (``onnx-ort`` for ONNX Runtime, ``onnx-openvino`` for OpenVINO) plus the portable ``onnx`` file
  on both; ``cpu`` (one quantizer per residual-block input, every 8-bit quantizer full range, unsigned ones
  uint8) as ``onnx-ort`` and ``onnx-openvino``. Every file is exported with ``--calib-data`` (the training
  images). A job already in the work directory is reused, not retrained;

then times everything in ONE ``fatq-bench`` call (interleaved rounds, same threads, batch 1 and 64, top-1 on
the test split) and measures each fatq file's top-1 agreement, in each engine, with the model that engine
computes on it (its ``.reference.pt``; for ONNX Runtime on the float-bias portable file, the int32-bias deploy
reference) in further calls.
It prints one table per network: images/s at batch 64 (from the median call), the fastest call at batch 64,
median ms at batch 1, top-1, agreement, size on disk, and fatq / the engine's own 8-bit PTQ graph (OpenVINO:
NNCF's IR; ONNX Runtime: the faster of the two U8S8 files) from the medians and from the fastest calls, then how
far the medians sat above the fastest calls. On a loaded machine the medians of different graphs rise by
different amounts (measured: the peers' more than fatq's), so a median ratio from a run whose medians sit well
above its fastest calls measures the load as much as the files; the fastest-call ratio moves least.

Usage::

    python benchmarks/peers.py --data-dir ../shared/datasets --pretrained-dir ../shared/pretrained \\
        --archs resnet20 --bits 4,8 --targets portable,cpu --work-dir peers-out
    python benchmarks/peers.py --data-dir ../shared/datasets --archs mobilenetv2 --fp32 mobilenetv2=fp32/last.pt \
        --bits 4,8 --targets portable --work-dir peers-mbv2

Needs the ``[bench]`` extra (nncf). The CPU's model and flags and the package versions are printed with
the table and saved in ``WORK_DIR/peers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules below
from fatq_tools import (  # noqa: E402
    engine_agreement,
    run_tool,
    tool,
)
from ptq_vs_ort import export_fp32_onnx  # noqa: E402

from calibration.ptq import NormalizedBatches  # noqa: E402
from engines.host import cpu_flags, cpu_name  # noqa: E402
from export.formats import FORMATS  # noqa: E402
from fatq.checkpoint import init_from_pretrained  # noqa: E402
from fatq.data import load_split  # noqa: E402
from fatq.models import create_model  # noqa: E402

PUBLIC_CHECKPOINTS = {"resnet20": "resnet20-cifar10-fp32.th", "resnet56": "resnet56-cifar10-fp32.th"}
FLAGS_SHOWN = ("avx2", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
# fatq export formats per engine (the portable file runs on both)
FATQ_FORMATS = {"onnx": "", "onnx-ort": "-ort", "onnx-openvino": "-ov"}
# the formats each fatq-train --target is exported to (target "cpu" is for the CPU engines' own files)
TARGET_FORMATS = {"portable": ("onnx", "onnx-ort", "onnx-openvino"), "cpu": ("onnx-ort", "onnx-openvino")}
# the engine's own 8-bit PTQ graph a fatq file is compared with (a prefix of its role): a user of that engine
# would pick it; ORT's QDQ file also runs in OpenVINO, but is not OpenVINO's own tool
OWN_PTQ = {"openvino": "peer: NNCF", "ort": "peer: ORT quantize_static"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=os.environ.get("FATQ_DATA_DIR"), help="CIFAR-10 (JPEG archive)")
    p.add_argument("--pretrained-dir", type=Path, default=os.environ.get("FATQ_PRETRAINED_DIR"))
    p.add_argument("--archs", default="resnet20", help="comma-separated architectures")
    p.add_argument(
        "--fp32",
        action="append",
        default=[],
        metavar="ARCH=PATH",
        help="an FP32 checkpoint for ARCH (default: the public one in --pretrained-dir); repeatable",
    )
    p.add_argument("--bits", default="4,8", help="fatq bit-widths (W=A), comma-separated")
    p.add_argument("--max-steps", type=int, default=150, help="fatq-train steps from the FP32 checkpoint")
    p.add_argument(
        "--targets",
        default="portable,cpu",
        help=f"fatq-train --target values, comma-separated ({', '.join(TARGET_FORMATS)})",
    )
    p.add_argument("--calib-images", type=int, default=512, help="training images the peers calibrate on")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, help="evaluate on this many test images (default all)")
    p.add_argument("--work-dir", type=Path, default=Path("peers-out"))
    args = p.parse_args(argv)
    if args.data_dir is None or not Path(args.data_dir).exists():
        sys.exit("peers.py: --data-dir (or FATQ_DATA_DIR) must name the CIFAR-10 data.")
    if any("=" not in item for item in args.fp32):
        sys.exit("peers.py: --fp32 takes ARCH=PATH.")
    given = {arch: Path(path) for arch, path in (item.split("=", 1) for item in args.fp32)}
    args.fp32_checkpoints = {}  # arch -> the FP32 checkpoint everything is built from
    for arch in args.archs.split(","):
        if arch in given:
            if not given[arch].is_file():
                sys.exit(f"peers.py: {given[arch]} (--fp32 {arch}) is not a file.")
            args.fp32_checkpoints[arch] = given[arch]
        elif arch not in PUBLIC_CHECKPOINTS:
            sys.exit(f"peers.py: no public FP32 checkpoint for {arch}; give one with --fp32 {arch}=PATH.")
        elif args.pretrained_dir is None or not Path(args.pretrained_dir).is_dir():
            sys.exit("peers.py: --pretrained-dir (or FATQ_PRETRAINED_DIR) must name the public FP32 checkpoints.")
        else:
            args.fp32_checkpoints[arch] = Path(args.pretrained_dir) / PUBLIC_CHECKPOINTS[arch]
    if set(args.targets.split(",")) - set(TARGET_FORMATS):
        sys.exit(f"peers.py: --targets takes {', '.join(TARGET_FORMATS)}.")
    return args


def _tool(name: str) -> str:
    return tool(name, "[bench]")


# --- the peers' graphs -------------------------------------------------------------------------------


class _OrtReader:
    """onnxruntime.quantization CalibrationDataReader over the calibration batches."""

    def __init__(self, batches: list[np.ndarray]):
        self._batches = iter(batches)

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {"input": batch}


def ort_u8s8(fp32_onnx: Path, out: Path, batches: list[np.ndarray], quant_format: str) -> Path:
    """ORT's documented x86 PTQ: quant_pre_process, then quantize_static U8S8 per-channel (QDQ or QOperator)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(fp32_onnx), str(prepared))
    quantize_static(
        str(prepared),
        str(out),
        _OrtReader(batches),
        quant_format=getattr(QuantFormat, quant_format),
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    prepared.unlink()
    return out


def nncf_ir(fp32_onnx: Path, out_xml: Path, batches: list[np.ndarray]) -> Path:
    """NNCF's default 8-bit PTQ of the FP32 file, saved as OpenVINO IR."""
    try:
        import nncf
    except ImportError:
        sys.exit("peers.py: nncf is not installed; `pip install -e '.[bench]'`.")
    import openvino as ov

    # ov.convert_model, as OpenVINO's and NNCF's docs convert an ONNX model: Core.read_model keeps a grouped
    # conv's weight reshape as a ShapeOf subgraph, on which NNCF 3.4 puts per-(channel, kernel column)
    # weight ranges that OpenVINO cannot run on int8 (MobileNetV2's depthwise convs then ran in float32).
    model = ov.convert_model(str(fp32_onnx))
    images = [batch[i : i + 1] for batch in batches for i in range(len(batch))]  # NNCF counts items, not images
    quantized = nncf.quantize(model, nncf.Dataset(images), subset_size=len(images))
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return out_xml


# --- fatq's files ------------------------------------------------------------------------------------


def fatq_files(arch: str, bits: int, target: str, fp32_checkpoint: Path, args, work: Path) -> dict[str, Path]:
    """Train W{bits}A{bits} (``fatq-train --target``) briefly from the FP32 checkpoint (a job already in the
    work directory is reused) and export it once per format of :data:`TARGET_FORMATS`."""
    stem = f"{arch}-w{bits}a{bits}" + ("" if target == "portable" else f"-{target}")
    job = work / stem
    if not (job / "last.pt").exists():
        run_tool(
            [_tool("fatq-train"), "--arch", arch, "--bits", str(bits), "--data-dir", str(args.data_dir),
             "--pretrained", str(fp32_checkpoint), "--epochs", "1", "--max-steps", str(args.max_steps),
             "--batch-size", "128", "--device", "cpu", "--quiet", "--target", target, "--job-dir", str(job)]
        )  # fmt: skip
    files = {}
    for fmt in TARGET_FORMATS[target]:
        path = work / f"{stem}{FATQ_FORMATS[fmt]}.onnx"
        # --calib-data as the README's exports: the engine-exact moves then clear the near-ties images reach
        run_tool(
            [_tool("fatq-export"), str(job / "last.pt"), "--format", fmt, "-o", str(path), "--quiet",
             "--calib-data", str(args.data_dir)]
        )  # fmt: skip
        files[fmt] = path
    return files


# --- measuring ---------------------------------------------------------------------------------------


def _size(path: Path) -> int:
    """Bytes on disk (an IR's .xml and .bin together)."""
    return path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)


def _limit(args) -> list[str]:
    return ["--limit", str(args.limit)] if args.limit else []


def bench(models: list[Path], args, normalization: dict, out: Path) -> dict:
    """One timed fatq-bench call over ``models`` on ORT and OpenVINO; returns its JSON report."""
    mean, std = (",".join(map(str, normalization[key])) for key in ("mean", "std"))
    command = [_tool("fatq-bench"), *map(str, models), "--engine", "ort", "--engine", "openvino", "--quiet",
               "--threads", str(args.threads), "--data-dir", str(args.data_dir), "--json", str(out),
               "--mean", mean, "--std", std, "--batch-sizes", args.batch_sizes, "--iterations", str(args.iterations),
               "--warmup", str(args.warmup), "--rounds", str(args.rounds), *_limit(args)]  # fmt: skip
    run_tool(command)
    return json.loads(out.read_text())


def rows_of(report: dict, roles: dict[str, str], sizes: dict[str, int], agreement: dict) -> list[dict]:
    """One row per configuration: engine, graph role, images/s at 64 (median call), fastest and median ms at 64,
    median ms at 1, top-1, agreement, size."""
    rows = []
    for config in report["configs"]:
        label = config["label"]
        runs = {r["batch_size"]: r for r in report["runs"] if r["label"] == label}
        at_64 = runs[64]["latency_ms"] if 64 in runs else {}
        rows.append(
            {
                "engine": config["engine"],
                "graph": roles[Path(config["model"]).name],
                "file": Path(config["model"]).name,
                "images_per_s_64": runs[64]["throughput_ips"] if 64 in runs else None,
                "fastest_ms_64": at_64.get("min"),
                "median_ms_64": at_64.get("median"),
                "median_ms_1": runs[1]["latency_ms"]["median"] if 1 in runs else None,
                "top1": report["accuracy"].get(label, {}).get("top1"),
                "agreement": agreement.get((config["engine"], Path(config["model"]).name)),
                "size_bytes": sizes[Path(config["model"]).name],
            }
        )
    return rows


def add_ratios(rows: list[dict]) -> None:
    """fatq rows get ``vs_peer`` (images/s at 64 / the engine's own PTQ graph's, :data:`OWN_PTQ`; the faster one
    where there are two) and ``vs_peer_fastest`` (the same from the fastest calls: peer ms / fatq ms)."""
    for engine, prefix in OWN_PTQ.items():
        own = [r for r in rows if r["engine"] == engine and r["graph"].startswith(prefix)]
        best = max((r["images_per_s_64"] for r in own if r["images_per_s_64"]), default=None)
        fastest = min((r["fastest_ms_64"] for r in own if r["fastest_ms_64"]), default=None)
        for row in rows:
            if row["engine"] != engine or not row["graph"].startswith("fatq"):
                continue
            if best and row["images_per_s_64"]:
                row["vs_peer"] = row["images_per_s_64"] / best
            if fastest and row["fastest_ms_64"]:
                row["vs_peer_fastest"] = fastest / row["fastest_ms_64"]


def load_note(rows: list[dict]) -> str:
    """How far the batch-64 medians sat above the fastest calls (min-max over the rows), as one sentence."""
    excess = [r["median_ms_64"] / r["fastest_ms_64"] - 1 for r in rows if r["median_ms_64"] and r["fastest_ms_64"]]
    if not excess:
        return ""
    return (
        f"Batch-64 medians {100 * min(excess):.0f}–{100 * max(excess):.0f} % above the fastest calls; where they "
        "sit well above ~10 %, the machine was loaded and median ratios measure the load as much as the files."
    )


def markdown(arch: str, rows: list[dict]) -> str:
    def fmt(value, spec, unit=""):
        return "–" if value is None else format(value, spec) + unit

    lines = [
        f"### {arch}",
        "",
        "| engine | graph | images/s (64) | fastest ms (64) | ms (1) | top-1 % | agreement % | size KiB "
        "| fatq / own PTQ (64): median | fastest |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["engine"], r["graph"])):
        lines.append(
            f"| {r['engine']} | {r['graph']} | {fmt(r['images_per_s_64'], ',.0f')} | {fmt(r['fastest_ms_64'], '.2f')} "
            f"| {fmt(r['median_ms_1'], '.3f')} | {fmt(r['top1'], '.2f')} | {fmt(r['agreement'], '.2f')} "
            f"| {r['size_bytes'] / 1024:,.0f} | {fmt(r.get('vs_peer'), '.2f', '×')} "
            f"| {fmt(r.get('vs_peer_fastest'), '.2f', '×')} |"
        )
    note = load_note(rows)
    return "\n".join(lines + ([f"\n{note}"] if note else []))


def machine() -> dict:
    import onnxruntime
    import openvino

    try:
        import nncf

        nncf_version = nncf.__version__
    except ImportError:
        nncf_version = None
    flags = cpu_flags()
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "flags": {flag: flag in flags for flag in FLAGS_SHOWN},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.get_version(),
        "nncf": nncf_version,
    }


def run_arch(arch: str, args, work: Path) -> list[dict]:
    fp32_checkpoint = args.fp32_checkpoints[arch]
    test = load_split(args.data_dir, "test", quiet=True)
    train = load_split(args.data_dir, "train", quiet=True)
    fp32 = create_model(arch, bits=32, num_classes=len(test.class_names))
    normalization = init_from_pretrained(fp32, fp32_checkpoint)["normalization"]
    fp32_onnx = work / f"{arch}-fp32.onnx"
    export_fp32_onnx(fp32, fp32_onnx, tuple(test.images.shape[1:]))
    batches = [b.numpy() for b in NormalizedBatches(train.images, normalization, args.calib_images // 64, 64, seed=0)]

    roles = {fp32_onnx.name: "fp32 (torch.onnx.export)"}
    models = [fp32_onnx]
    for fmt in ("QDQ", "QOperator"):
        path = ort_u8s8(fp32_onnx, work / f"{arch}-ort-u8s8-{fmt.lower()}.onnx", batches, fmt)
        roles[path.name], models = f"peer: ORT quantize_static U8S8 {fmt}", [*models, path]
    ir = nncf_ir(fp32_onnx, work / f"{arch}-nncf.xml", batches)
    roles[ir.name], models = "peer: NNCF 8-bit (IR)", [*models, ir]
    fatq = {}
    for bits in map(int, args.bits.split(",")):
        for target in args.targets.split(","):
            fatq[bits, target] = fatq_files(arch, bits, target, fp32_checkpoint, args, work)
            for fmt, path in fatq[bits, target].items():
                label = f"fatq W{bits}A{bits} {fmt}" + ("" if target == "portable" else f", --target {target}")
                roles[path.name], models = label, [*models, path]

    report = bench(models, args, normalization, work / f"{arch}-bench.json")
    agreement = {}  # each fatq file in each engine against the model that engine computes on it
    for fmt, path in ((fmt, path) for files in fatq.values() for fmt, path in files.items()):
        for engine in (e for e in FORMATS[fmt].engines if e in ("ort", "openvino")):
            found = engine_agreement(path, engine, args.data_dir, args.threads, _limit(args))
            agreement[(engine, path.name)] = found["top1_agreement_pct"]
    rows = rows_of(report, roles, {m.name: _size(m) for m in models}, agreement)
    add_ratios(rows)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    host = machine()
    results = {"machine": host, "settings": {k: str(v) for k, v in vars(args).items()}, "archs": {}}
    tables = []
    for arch in args.archs.split(","):
        results["archs"][arch] = run_arch(arch, args, args.work_dir)
        tables.append(markdown(arch, results["archs"][arch]))
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in host["flags"].items())
    header = (
        f"CPU: {host['cpu']}, {host['cores']} cores; flags: {flags}. torch {host['torch']}, onnxruntime "
        f"{host['onnxruntime']}, openvino {host['openvino']}, nncf {host['nncf']}; {args.threads} threads."
    )
    text = header + "\n\n" + "\n\n".join(tables) + "\n"
    print(text)
    (args.work_dir / "peers.md").write_text(text)
    (args.work_dir / "peers.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
