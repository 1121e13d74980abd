"""Put a model's folded biases on the int32 grid an integer engine adds them on.

An integer engine adds a quantized layer's folded bias (BatchNorm β − μ·γ/σ, plus any conv bias)
to the int32 accumulator as round(bias / (s_x · s_w,c)): the bias it computes with differs from
the model's by up to half an accumulator step. After :func:`export.lower.lower` widens the
integer grids that is at most ~0.15 % of an output level, yet a 4-bit network is chaotic enough
that it changed the top-1 prediction on ~5 % of CIFAR-10 test images for a trained ResNet-20
W4A4 (README, Export): the engine then computes a slightly different model, not the one that
was trained.

:func:`project_biases` moves each bias of the PyTorch model onto exactly the value the engine
adds — BatchNorm β where a BatchNorm was folded into the layer, the layer's own bias otherwise —
so the model and the engine compute the same function up to float32 rounding. The integers
(weights, int32 biases, scales) of the lowered graph are unchanged by construction, and this
is verified by lowering the moved model again.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from export.deploy_graph import DeployGraph
from fatq.errors import FatqError

INTEGER_LAYERS = ("qconv", "qlinear")


def engine_bias(params: dict, input_scale: float) -> np.ndarray:
    """The bias an engine adds, in real units: bias_int32 · float32(s_x · s_w,c), float64 [C_out]."""
    step = np.float32(input_scale) * params["weight_scale"].astype(np.float32)
    return params["bias_int32"].astype(np.float64) * step.astype(np.float64)


def _bias_owner(node, modules: dict[str, nn.Module]) -> tuple[str, nn.Module]:
    """The module whose bias parameter carries ``node``'s folded bias."""
    path = node.attrs.get("batchnorm") or node.attrs["source"]
    module = modules.get(path)
    if module is None:
        raise FatqError(f"{node.name}: the model has no module {path!r}; was the graph lowered from this model?")
    return path, module


def project_biases(model: nn.Module, graph: DeployGraph) -> dict:
    """Move ``model``'s biases (in place) onto the engine's int32 grid of ``graph``.

    Args:
        model: the model ``graph`` was folded and lowered from (eval mode, CPU).
        graph: its integer-dialect graph (:func:`export.lower.lower`).

    Returns:
        ``{"layers": {module path: max |shift| in output levels (logits: in logit units)},
        "max_shift_levels": worst over the layers with a quantized output, "channels": C}``.

    Raises:
        FatqError: when the graph does not come from ``model`` or a bias is not a parameter.
    """
    if graph.dialect != "integer":
        raise FatqError("bias projection needs the integer (lowered) graph.")
    modules = dict(model.named_modules())
    shifts: dict[str, np.ndarray] = {}
    report: dict = {"layers": {}, "max_shift_levels": 0.0, "channels": 0}
    for node in graph.nodes:
        if node.op not in INTEGER_LAYERS:
            continue
        path, module = _bias_owner(node, modules)
        shift = engine_bias(node.params, node.attrs["input_scale"]) - node.params["bias"]
        if not shift.any():
            continue  # already on the grid (e.g. a layer without bias: 0 stays 0)
        if path in shifts:  # a conv duplicated for two quantizers: the same bias, the same shift
            if not np.allclose(shifts[path], shift, rtol=0, atol=1e-12):
                raise FatqError(f"{path}: its copies in the graph round the bias differently.")
            continue
        shifts[path] = shift
        out_quant = node.attrs["out_quant"]
        unit = out_quant["scale"] if out_quant else 1.0
        worst = float(np.abs(shift).max(initial=0.0)) / unit
        report["layers"][path] = worst
        report["channels"] += shift.size
        if out_quant:
            report["max_shift_levels"] = max(report["max_shift_levels"], worst)
    with torch.no_grad():
        for path, shift in shifts.items():
            bias = getattr(modules[path], "bias", None)
            if not isinstance(bias, torch.Tensor):
                raise FatqError(f"{path} has no bias parameter to move onto the engine grid.")
            bias.add_(torch.from_numpy(shift).to(bias.dtype))
    return report


def verify_projection(before: DeployGraph, after: DeployGraph) -> None:
    """Raise unless two lowerings hold the same integers (weights, int32 biases) and scales."""
    pairs = [(a, b) for a, b in zip(before.nodes, after.nodes, strict=True) if a.op in INTEGER_LAYERS]
    for a, b in pairs:
        for key in ("weight", "bias_int32", "weight_scale"):
            if not np.array_equal(a.params[key], b.params[key]):
                raise FatqError(f"{a.name}: moving the bias onto the engine grid changed its {key}.")
        if a.attrs["input_scale"] != b.attrs["input_scale"]:
            raise FatqError(f"{a.name}: moving the bias onto the engine grid changed its input scale.")
