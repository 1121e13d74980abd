"""Where OpenVINO spends its time on an int8 file: per-layer counters grouped by the kernel that ran.

Compiles each model (ONNX or OpenVINO IR) for the CPU with a static ``--batch`` shape, ``--threads``
inference threads, f32 precision hint and ``PERF_COUNT`` on, runs ``--warmup`` calls, then ``--runs``
calls, and prints the median time per call of every (layer type, kernel) pair as OpenVINO executed the
graph after its fusions (a ``Convolution`` row holds the int8 conv with everything fused into it, a
``Subgraph`` row a snippets kernel such as an Add + FakeQuantize pass). It also counts the executed layers
by type, which shows which Adds fused into convs. ``--no-snippets`` compiles with ``SNIPPETS_MODE=DISABLE``
(OpenVINO's snippets tokenizer otherwise takes some Adds before the conv fusions see them). ``--convs`` also
prints every executed convolution's median time in execution order, one column per model, so two files of the
same network can be compared conv by conv (their layer names differ). Random inputs: the kernels' time does
not depend on the values.

Usage::

    python benchmarks/openvino_profile.py fatq.ov.onnx nncf.xml ort-u8s8-qdq.onnx --batch 64 --threads 2
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module below
from fatq_tools import profiler_arguments  # noqa: E402


def compile_model(path: Path, batch: int, threads: int, snippets: bool):
    """The compiled model of ``path`` at [batch, ...] with per-layer counters on."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    shape = list(model.inputs[0].get_partial_shape().get_min_shape())
    model.reshape([batch, *shape[1:]])
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": True}
    if not snippets:
        config["SNIPPETS_MODE"] = "DISABLE"
    return core.compile_model(model, "CPU", config)


def profile(compiled, warmup: int, runs: int) -> tuple[dict[tuple[str, str], float], Counter, list[float]]:
    """({(layer type, kernel): median ms per call}, {executed layer type: count}, [median ms of each executed
    Convolution, in execution order])."""
    request = compiled.create_infer_request()
    port = compiled.inputs[0]
    x = np.random.default_rng(0).standard_normal(list(port.get_shape()), dtype=np.float32)
    for _ in range(warmup):
        request.infer([x])
    per_call: dict[tuple[str, str], list[float]] = defaultdict(list)
    per_conv: list[list[float]] = []
    for _ in range(runs):
        request.infer([x])
        totals: Counter = Counter()
        convs = []
        for layer in request.profiling_info:
            if layer.status == layer.Status.EXECUTED:
                ms = layer.real_time.total_seconds() * 1e3
                totals[(layer.node_type, layer.exec_type)] += ms
                if layer.node_type == "Convolution":
                    convs.append(ms)
        for key, ms in totals.items():
            per_call[key].append(ms)
        per_conv.append(convs)
    layers = Counter(
        op.get_rt_info()["layerType"].astype(str)
        for op in compiled.get_runtime_model().get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) not in ("Const", "Input", "Output")
    )
    conv_medians = [float(m) for m in np.median(np.array(per_conv), axis=0)] if per_conv and per_conv[0] else []
    return {key: float(np.median(ms)) for key, ms in per_call.items()}, layers, conv_medians


def main(argv=None) -> int:
    p = profiler_arguments(__doc__.split("\n\n")[0], runs=30)
    p.add_argument("--no-snippets", action="store_true", help="compile with SNIPPETS_MODE=DISABLE")
    p.add_argument("--convs", action="store_true", help="also print each convolution's time, models side by side")
    args = p.parse_args(argv)
    for path in args.models:
        if not path.is_file():
            p.error(f"{path} does not exist")
    import openvino as ov

    from engines.host import cpu_device, int8_flags_summary

    print(f"openvino {ov.get_version()}, {cpu_device()} ({int8_flags_summary()}), {args.threads} threads")
    conv_columns = []
    for path in args.models:
        times, layers, convs = profile(
            compile_model(path, args.batch, args.threads, not args.no_snippets), args.warmup, args.runs
        )
        conv_columns.append(convs)
        print(f"{path.name}: {sum(times.values()):.2f} ms per call (sum of layer medians), batch {args.batch}")
        print("  executed layers: " + ", ".join(f"{t} {n}" for t, n in sorted(layers.items())))
        for (layer_type, kernel), ms in sorted(times.items(), key=lambda kv: -kv[1]):
            print(f"  {layer_type:30s} {kernel:28s} {ms:7.3f} ms")
    if args.convs:
        print_conv_columns([path.name for path in args.models], conv_columns)
    return 0


def print_conv_columns(names: list[str], columns: list[list[float]]) -> None:
    """Each executed convolution's median ms, in execution order, one column per model ("–" past a model's
    last conv)."""
    print("convolutions in execution order, median ms:")
    print("  #   " + "".join(f"{name[:22]:>24s}" for name in names))
    for i in range(max(len(c) for c in columns)):
        cells = "".join(f"{c[i]:24.3f}" if i < len(c) else f"{'–':>24s}" for c in columns)
        print(f"  {i:<3d} {cells}")


if __name__ == "__main__":
    raise SystemExit(main())
