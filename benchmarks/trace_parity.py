"""Where an engine's integers part from the reference's, and why: node by node, with the distance to a tie.

``fatq-export --check`` counts identical integers per observed tensor, but a difference propagates: every
tensor after the first differing value differs too. This script finds the values each node computes
differently *itself*. It runs the engine on a debug copy of the file (the observable tensors as outputs,
:func:`engines.deploy_check.observable_tensors`), then runs the deploy reference with every observed tensor
replaced by the engine's integers (``DeployReference.run(overrides=...)``), so each node of the reference
sees the engine's inputs. A node whose integers still differ rounds differently from the engine on equal
inputs. For each such value it prints the reference's value before rounding, t = y / s, and its distance
to the nearest rounding boundary k + 1/2; and for a value downstream of unobserved tensors (an 8-bit branch
quantizer that OpenVINO fuses into its conv), the same for those tensors' values at the positions that feed it.

Usage::

    python benchmarks/trace_parity.py FILE.onnx --engine openvino --data-dir ../shared/datasets --images 2000

``FILE.deploy.npz`` (the graph the file was written from) must lie beside the file. The reference replays
the engine's bias arithmetic (:data:`engines.registry.ENGINES`), as ``--check`` does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import torch

from engines.deploy_check import check_runner, check_images, observable_tensors, with_outputs
from engines.model_files import in_memory_model
from engines.registry import ENGINES
from export.deploy_graph import DeployGraph
from export.formats import DEPLOY_GRAPH, REFERENCE, companion_path
from export.onnx_builder import INPUT_NAME
from export.reference import DeployReference
from fatq.checkpoint import load_fatq_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("onnx_file", type=Path)
    p.add_argument("--engine", default="openvino", choices=sorted(ENGINES))
    p.add_argument("--data-dir", required=True)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--show", type=int, default=10, help="differing values to print per node")
    return p.parse_args(argv)


class PreRounding:
    """The reference's quantized nodes with their values before rounding, t = y / s (float64 [N, C, H, W])."""

    def __init__(self, reference: DeployReference):
        self.reference = reference
        self.values: dict[str, torch.Tensor] = {}
        original = torch.round

        def recording_round(t, *args, **kwargs):  # the reference rounds each quantized node's t once
            self.values[self.current] = t.detach().double().clone()
            return original(t, *args, **kwargs)

        self._round = recording_round
        self._original = original
        self.current = ""

    def run(self, x: torch.Tensor, overrides: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        reference, captured = self.reference, {}
        env = {reference.graph.input_name: x.float()}
        torch.round = self._round
        try:
            with torch.no_grad():
                for index, node in enumerate(reference.graph.nodes):
                    self.current = node.output
                    env[node.output] = reference._run_node(index, node, env)
                    if node.output in reference.quant:
                        captured[node.output] = env[node.output].clone()
                    if node.output in overrides:
                        env[node.output] = overrides[node.output].to(env[node.output].dtype)
        finally:
            torch.round = self._original
        return captured


def tie_distance(t: np.ndarray) -> np.ndarray:
    """|t − (k + 1/2)| for the nearest boundary k + 1/2, in output levels."""
    return np.abs(t - np.floor(t) - 0.5)


def quantized_sources(tensor: str, producers: dict, quant: dict) -> list[str]:
    """The quantized tensors ``tensor``'s node computes from, through float ops (a residual Add, a ReLU)."""
    found, stack = [], list(producers[tensor].inputs)
    while stack:
        name = stack.pop()
        if name in quant:
            found.append(name)
        elif name in producers:
            stack.extend(producers[name].inputs)
    return found


def main(argv=None) -> int:
    args = parse_args(argv)
    graph = DeployGraph.load(companion_path(args.onnx_file, DEPLOY_GRAPH))
    reference = DeployReference(graph, ENGINES[args.engine].bias_arithmetic)
    model = onnx.load(str(args.onnx_file))
    exposed = observable_tensors(model, reference.quant, args.engine)
    debug = check_runner(
        args.engine,
        in_memory_model(with_outputs(model, {o.name: o.dtype for o in exposed.values()}), "debug.onnx"),
        2,
        "debug",
    )
    checkpoint = load_fatq_checkpoint(companion_path(args.onnx_file, REFERENCE))
    images, _, _ = check_images(checkpoint, args.data_dir, args.images, list(checkpoint["input_size"]))
    producers = {node.output: node for node in graph.nodes}
    unobserved = set(reference.quant) - set(exposed)
    print(f"{args.onnx_file.name}: {len(exposed)} observed tensors, unobserved: {sorted(unobserved)}")
    tracer = PreRounding(reference)
    nearest: list[float] = []  # per locally differing value: the smallest tie distance on its path
    for start in range(0, images.shape[0], args.batch):
        x = images[start : start + args.batch].float()
        out = debug.infer({INPUT_NAME: x.numpy()})
        engine_ints = {t: torch.from_numpy(o.integers(out[o.name]).astype(np.float32)) for t, o in exposed.items()}
        captured = tracer.run(x, engine_ints)
        for node in graph.nodes:
            tensor = node.output
            if tensor not in exposed:
                continue
            ref, eng = captured[tensor].numpy(), engine_ints[tensor].numpy()
            where = np.argwhere(ref != eng)
            for shown, pos in enumerate(map(tuple, where)):
                at = [int(i) for i in pos[1:]]
                lines, distances = [], []
                feeding = [s for s in quantized_sources(tensor, producers, reference.quant) if s in unobserved]
                for name in [tensor, *feeding]:
                    t = tracer.values.get(name)
                    if t is None or t.shape != ref.shape:
                        continue
                    distances.append(float(tie_distance(t[pos].numpy())))
                    lines.append(
                        f"{name}{at}: reference {captured[name].numpy()[pos]:.0f}, t = {float(t[pos]):.7f} "
                        f"({distances[-1]:.2e} from a tie)"
                    )
                nearest.append(min(distances) if distances else float("nan"))
                if shown < args.show:
                    print(f"image {start + int(pos[0])}: engine {eng[pos]:.0f} at " + "\n    ".join(lines))
            if len(where) > args.show:
                print(f"    ... {len(where)} values in {tensor} in this batch")
    if nearest:
        print(
            f"{len(nearest)} values differ locally in {images.shape[0]} images; the largest of their smallest tie "
            f"distances: {max(nearest):.2e} levels"
        )
    else:
        print(f"no value differs locally in {images.shape[0]} images")
    debug.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
