"""fatq's QDQ int8 export against its fp32 export (and QDQ alternatives) in ONNX Runtime and OpenVINO.

For one checkpoint it writes, side by side:

- ``fp32``: ``fatq-export --format onnx-fp32`` (the folded float model);
- ``int8``: ``fatq-export --format onnx`` (fatq's QDQ layout: every Conv feeds a Q directly,
  ranges clipped in float after it);
- ``int8-qcdq``: the same graph with integer Clips between Q and DQ (``range_clip="int8"``; not a
  TensorRT file: its lint rule ``trt-clip-float`` refuses the integer Clip);
- ``ort-ptq``: ONNX Runtime's own ``quantize_static`` of the fp32 file (QDQ, per-channel,
  symmetric int8, MinMax on random inputs) — the form DEPLOY.md measured at 0.48x fp32 throughput
  without pre-processing (its documented U8S8 form with pre-processing: 1.99x).

For each file it reports how ONNX Runtime optimized it (fused ``QLinearConv`` vs float ``Conv`` /
``FusedConv`` left, from ``SessionOptions.optimized_model_filepath``), then times every file in
ONNX Runtime and OpenVINO with the same thread count, interleaved (the files take turns, so a
busy phase of a shared machine hits all of them), and prints median latency, throughput and the
ratio to fp32 on the same engine, with engine versions and the CPU.

Usage::

    python benchmarks/ort_openvino_int8_vs_fp32.py --checkpoint runs/r20-w4a4/last.pt --threads 2
    python benchmarks/ort_openvino_int8_vs_fp32.py --arch resnet20 --bits 4   # random weights: speed only

Numbers from a machine shared with other jobs are indicative only; quote figures from a quiet one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

VARIANTS = ("fp32", "int8", "int8-qcdq", "ort-ptq")


def _export(checkpoint: Path, work: Path) -> dict[str, Path]:
    """fp32 and int8 files through the export pipeline, the QCDQ variant from the saved deploy graph."""
    import onnx

    from export.deploy_graph import DeployGraph
    from export.pipeline import export_checkpoint
    from export.qdq_writer import write_qdq

    files = {"fp32": work / "fp32.onnx", "int8": work / "int8.onnx", "int8-qcdq": work / "int8-qcdq.onnx"}
    for fmt, key in (("onnx-fp32", "fp32"), ("onnx", "int8")):
        result = export_checkpoint(checkpoint, fmt, output=files[key], quiet=True)
    graph = DeployGraph.load(result.deploy_graph_path)  # the int8 file's, as written
    onnx.save(write_qdq(graph, range_clip="int8", metadata=graph.meta), str(files["int8-qcdq"]))
    return files


def _ort_ptq(fp32: Path, out: Path, shape: list[int]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class RandomImages(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.standard_normal((8, *shape), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        str(fp32),
        str(out),
        RandomImages(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return out


def _ort_ops(path: Path, work: Path) -> dict:
    """Node counts of the graph ONNX Runtime actually runs (after its QDQ fusions)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(work / f"{path.stem}.ort-optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return {
        "fused_int8_convs": counts["QLinearConv"],
        "float_convs": counts["Conv"] + counts["FusedConv"],
        "nodes": sum(counts.values()),
        "elementwise_qdq_clip": counts["QuantizeLinear"] + counts["DequantizeLinear"] + counts["Clip"],
    }


def _checkpoint(args, work: Path) -> Path:
    if args.checkpoint:
        return Path(args.checkpoint)
    from fatq.checkpoint import CIFAR_NORMALIZATION, save_checkpoint
    from fatq.models import create_model

    path = work / f"{args.arch}-w{args.bits}a{args.bits}-random.pt"
    save_checkpoint(path, create_model(args.arch, bits=args.bits).eval(), CIFAR_NORMALIZATION)
    return path


def _time(files: dict[str, Path], args, shape: list[int]) -> list[dict]:
    from engines.openvino_runner import OpenVinoRunner
    from engines.ort_runner import OrtRunner
    from engines.timing import time_interleaved

    rows = []
    engines = {
        "onnxruntime": lambda name, path: OrtRunner(path, threads=args.threads, name=name),
        "openvino": lambda name, path: OpenVinoRunner(path, threads=args.threads, name=name),
    }
    for engine, make in engines.items():
        runners = {name: make(name, path).activate() for name, path in files.items()}
        try:
            for batch in args.batch_sizes:
                feed = {"input": np.random.default_rng(1).standard_normal((batch, *shape), dtype=np.float32)}
                results = time_interleaved(
                    runners, dict.fromkeys(runners, feed), batch, args.warmup, args.iterations, rounds=args.rounds
                )
                base = results["fp32"].latency.median
                for name, result in results.items():
                    rows.append(
                        {
                            "engine": engine,
                            "variant": name,
                            "batch": batch,
                            "median_ms": result.latency.median,
                            "p90_ms": result.latency.p90,
                            "images_per_s": result.throughput_ips,
                            "speedup_vs_fp32": base / result.latency.median,
                            "version": runners[name].info().engine_version,
                        }
                    )
        finally:
            for runner in runners.values():
                runner.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="fatq checkpoint (default: a random model of --arch/--bits)")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[1, 64])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=8, help="turns the files take (interleaving)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--work-dir", help="keep the exported files here (default: a temp dir)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    from engines.host import cpu_device

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = _checkpoint(args, work)
        files = _export(checkpoint, work)
        shape = _input_shape(files["fp32"])
        wanted = args.variants.split(",")
        if "ort-ptq" in wanted:
            files["ort-ptq"] = _ort_ptq(files["fp32"], work / "ort-ptq.onnx", shape)
        files = {k: v for k, v in files.items() if k in wanted or k == "fp32"}
        ops = {name: _ort_ops(path, work) for name, path in files.items()}
        rows = _time(files, args, shape)

    print(f"CPU: {cpu_device()}; threads {args.threads}; checkpoint {checkpoint.name}")
    print("\nONNX Runtime's optimized graphs:")
    print(f"  {'variant':<11} {'QLinearConv':>11} {'float Conv':>10} {'Q/DQ/Clip':>9} {'nodes':>6}")
    for name, counts in ops.items():
        print(
            f"  {name:<11} {counts['fused_int8_convs']:>11} {counts['float_convs']:>10} "
            f"{counts['elementwise_qdq_clip']:>9} {counts['nodes']:>6}"
        )
    print(
        f"\n  {'engine':<12} {'version':<28} {'variant':<11} {'batch':>5} {'median ms':>10} {'img/s':>9} {'vs fp32':>8}"
    )
    for r in rows:
        print(
            f"  {r['engine']:<12} {r['version'][:28]:<28} {r['variant']:<11} {r['batch']:>5} {r['median_ms']:>10.2f} "
            f"{r['images_per_s']:>9.0f} {r['speedup_vs_fp32']:>7.2f}x"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"cpu": cpu_device(), "threads": args.threads, "ops": ops, "rows": rows}, indent=2)
        )


def _input_shape(path: Path) -> list[int]:
    """[C, H, W] from the file's metadata (fatq-export records ["batch", C, H, W])."""
    import onnx

    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(metadata["input_shape"])[1:]


if __name__ == "__main__":
    main()
