"""ONNX Runtime's QLinearConv by activation and weight type: why the ``onnx-ort`` file's convs are uint8 x int8.

One stem-sized conv (3x3, 16 output channels, 32x32 images, batch 64), every weight ±127 at random, input
integers 0..126, timed as uint8 x int8, int8 x int8 and uint8 x uint8 with 3, 4 and 16 input channels.

    python benchmarks/ort_conv_types.py --threads 2

Prints the median of ``--runs`` calls per variant and the CPU's int8 flags.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engines.host import cpu_name, int8_flags_summary  # noqa: E402

NUMPY = {TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}


def conv_model(x_type: int, w_type: int, channels: int, rng: np.random.Generator):
    """QLinearConv x_type x w_type -> x_type, [N, channels, 32, 32] -> [N, 16, 32, 32]."""
    x_np, w_np = NUMPY[x_type], NUMPY[w_type]
    w_zero = 128 if w_type == TensorProto.UINT8 else 0
    weight = (rng.choice([-127, 127], size=(16, channels, 3, 3)) + w_zero).astype(w_np)
    initializers = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
        numpy_helper.from_array(np.array(0, x_np), "xz"),
        numpy_helper.from_array(np.full(16, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.full(16, w_zero, w_np), "wz"),
        numpy_helper.from_array(np.array(0.05, np.float32), "ys"),
        numpy_helper.from_array(np.array(0, x_np), "yz"),
        numpy_helper.from_array(np.zeros(16, np.int32), "b"),
    ]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"], pads=[1] * 4)
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", x_type, ["N", channels, 32, 32])],
        [helper.make_tensor_value_info("y", x_type, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, {cpu_name()} ({int8_flags_summary()}), {args.threads} threads")
    names = {TensorProto.UINT8: "uint8", TensorProto.INT8: "int8"}
    for channels in (3, 4, 16):
        for x_type, w_type in ((TensorProto.UINT8, TensorProto.INT8), (TensorProto.INT8, TensorProto.INT8),
                               (TensorProto.UINT8, TensorProto.UINT8)):  # fmt: skip
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.log_severity_level = 3
            model = conv_model(x_type, w_type, channels, rng).SerializeToString()
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            x = rng.integers(0, 127, size=(args.batch, channels, 32, 32)).astype(NUMPY[x_type])
            for _ in range(5):
                session.run(None, {"x": x})
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                session.run(None, {"x": x})
                times.append(time.perf_counter() - start)
            label = f"{names[x_type]} x {names[w_type]}"
            print(f"  {channels:2d} input channels, {label:14s}: {np.median(times) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
