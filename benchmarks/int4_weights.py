"""4-bit weights stored as ONNX INT4 (opset 21): how much smaller the file gets and how the engines run it.

fatq writes 4-bit conv weights as int8 initializers, each channel's integers widened by a factor k
(``export/lower.py``). This script rewrites a fatq ONNX file so that every such weight is an INT4
initializer (the integers / k, packed two per byte) with its scale times k, the same real weights, then
reports for the original and the rewritten file:

- the size on disk;
- how each engine runs the convs: ONNX Runtime's optimized graph (QLinearConv or float Conv), OpenVINO's
  runtime precision per Convolution (u8/i8: an int8 kernel; f32/bf16: float);
- the largest logit difference between the two files in each engine, on random normal inputs (0 where the
  engine computes both alike);
- median and fastest latency at ``--batch``, the two files interleaved per round.

    python benchmarks/int4_weights.py W4A4.onnx --batch 64 --rounds 10 --iterations 20 --threads 2

A file with OpenVINO-only ops (``--format onnx-openvino``) runs in OpenVINO only. The rewritten file is
written to ``--out-dir`` (default: a temporary directory) and is not a fatq format.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engines.host import cpu_name, int8_flags_summary  # noqa: E402

INT4_MIN, INT4_MAX = -8, 7


def _as_int4(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(integers / k as int4 [weight's shape], k [channels]) when each channel's integers are k times values
    in [-8, 7]; None otherwise (an 8-bit weight)."""
    rows = weight.reshape(weight.shape[0], -1).astype(np.int64)
    k = np.gcd.reduce(np.abs(rows), axis=1)
    k[k == 0] = 1
    values = rows // k[:, None]
    if values.min() < INT4_MIN or values.max() > INT4_MAX:
        return None
    return values.reshape(weight.shape).astype(ml_dtypes.int4), k


def rewrite_int4(source: Path, target: Path) -> int:
    """Write ``source`` with its 4-bit weights as INT4 (opset >= 21) to ``target``; returns how many."""
    model = onnx.load(source)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    rewritten = 0
    for index, node in enumerate(graph.node):
        weight_init = initializers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if weight_init is None:
            continue
        weight = numpy_helper.to_array(weight_init)
        found = _as_int4(weight) if weight.dtype == np.int8 and weight.ndim >= 2 else None
        if found is None:
            continue
        values, k = found
        scale = numpy_helper.to_array(initializers[node.input[1]])
        if scale.ndim == 0 and len(set(k.tolist())) != 1:
            continue  # a per-tensor scale needs one k for every channel
        scale = (scale * (k[0] if scale.ndim == 0 else k)).astype(np.float32)
        # new names: scales and zero points may be shared with other nodes
        names = [f"int4_weight_{index}", f"int4_scale_{index}", f"int4_zero_point_{index}"]
        graph.initializer.extend([numpy_helper.from_array(values, names[0]), numpy_helper.from_array(scale, names[1])])
        if len(node.input) > 2 and node.input[2]:
            zero = np.zeros(numpy_helper.to_array(initializers[node.input[2]]).shape, ml_dtypes.int4)
            graph.initializer.append(numpy_helper.from_array(zero, names[2]))
        for position, name in enumerate(names[: len(node.input)]):
            node.input[position] = name
        rewritten += 1
    used = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 21)
    onnx.save(model, target)
    return rewritten


def _ort_session(path: Path, threads: int, optimized: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _runs_in_ort(path: Path) -> bool:
    return all(node.domain in ("", "ai.onnx", "com.microsoft") for node in onnx.load(path).graph.node)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", type=Path, help="a fatq ONNX file of a model with 4-bit weights")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path)
    args = parser.parse_args(argv)
    if not args.onnx.is_file():
        sys.exit(f"int4_weights.py: {args.onnx} is not a file.")
    import onnxruntime as ort
    import openvino as ov

    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="fatq-int4-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    int4 = out_dir / f"{args.onnx.stem}-int4.onnx"
    count = rewrite_int4(args.onnx, int4)
    if count == 0:
        sys.exit(f"int4_weights.py: {args.onnx} has no 4-bit weights to store as INT4.")
    files = {"int8 weights": args.onnx, "INT4 weights": int4}
    print(f"CPU: {cpu_name()} ({int8_flags_summary()}); onnxruntime {ort.__version__}, openvino {ov.__version__}")
    print(f"{count} weights rewritten as INT4 -> {int4}")
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
    runners, outputs = {}, {}
    core = ov.Core()
    for label, path in files.items():
        print(f"\n{label}: {path.stat().st_size:,} bytes")
        if _runs_in_ort(path):
            optimized = out_dir / f"{path.stem}.ort-optimized.onnx"
            session = _ort_session(path, args.threads, optimized)
            ops = collections.Counter(node.op_type for node in onnx.load(optimized).graph.node)
            print(f"  onnxruntime: {ops['QLinearConv']} QLinearConv, {ops['Conv']} float Conv after optimization")
            name = session.get_inputs()[0].name
            runners[("onnxruntime", label)] = lambda s=session, n=name: s.run(None, {n: x})[0]
        compiled = core.compile_model(
            str(path), "CPU", {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY"}
        )
        precisions = collections.Counter(
            op.get_rt_info()["runtimePrecision"].astype(str)
            for op in compiled.get_runtime_model().get_ordered_ops()
            if op.get_rt_info()["layerType"].astype(str) == "Convolution"
        )
        print(f"  openvino: Convolution runtime precisions {dict(precisions)}")
        runners[("openvino", label)] = lambda c=compiled: c(x)[0]
    for key, run in runners.items():
        outputs[key] = run()
    print()
    for engine in ("onnxruntime", "openvino"):
        if (engine, "INT4 weights") in outputs and (engine, "int8 weights") in outputs:
            difference = np.abs(outputs[(engine, "int8 weights")] - outputs[(engine, "INT4 weights")]).max()
            print(f"{engine}: INT4 vs int8 file, largest |logit difference| {difference:.3g}")
    times = collections.defaultdict(list)
    for _ in range(args.rounds):
        for key, run in runners.items():
            for _ in range(3):
                run()
            for _ in range(args.iterations):
                started = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - started)
    print(f"\n| engine | weights | median ms (batch {args.batch}) | fastest ms |\n|---|---|---:|---:|")
    for (engine, label), values in times.items():
        print(f"| {engine} | {label} | {1e3 * np.median(values):.2f} | {1e3 * np.min(values):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
