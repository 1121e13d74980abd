"""What a 4-bit fatq file pays OpenVINO for its 16-level quantizers: timing probes that widen them to 256 levels.

OpenVINO's CPU plugin fuses a conv's output FakeQuantize into the int8 conv. A 256-level one whose range is the
whole uint8 range costs nothing there: the conversion to uint8 rounds and saturates
(``skipRoundClipOutputLinear`` in ``DnnlPostOpsComposer::appendAttrPostOps``). Any other FakeQuantize, a 16-level
one included, adds a round and a clip to the conv's epilogue. A 4-bit-activation model needs those clips (its
quantizers clamp at level 15); an 8-bit PTQ graph such as NNCF's has none.

This script writes timing probes of a fatq ``onnx-openvino`` file in which those FakeQuantizes run as 256-level
ones of the same step (low bounds kept, high bounds raised to low + 255 steps): ``probe-all`` widens every
FakeQuantize with fewer than 256 levels, ``probe-conv`` only those that read a conv, ``probe-add`` only those
that read a residual Add. **A probe computes a different function** (its activations are no longer clamped at
level 15): it only measures how fast the written file would run if its quantizers cost what NNCF's do, an upper
bound on what any exact form of the same 4-bit model can reach in OpenVINO. Then it runs the file, the probes and
the peer files (e.g. NNCF's IR) in one interleaved ``fatq-bench`` call; arguments after ``--`` go to fatq-bench.

    python benchmarks/openvino_epilogue_bound.py r20-w4a4.ov.onnx resnet20-nncf.xml -o probes -- \\
        --threads 2 --batch-sizes 64 --iterations 200 --rounds 10 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module below
from fatq_tools import run_tool, tool  # noqa: E402

WIDE_LEVELS = 256
PROBES = {"all": None, "conv": {"Conv"}, "add": {"Add"}}
PROBE_KEY = "timing_probe"  # metadata entry that marks a probe as what it is


def _levels(node: onnx.NodeProto) -> onnx.AttributeProto | None:
    return next((a for a in node.attribute if a.name == "levels"), None)


def widened(model: onnx.ModelProto, producers: set[str] | None) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` whose FakeQuantizes with fewer than 256 levels (only those reading an op whose type is
    in ``producers``; all when None) have 256 levels of the same step: input and output high bounds raised to
    low + 255 · (high − low) / (levels − 1), on constants of their own (a bound shared with another node stays),
    and a ``timing_probe`` metadata entry saying so. Returns (copy, number widened)."""
    probe = copy.deepcopy(model)
    graph = probe.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producer_type = {out: node.op_type for node in graph.node for out in node.output}
    count = 0
    for node in graph.node:
        levels = _levels(node)
        if node.op_type != "FakeQuantize" or levels is None or levels.i >= WIDE_LEVELS:
            continue
        if producers is not None and producer_type.get(node.input[0]) not in producers:
            continue
        in_low, in_high, out_low, out_high = (constants[name] for name in node.input[1:5])
        for port, low, high in ((2, in_low, in_high), (4, out_low, out_high)):
            wide_high = low + (WIDE_LEVELS - 1) * (high - low) / (levels.i - 1)
            name = f"{node.input[port]}__wide{count}_{port}"
            graph.initializer.append(numpy_helper.from_array(wide_high.astype(np.float32), name))
            node.input[port] = name
        levels.i = WIDE_LEVELS
        count += 1
    note = f"{count} FakeQuantizes widened to {WIDE_LEVELS} levels by openvino_epilogue_bound.py: not the model"
    onnx.helper.set_model_props(probe, {**{p.key: p.value for p in probe.metadata_props}, PROBE_KEY: note})
    return probe, count


def main() -> int:
    argv = sys.argv[1:]
    bench_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx_file", type=Path, help="a fatq onnx-openvino file with 16-level quantizers")
    parser.add_argument("peers", nargs="*", type=Path, help="files to time beside it (e.g. NNCF's .xml)")
    parser.add_argument("-o", "--out-dir", type=Path, required=True, help="where the probes are written")
    args = parser.parse_args(argv)
    if not args.onnx_file.is_file():
        sys.exit(f"openvino_epilogue_bound.py: {args.onnx_file} is not a file.")
    model = onnx.load(str(args.onnx_file))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    probes = []
    for label, producers in PROBES.items():
        probe, count = widened(model, producers)
        if count == 0:
            sys.exit(f"openvino_epilogue_bound.py: {args.onnx_file} has no FakeQuantize below 256 levels to widen.")
        path = args.out_dir / f"{args.onnx_file.name.removesuffix('.onnx')}.probe-{label}.onnx"
        onnx.save(probe, str(path))
        print(f"{path}: {count} FakeQuantizes widened to {WIDE_LEVELS} levels (timing probe, not the model)")
        probes.append(str(path))
    files = [str(args.onnx_file), *probes, *map(str, args.peers)]
    return run_tool([tool("fatq-bench", "[bench]"), *files, "--engine", "openvino", *bench_args], ok=(0,))


if __name__ == "__main__":
    raise SystemExit(main())
