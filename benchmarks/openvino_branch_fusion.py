"""Why each residual branch quantizer has a Relu ahead of it in OpenVINO: without it, the fused conv drops its rounding.

For a ``--target cpu`` model's ``onnx-openvino`` file (written by ``fatq-export``, with its ``.deploy.npz``), whose
branch quantizers are ``Conv(shifted bias) → Relu → FakeQuantize → Add`` (:mod:`export.openvino_writer`), runs the
file as written and a copy whose branch Relus are bypassed: the same function in real arithmetic (the FakeQuantize
clamps what the Relu would), but the branch FakeQuantize is then the conv's first post-op ahead of a sum and
another FakeQuantize, which OpenVINO's CPU plugin appends without rounding. Prints each file's top-1 agreement
with the deploy reference, and with the same reference without the branches' rounding, on the first
``--images`` test images (the seeded subset ``fatq-export --check`` uses).

    fatq-export cpu-w4/last.pt --format onnx-openvino -o cpu.ov.onnx
    python benchmarks/openvino_branch_fusion.py cpu-w4/last.pt cpu.ov.onnx --data-dir ../shared/datasets
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import onnx
import torch

from engines.deploy_check import check_images
from engines.openvino_runner import openvino_core
from export.deploy_graph import DeployGraph
from export.formats import DEPLOY_GRAPH, companion_path
from export.reference import DeployReference
from fatq.checkpoint import load_fatq_checkpoint


def without_branch_relus(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which each branch quantizer's Relu (``<conv>/branch/Relu``) is bypassed (its reader reads the conv)."""
    copied = copy.deepcopy(model)
    relus = {n.output[0]: n.input[0] for n in copied.graph.node if n.op_type == "Relu" and "/branch/" in n.name}
    for node in copied.graph.node:
        node.input[:] = [relus.get(name, name) for name in node.input]
    kept = [n for n in copied.graph.node if not (n.op_type == "Relu" and n.output[0] in relus)]
    del copied.graph.node[:]
    copied.graph.node.extend(kept)
    return copied


def openvino_logits(model: onnx.ModelProto, images: torch.Tensor) -> np.ndarray:
    core = openvino_core()
    read = core.read_model(model.SerializeToString(), b"")
    read.reshape([len(images), *images.shape[1:]])
    compiled = core.compile_model(read, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled({0: images.numpy()})[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("onnx_file")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--images", type=int, default=512)
    args = parser.parse_args()
    graph = DeployGraph.load(companion_path(args.onnx_file, DEPLOY_GRAPH))
    images, _, _ = check_images(load_fatq_checkpoint(args.checkpoint), args.data_dir, args.images, graph.input_shape)
    branch_convs = [
        n for n in graph.nodes if n.op == "qconv" and (n.attrs.get("quantizer") or "").endswith("branch_quantizer")
    ]
    unrounded = copy.deepcopy(graph)
    for node in unrounded.nodes:
        if node.name in {n.name for n in branch_convs}:
            node.attrs["out_quant"] = None
    with torch.no_grad():
        references = {"deploy reference": DeployReference(graph)(images).numpy(),
                      "without branch rounding": DeployReference(unrounded)(images).numpy()}  # fmt: skip
    written = onnx.load(args.onnx_file)
    files = {"as written": written, "branch Relus bypassed": without_branch_relus(written)}
    print(f"{len(images)} test images, {len(branch_convs)} branch quantizers; top-1 agreement:")
    for label, model in files.items():
        predictions = openvino_logits(model, images).argmax(1)
        cells = ", ".join(
            f"{name} {100 * float((predictions == ref.argmax(1)).mean()):.2f} %" for name, ref in references.items()
        )
        print(f"  {label:22s}: {cells}")


if __name__ == "__main__":
    main()
