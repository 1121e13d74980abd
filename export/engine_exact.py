"""Make a model compute what its integer export computes: biases on the int32 grid, no near-ties.

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

Float32 rounding still matters at one place: an integer layer's pre-activation takes the discrete
values N · M (N = accumulator + int32 bias, M = s_x · s_w,c / s_y), and for some channels one of
them lies within ~1e-6 of a rounding boundary k + ½ of the next quantizer. The engine and the
model (which computes the same value with other float32 roundings, up to ~2e-6 levels apart,
measured) then round it to different sides every time the accumulator takes that value — in a
trained ResNet-20 W4A4 one such channel changed 0.2 % of the top-1 predictions. :func:`avoid_ties`
scales that channel's BatchNorm γ by 1 + ε (|ε| ≤ 3e-3; on trained ResNet-20 W4A4 models about a
quarter of the channels moved, by at most 1.5e-3) so that no value N · M comes closer than
:data:`TIE_MARGIN` to a boundary. Channels with M < 4 · TIE_MARGIN are left alone: no γ change clears
such a dense set of values, and a given value of it is rarely hit. :func:`make_engine_exact` runs both steps.

TensorRT and OpenVINO add a float bias to the dequantized accumulator instead (no int32 grid): files
written for them (``bias_arithmetic`` "float", :data:`export.formats.FORMATS`) keep the trained biases,
moved only off the near-ties of :class:`_FloatLattice` (:func:`avoid_float_ties`).

Every file: a quantizer that reads a residual sum rounds t = (a·s_a + b·s_b) / s, which engines compute
in other float orders (:class:`_SumLattice`); :func:`avoid_sum_ties` scales such a quantizer's range by
1 + ε until no reachable pair (a, b) lies within that float error of a rounding boundary. That is a real
change of the model: a 4-bit network passes the few activations it moves across a boundary on, and the
moved model agreed with the model as trained on 97.2–97.7 % of the top-1 predictions of the 1-epoch
ResNet-20 W4A4 (2,000 test images, ε steps of 1e-5 down to 1e-7; 96.8 % on 10,000 images with the conv
biases moved too), about what the int32 bias rounding costs. ``fatq-export --as-trained``
keeps the model bit for bit instead, and the engines then agree with it except where a residual-sum pair
at risk is hit (counted in the export report, ``residual_near_ties``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from export.deploy_graph import DeployGraph, tensor_quant
from fatq.errors import FatqError

INTEGER_LAYERS = ("qconv", "qlinear")
# distance (in output levels) every value N·M must keep from a rounding boundary: 2.5x the largest
# model-vs-engine difference measured on a trained ResNet-20 W4A4 (2e-6 levels)
TIE_MARGIN = 5e-6
# relative γ changes tried, smallest first; a change moves a value t by about t·ε
_EPSILONS = np.array([sign * step * 1e-5 for step in range(1, 301) for sign in (1, -1)])
_MAX_ROUNDS = 8


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
        "max_shift_levels": worst over the layers with a quantized output, "channels": C,
        "unmoved": [layers without a bias parameter to move (BatchNorm without affine)]}``.

    Raises:
        FatqError: when the graph does not come from ``model``.
    """
    if graph.dialect != "integer":
        raise FatqError("bias projection needs the integer (lowered) graph.")
    modules = dict(model.named_modules())
    shifts: dict[str, np.ndarray] = {}
    report: dict = {"layers": {}, "max_shift_levels": 0.0, "channels": 0, "unmoved": []}
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
            if not isinstance(bias, torch.Tensor):  # e.g. BatchNorm(affine=False): left as trained
                report["unmoved"].append(path)
                continue
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


class _Lattice:
    """The values N · M an integer layer's pre-activation can take, per output channel.

    N = accumulator + int32 bias lies in [bias − A, bias + A] with A = Σ|w| · max|q_x| (a
    channel whose weights are all 0 has the single value bias · M); M is the requantization
    multiplier as ONNX Runtime computes it (:func:`export.reference.requant_multiplier`).
    """

    def __init__(self, node, input_quant: dict):
        from export.reference import requant_multiplier

        out_quant = node.attrs["out_quant"]
        weight = np.abs(node.params["weight"].astype(np.int64)).reshape(node.params["weight"].shape[0], -1)
        reach = weight.sum(axis=1) * max(abs(input_quant["qmin"]), abs(input_quant["qmax"]))
        bias = node.params["bias_int32"].astype(np.int64)
        self.low, self.high = (bias - reach).astype(np.float64), (bias + reach).astype(np.float64)
        self.multiplier = requant_multiplier(node.attrs["input_scale"], node.params["weight_scale"], out_quant["scale"])
        # rounding boundaries k + ½ inside the output range (beyond it both sides clamp alike)
        self.boundaries = np.arange(out_quant["qmin"], out_quant["qmax"], dtype=np.float64) + 0.5

    def clear(self, channel: int | slice = slice(None), scale: np.ndarray | float = 1.0, slack: float = 0.0):
        """Whether every reachable N·M keeps TIE_MARGIN (+ slack·t) from every boundary t.

        ``scale`` multiplies M (candidate γ changes, [J]); returns bool [channels] or [J].
        """
        multiplier = (self.multiplier[channel] * scale).astype(np.float32)[..., None]
        low, high = self.low[channel], self.high[channel]
        if np.ndim(low):
            low, high = low[..., None], high[..., None]
        n = np.clip(np.round(self.boundaries / multiplier.astype(np.float64)), low, high)
        value = (n.astype(np.float32) * multiplier).astype(np.float64)  # the engine's float32 product
        return (np.abs(value - self.boundaries) >= TIE_MARGIN + slack * self.boundaries).all(axis=-1)


def _lattices(graph: DeployGraph) -> dict[str | None, list[_Lattice]]:
    """{BatchNorm path (None: none): lattices of the integer layers it scales} (copies share one)."""
    quant = {n.output: tensor_quant(n.attrs["out_quant"]) for n in graph.nodes if n.attrs.get("out_quant")}
    groups: dict[str | None, list[_Lattice]] = {}
    for node in graph.nodes:
        if node.op in INTEGER_LAYERS and node.attrs["out_quant"] is not None:
            groups.setdefault(node.attrs.get("batchnorm"), []).append(_Lattice(node, quant[node.inputs[0]]))
    return groups


def _tied_channels(lattices: list) -> np.ndarray:
    """Channels with a near-tie, except dense ones (M < 4·TIE_MARGIN: no γ change can clear those;
    their values are as good as continuous, so a given one is rarely hit)."""
    tied = ~np.logical_and.reduce([lattice.clear() for lattice in lattices])
    dense = np.logical_or.reduce([lattice.multiplier < 4 * TIE_MARGIN for lattice in lattices])
    return np.flatnonzero(tied & ~dense)


def _gamma_change(lattices: list[_Lattice], channel: int) -> float | None:
    """The smallest tried ε whose M·(1 + ε) clears every lattice of ``channel``, or None."""
    for start in range(0, _EPSILONS.size, 40):  # most channels clear within the first few tries
        epsilons = _EPSILONS[start : start + 40]
        # slack 3e-7·t: the float32 roundings of the folded scale that this prediction skips
        ok = np.logical_and.reduce([lattice.clear(channel, 1 + epsilons, slack=3e-7) for lattice in lattices])
        if ok.any():
            return float(epsilons[np.argmax(ok)])
    return None


def avoid_ties(model: nn.Module, lower_model, graph: DeployGraph | None = None) -> tuple[DeployGraph, dict]:
    """Scale γ of channels with a near-tie (see the module docstring) until none is left.

    Args:
        model: the model (changed in place).
        lower_model: ``model -> integer DeployGraph`` (fold + lower).
        graph: ``lower_model(model)`` when the caller has it already (it is not lowered again).

    Returns:
        (the graph of the final model, {"channels_moved", "max_gamma_change", "unresolved": [layer]}).
    """
    modules = dict(model.named_modules())
    moved: dict[tuple[str, int], float] = {}
    graph = lower_model(model) if graph is None else graph
    for _ in range(_MAX_ROUNDS):
        changes = []
        for path, lattices in _lattices(graph).items():
            if path is None or not isinstance(getattr(modules[path], "weight", None), torch.Tensor):
                continue  # no BatchNorm γ to scale: left as is, reported below
            for channel in _tied_channels(lattices):
                epsilon = _gamma_change(lattices, int(channel))
                if epsilon is not None:
                    changes.append((path, int(channel), epsilon))
        if not changes:
            break
        with torch.no_grad():
            for path, channel, epsilon in changes:
                modules[path].weight[channel] *= 1 + epsilon
                moved[(path, channel)] = (1 + moved.get((path, channel), 0.0)) * (1 + epsilon) - 1
        graph = lower_model(model)
    unresolved = sorted(str(path) for path, lattices in _lattices(graph).items() if len(_tied_channels(lattices)))
    report = {
        "channels_moved": len(moved),
        "max_gamma_change": max((abs(v) for v in moved.values()), default=0.0),
        "unresolved": unresolved,
    }
    return graph, report


class _FloatLattice:
    """The values y / s_y of an integer layer with a float bias (TensorRT's and OpenVINO's arithmetic).

    y = acc · step + b with acc in [−A, A] (A = Σ|w| · max|q_x|), step = float32(s_x · s_w,c):
    the values n · M + c with M = step / s_y and c = b / s_y, per output channel.
    """

    def __init__(self, node, input_quant: dict):
        out_quant = node.attrs["out_quant"]
        weight = np.abs(node.params["weight"].astype(np.int64)).reshape(node.params["weight"].shape[0], -1)
        reach = (weight.sum(axis=1) * max(abs(input_quant["qmin"]), abs(input_quant["qmax"]))).astype(np.float64)
        self.low, self.high = -reach, reach
        self.scale = float(np.float32(out_quant["scale"]))
        step = np.float32(node.attrs["input_scale"]) * node.params["weight_scale"].astype(np.float32)
        self.multiplier = step.astype(np.float64) / self.scale
        self.offset = node.params["bias"].astype(np.float32).astype(np.float64) / self.scale
        self.boundaries = np.arange(out_quant["qmin"], out_quant["qmax"], dtype=np.float64) + 0.5

    def clear(self, channel: int | slice = slice(None), shift: np.ndarray | float = 0.0) -> np.ndarray:
        """Whether every reachable value (with the bias moved by ``shift`` real units, [J]) keeps
        TIE_MARGIN + 3e-7·t from every boundary t; bool [channels] (all channels) or [J] (one channel)."""
        offset = self.offset[channel] + np.asarray(shift, dtype=np.float64) / self.scale
        multiplier = np.broadcast_to(self.multiplier[channel], np.shape(offset))
        low = np.broadcast_to(self.low[channel], np.shape(offset))
        high = np.broadcast_to(self.high[channel], np.shape(offset))
        offset, multiplier, low, high = (v[..., None] for v in (offset, multiplier, low, high))
        n = np.clip(np.round((self.boundaries - offset) / multiplier), low, high)
        value = n * multiplier + offset
        # 3e-7·t: float32 roundings of acc·step, + b and / s_y that engines order differently
        return (np.abs(value - self.boundaries) >= TIE_MARGIN + 3e-7 * self.boundaries).all(axis=-1)


def _float_lattices(graph: DeployGraph) -> dict[str, list[_FloatLattice]]:
    """{bias owner path: float-bias lattices of the integer layers whose bias it sets} (copies share one)."""
    quant = {n.output: tensor_quant(n.attrs["out_quant"]) for n in graph.nodes if n.attrs.get("out_quant")}
    groups: dict[str, list[_FloatLattice]] = {}
    for node in graph.nodes:
        if node.op in INTEGER_LAYERS and node.attrs["out_quant"] is not None:
            owner = node.attrs.get("batchnorm") or node.attrs["source"]
            groups.setdefault(owner, []).append(_FloatLattice(node, quant[node.inputs[0]]))
    return groups


def _bias_shift(lattices: list[_FloatLattice], channel: int) -> float | None:
    """The smallest tried bias shift (real units) that clears every lattice of ``channel``, or None.

    Shifts are multiples of the finest output step of the group (ε · s_y, |ε| ≤ 3e-3 levels)."""
    unit = min(lattice.scale for lattice in lattices)
    for start in range(0, _EPSILONS.size, 40):
        shifts = _EPSILONS[start : start + 40] * unit
        ok = np.logical_and.reduce([lattice.clear(channel, shifts) for lattice in lattices])
        if ok.any():
            return float(shifts[np.argmax(ok)])
    return None


def avoid_float_ties(model: nn.Module, lower_model, graph: DeployGraph | None = None) -> tuple[DeployGraph, dict]:
    """For float-bias engines: shift the bias of channels with a near-tie until none is left.

    The bias is continuous there (no int32 grid), so the knob is the bias itself: BatchNorm β (or the layer's
    own bias), moved by at most 3e-3 output levels. Dense channels (an 8-bit output with a fine multiplier)
    cannot be cleared and are left, reported as unresolved. Arguments as :func:`avoid_ties`.

    Returns:
        (the graph of the final model, {"channels_moved", "max_shift_levels", "unresolved": [layer]}).
    """
    modules = dict(model.named_modules())
    moved: dict[tuple[str, int], float] = {}
    worst = 0.0
    graph = lower_model(model) if graph is None else graph
    for _ in range(_MAX_ROUNDS):
        changes = []
        for path, lattices in _float_lattices(graph).items():
            if not isinstance(getattr(modules.get(path), "bias", None), torch.Tensor):
                continue  # no bias parameter to move: left as is, reported below
            for channel in _tied_channels(lattices):
                shift = _bias_shift(lattices, int(channel))
                if shift is not None:
                    changes.append((path, int(channel), shift))
                    worst = max(worst, abs(shift) / min(lattice.scale for lattice in lattices))
        if not changes:
            break
        with torch.no_grad():
            for path, channel, shift in changes:
                modules[path].bias[channel] += shift
                moved[(path, channel)] = moved.get((path, channel), 0.0) + shift
        graph = lower_model(model)
    unresolved = sorted(p for p, lattices in _float_lattices(graph).items() if len(_tied_channels(lattices)))
    return graph, {"channels_moved": len(moved), "max_shift_levels": worst, "unresolved": unresolved}


def float_near_ties(graph: DeployGraph) -> dict:
    """Where an engine that orders the float-bias arithmetic differently could round another way.

    Returns:
        {"channels": count of channels with a value (acc · step + b) / s_y within TIE_MARGIN +
        3e-7·t of a boundary t (dense channels excluded, as in :func:`_tied_channels`), "layers":
        [bias owners with such channels]}.
    """
    tied = {path: _tied_channels(lattices) for path, lattices in _float_lattices(graph).items()}
    return {"channels": int(sum(len(c) for c in tied.values())), "layers": sorted(p for p, c in tied.items() if len(c))}


# float error of an engine's residual-sum quantizer, in output levels per unit of (128 + |t| + Σ|terms|/s):
# four half-ulps; 128 covers OpenVINO's int8 FakeQuantize, which computes (x + 128·s) / s (offset by its input_low)
_SUM_ERROR = 2.0**-22


class _SumLattice:
    """The values t = (a·s_a + b·s_b) / s of a quantizer that reads a residual sum of two quantized tensors.

    Every integer pair (a, b) in the two ranges is reachable (at most 255 × 255). A pair is at risk when t
    lies closer than (128 + |t| + (|a·s_a| + |b·s_b|) / s) · 2^-22 to a rounding boundary inside the
    quantizer's range: engines compute t in other float32 orders than PyTorch, and OpenVINO's signed int8
    FakeQuantize adds 128·s before it divides (an error of up to ~(128 + |t|)·2^-24 levels), so such a pair
    may round the other way in some engine. Measured: on a ResNet-20 W4A4 fine-tuned 50 steps, OpenVINO
    rounded 0.0042 % of ``layer2.2.shortcut_quantizer``'s values the other way (99.69 % top-1 agreement).
    """

    def __init__(self, quantizer, inputs: list[dict], through_relu: bool):
        self.name = quantizer.name
        self.quant = quantizer.attrs["out_quant"]
        terms = [np.arange(q["qmin"], q["qmax"] + 1) * float(np.float32(q["scale"])) for q in inputs]
        self.sums = (terms[0][:, None] + terms[1][None, :]).ravel()
        self.magnitude = (np.abs(terms[0])[:, None] + np.abs(terms[1])[None, :]).ravel()
        self.through_relu = through_relu  # negative sums are 0 before the quantizer: exact, never at risk

    def at_risk(self, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pairs at risk, pairs inside the range), each [len(scales)], for candidate scales of the quantizer."""
        scales = np.asarray(scales, dtype=np.float64)[:, None]
        t = self.sums[None, :] / scales
        distance = np.abs(t - (np.floor(t) + 0.5))
        inside = (t > self.quant["qmin"] - 0.5) & (t < self.quant["qmax"] + 0.5)
        if self.through_relu:
            inside &= t > 0
        near = inside & (distance < (128 + np.abs(t) + self.magnitude[None, :] / scales) * _SUM_ERROR)
        return near.sum(axis=1), inside.sum(axis=1)

    def pairs_at_risk(self) -> tuple[int, int]:
        """(pairs at risk, pairs inside the range) at the quantizer's own scale."""
        near, inside = self.at_risk(np.array([float(np.float32(self.quant["scale"]))]))
        return int(near[0]), int(inside[0])

    def scale_change(self) -> float | None:
        """The smallest tried relative change ε of the quantizer's scale that leaves no pair at risk, or None."""
        scale = float(np.float32(self.quant["scale"]))
        for start in range(0, _EPSILONS.size, 20):
            epsilons = _EPSILONS[start : start + 20]
            # the scale as the model will hold it: float32(alpha · (1 + ε)) / levels, rounded like the export
            candidates = (scale * (1 + epsilons)).astype(np.float32).astype(np.float64)
            clear = self.at_risk(candidates)[0] == 0
            if clear.any():
                return float(epsilons[np.argmax(clear)])
        return None


def _sum_lattices(graph: DeployGraph) -> list[_SumLattice]:
    """One :class:`_SumLattice` per quantizer that reads a residual Add of two quantized tensors (directly or
    through ReLU/Clip, which are monotone and exact)."""
    quant = {n.output: n.attrs["out_quant"] for n in graph.nodes if n.attrs.get("out_quant")}
    consumers = graph.consumers()
    lattices = []
    for node in graph.nodes:
        if node.op != "add" or not all(tensor in quant for tensor in node.inputs):
            continue
        readers, through_relu = list(consumers.get(node.output, [])), False
        while len(readers) == 1 and readers[0].op in ("relu", "clip"):
            through_relu = True
            readers = list(consumers.get(readers[0].output, []))
        inputs = [quant[tensor] for tensor in node.inputs]
        lattices += [_SumLattice(r, inputs, through_relu) for r in readers if r.op == "quantize"]
    return lattices


def residual_near_ties(graph: DeployGraph) -> dict:
    """Reachable residual sums within an engine's float error of a rounding boundary (:class:`_SumLattice`).

    Returns:
        {"pairs": pairs at risk (summed over the quantizers), "of": pairs examined, "quantizers":
        {quantizer: pairs at risk}} (only quantizers with some).
    """
    at_risk, examined, quantizers = 0, 0, {}
    for lattice in _sum_lattices(graph):
        near, inside = lattice.pairs_at_risk()
        examined += inside
        if near:
            quantizers[lattice.name] = near
            at_risk += near
    return {"pairs": at_risk, "of": examined, "quantizers": quantizers}


def avoid_sum_ties(model: nn.Module, lower_model, graph: DeployGraph | None = None) -> tuple[DeployGraph, dict]:
    """Scale the learned range α of each residual-sum quantizer with a pair at risk until none has one.

    Like :func:`avoid_ties` for convs, but the knob is the quantizer's own scale (α / levels): a relative change
    ε (|ε| ≤ 3e-3; at most 1.5e-4 and 4.7e-4 on the tests' trained-like ResNet-20 and MobileNetV2 W4A4)
    moves every value t of its lattice by t·ε.
    Changing a shortcut quantizer changes the next sum's lattice, so rounds repeat until none moves.

    Returns:
        (the graph of the final model, {"quantizers_moved", "max_scale_change", "unresolved": [quantizer]}).
    """
    modules = dict(model.named_modules())
    moved: dict[str, float] = {}
    graph = lower_model(model) if graph is None else graph
    for _ in range(_MAX_ROUNDS):
        changes = []
        for lattice in _sum_lattices(graph):
            if not lattice.pairs_at_risk()[0]:
                continue
            alpha = getattr(modules.get(lattice.name), "alpha", None)
            epsilon = lattice.scale_change() if isinstance(alpha, torch.Tensor) else None
            if epsilon is not None:  # else left at risk: reported as unresolved
                changes.append((lattice.name, epsilon))
        if not changes:
            break
        with torch.no_grad():
            for name, epsilon in changes:
                modules[name].alpha.mul_(1 + epsilon)
                moved[name] = (1 + moved.get(name, 0.0)) * (1 + epsilon) - 1
        graph = lower_model(model)
    left = residual_near_ties(graph)["quantizers"]
    report = {
        "quantizers_moved": len(moved),
        "max_scale_change": max((abs(v) for v in moved.values()), default=0.0),
        "unresolved": sorted(left),
    }
    return graph, report


def make_engine_exact(
    model: nn.Module, lower_model, graph: DeployGraph | None = None, arithmetic: str = "int32"
) -> tuple[DeployGraph, dict]:
    """Move ``model`` (in place) onto what the engines of ``arithmetic`` compute.

    Both: :func:`avoid_sum_ties` (residual-sum quantizer scales off the rounding boundaries).
    "int32" (ONNX Runtime): then :func:`avoid_ties` and :func:`project_biases`, verified.
    "float" (TensorRT, OpenVINO): then :func:`avoid_float_ties` (biases off the conv near-ties; these
    engines add the trained bias in float, so no bias moves onto a grid). Without the moves OpenVINO
    computed the model as trained exactly on the 1-epoch ResNet-20 W4A4 but not on others (docs/parity.md);
    ``fatq-export --as-trained`` skips them. What dense channels leave is counted (:func:`float_near_ties`).

    Returns:
        (the final graph, the report, with ``"bias_arithmetic"``).
    """
    if arithmetic not in ("int32", "float"):
        raise FatqError(f"bias arithmetic must be 'int32' or 'float', got {arithmetic!r}.")
    graph, sums = avoid_sum_ties(model, lower_model, graph)
    if arithmetic == "float":
        graph, ties = avoid_float_ties(model, lower_model, graph)
        return graph, {"bias_arithmetic": "float", "sum_ties": sums, "ties": ties, "near_ties": float_near_ties(graph)}
    graph, ties = avoid_ties(model, lower_model, graph)
    report = project_biases(model, graph)
    final = lower_model(model)
    verify_projection(graph, final)
    return final, {"bias_arithmetic": "int32", **report, "ties": ties, "sum_ties": sums}
