"""Where ONNX Runtime spends its time on fatq's int8 file and its fp32 twin: kernel time per op type.

Runs each ONNX file with ORT's profiler (CPU provider, ``--threads`` intra-op threads, every graph
optimization) for ``--runs`` calls at ``--batch`` after ``--warmup`` calls, and prints the mean kernel
time per call of every op type as ORT ran it (after its QDQ fusions: ``QLinearConv`` is a fused int8
conv; ``DequantizeLinear``/``Clip``/``QuantizeLinear`` are the elementwise ops that enforce the b-bit
ranges between them). Kernel times add up to less than the wall time of a call (scheduling).

Usage::

    fatq-export best.pt --format onnx -o r20.onnx && fatq-export best.pt --format onnx-fp32 -o r20.fp32.onnx
    python benchmarks/ort_profile.py r20.onnx r20.fp32.onnx --batch 64 --threads 2
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module below
from fatq_tools import profiler_arguments  # noqa: E402


def profile(path: Path, batch: int, threads: int, warmup: int, runs: int) -> tuple[Counter, int]:
    """({op type: total kernel µs}, number of profiled runs) for ``path``."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = session.get_inputs()[0]
        x = np.random.default_rng(0).standard_normal((batch, *meta.shape[1:]), dtype=np.float32)
        for _ in range(warmup):
            session.run(None, {meta.name: x})
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):  # the first profiled run also loads kernels: dropped below
            session.run(None, {meta.name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    per_run: list[Counter] = []
    for event in events:
        if event.get("name") == "model_run":
            per_run.append(Counter())
        elif event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and per_run:
            per_run[-1][event["args"]["op_name"]] += event["dur"]
    totals = sum(per_run[1:], Counter())
    return totals, len(per_run) - 1


def main() -> None:
    args = profiler_arguments(__doc__.split("\n\n")[0], runs=20).parse_args()

    import onnxruntime as ort

    from engines.host import cpu_device

    print(f"onnxruntime {ort.__version__}, {cpu_device()}, {args.threads} threads, batch {args.batch}")
    for path in args.models:
        totals, runs = profile(path, args.batch, args.threads, args.warmup, args.runs)
        total = sum(totals.values())
        print(f"\n{path.name}: {total / runs / 1000:.2f} ms kernel time per call (mean of {runs})")
        for op, micros in totals.most_common():
            print(f"  {op:<22} {micros / runs / 1000:8.2f} ms  {100 * micros / total:5.1f} %")


if __name__ == "__main__":
    main()
