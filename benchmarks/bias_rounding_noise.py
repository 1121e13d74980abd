"""How much a 4-bit model's predictions move when its biases move by the int32 rounding of an engine.

For one trained checkpoint, on the test split, in PyTorch (eval mode):

- the model as trained;
- the engine-exact model fatq-export writes as ``.reference.pt`` (:mod:`export.engine_exact`:
  biases on the int32 grid, γ off rounding near-ties);
- ``--seeds`` models whose biases are re-rounded *stochastically* onto the same int32 grid (each
  folded bias goes to the grid point below or above it, with the probabilities of stochastic
  rounding): perturbations of the same size as the engine's, in random directions.

Each row gives top-1 accuracy and top-1 agreement with the model as trained. This is what the
README's "Parity" section cites: the accuracy difference between the engine-exact model and the
model as trained is of the size of a random re-rounding, and so is the ~5 % of changed predictions.

Usage::

    python benchmarks/bias_rounding_noise.py --checkpoint runs/r20/best.pt --data-dir ../shared/datasets
"""

from __future__ import annotations

import argparse
import copy
import platform

import numpy as np
import torch
from torch import nn


def _logits(model: nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x) for x in images.split(batch)])


def _stochastic_rounding(model: nn.Module, graph, seed: int) -> nn.Module:
    """A copy of ``model`` whose folded biases are stochastically rounded onto the engine's int32 grid."""
    from export.engine_exact import INTEGER_LAYERS

    rng = np.random.default_rng(seed)
    moved = copy.deepcopy(model)
    modules = dict(moved.named_modules())
    done = set()
    for node in graph.nodes:
        path = node.attrs.get("batchnorm") or node.attrs.get("source")
        if node.op not in INTEGER_LAYERS or path in done:
            continue
        done.add(path)
        step = (np.float32(node.attrs["input_scale"]) * node.params["weight_scale"].astype(np.float32)).astype(float)
        units = node.params["bias"] / step
        low = np.floor(units)
        rounded = np.where(rng.random(units.shape) < units - low, low + 1, low)
        bias = getattr(modules[path], "bias", None)
        if isinstance(bias, torch.Tensor):
            with torch.no_grad():
                bias += torch.from_numpy(rounded * step - node.params["bias"]).to(bias.dtype)
    return moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="trained quantized fatq checkpoint")
    parser.add_argument("--data-dir", required=True, help="dataset directory (its test split)")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from export.engine_exact import make_engine_exact
    from export.pipeline import deploy_graph
    from fatq.checkpoint import load_fatq_checkpoint, model_from_checkpoint
    from fatq.data import load_split, normalize

    data = load_fatq_checkpoint(args.checkpoint)
    trained = model_from_checkpoint(data).eval()
    input_size = list(data["input_size"])
    split = load_split(args.data_dir, "test")
    images = normalize(split.images, data["normalization"]["mean"], data["normalization"]["std"])
    labels = split.labels

    def lower_model(model):
        return deploy_graph(model, input_size)

    graph = lower_model(trained)
    exact = copy.deepcopy(trained)
    make_engine_exact(exact, lower_model)
    base = _logits(trained, images).argmax(1)
    rows = [("as trained", trained), ("engine-exact (.reference.pt)", exact)]
    rows += [
        (f"stochastic re-rounding, seed {seed}", _stochastic_rounding(trained, graph, seed))
        for seed in range(args.seeds)
    ]
    machine = platform.processor() or platform.machine()
    print(f"{args.checkpoint}: {len(labels)} test images; torch {torch.__version__}, {machine}")
    print("| model | top-1 % | top-1 agreement with the model as trained % |")
    print("|---|---:|---:|")
    for name, model in rows:
        predicted = _logits(model, images).argmax(1)
        accuracy = 100.0 * float((predicted == labels).float().mean())
        agreement = 100.0 * float((predicted == base).float().mean())
        print(f"| {name} | {accuracy:.2f} | {agreement:.2f} |", flush=True)


if __name__ == "__main__":
    main()
