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
:data:`export.tie_lattices.TIE_MARGIN` to a boundary. Channels with M < 4 · TIE_MARGIN are not cleared:
no γ change clears such a dense set of values, and a given value of it is rarely hit; where such a lattice
shares its knob with a sparse one, the sparse one is cleared alone. :func:`make_engine_exact` runs the steps.

TensorRT and OpenVINO add a float bias to the dequantized accumulator instead (no int32 grid): files
written for them (``bias_arithmetic`` "float", :data:`export.formats.FORMATS`) keep the trained biases,
moved only off the near-ties of :class:`export.tie_lattices.FloatLattice` (:func:`avoid_float_ties`).

Every file: a quantizer that reads a residual sum rounds t = (a·s_a + b·s_b) / s, which engines compute
in other float orders (:class:`export.tie_lattices.SumLattice`); :func:`avoid_sum_ties` moves the sum's
branch term (or the readers' ranges) until no reachable pair (a, b) lies within that float error of a
rounding boundary.

Each move is a real change of the model: a 4-bit network passes on every activation a move carries across
a boundary (one range moved by 1e-5 changed 0.50 % of a ResNet-20 W4A4's top-1 predictions,
``benchmarks/move_cost.py``), so every
knob takes the clearing move that crosses the fewest reachable values (:func:`export.tie_lattices.best_move`).
With calibration visits (:mod:`export.lattice_visits`), only near-ties that calibration images reach must
clear, and crossing a reached value costs most. On the 1-epoch ResNet-20 W4A4 the moved model of the
float-bias file agreed with the model as trained on 99.68–99.72 % of the top-1 predictions with visits and
97.81 % without (10,000 test images): near-ties are up to ~4e-5 levels wide (OpenVINO's 128·s offset), and
the stem's densely reached accumulators leave some moves no way around a reached value.
``fatq-export --as-trained`` keeps the model bit for bit instead, and the engines then agree with it except
where a value at risk is hit (counted in the export report, ``residual_near_ties``).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from export.deploy_graph import INTEGER_PRESERVING_OPS, DeployGraph, DeployNode, tensor_quant
from export.lattice_visits import VISIT_WEIGHT, LatticeVisits
from export.tie_lattices import FloatLattice, Int32Lattice, SumLattice, best_move, tied_channels
from fatq.errors import FatqError

INTEGER_LAYERS = ("qconv", "qlinear")
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


def _accumulator_visits(visits: LatticeVisits | None, node) -> list | None:
    return None if visits is None else visits.accumulators.get(node.name)


def crossing_report(cost: float) -> dict:
    """{"values": reachable lattice values the moves carried across a boundary, "visits": how often the
    calibration images reached them} from a summed crossing cost (:data:`VISIT_WEIGHT` per visit)."""
    visits, values = divmod(int(cost), int(VISIT_WEIGHT))
    return {"values": values, "visits": visits}


def _lattices(graph: DeployGraph, visits: LatticeVisits | None = None) -> dict[str | None, list[Int32Lattice]]:
    """{BatchNorm path (None: none): lattices of the integer layers it scales} (copies share one)."""
    quant = {n.output: tensor_quant(n.attrs["out_quant"]) for n in graph.nodes if n.attrs.get("out_quant")}
    groups: dict[str | None, list[Int32Lattice]] = {}
    for node in graph.nodes:
        if node.op in INTEGER_LAYERS and node.attrs["out_quant"] is not None:
            lattice = Int32Lattice(node, quant[node.inputs[0]], _accumulator_visits(visits, node))
            groups.setdefault(node.attrs.get("batchnorm"), []).append(lattice)
    return groups


def _channel_move(lattices: list, channel: int, clear, crossings) -> tuple[float, float] | None:
    """:func:`best_move` for one channel of a group: every lattice not dense there must clear; the crossings
    of all of them (dense ones too) count. ``clear(lattice, moves)`` / ``crossings(lattice, moves)`` -> [J]."""
    sparse = [lattice for lattice in lattices if not lattice.dense[channel]]

    def score(moves: np.ndarray):
        ok = np.logical_and.reduce([clear(lattice, moves) for lattice in sparse])
        return ok, np.sum([crossings(lattice, moves) for lattice in lattices], axis=0)

    return best_move(score)


def _gamma_change(lattices: list[Int32Lattice], channel: int) -> tuple[float, float] | None:
    """(ε, crossing cost): the ε whose M·(1 + ε) clears every lattice of ``channel`` crossing least, or None."""
    return _channel_move(
        lattices,
        channel,
        # slack 3e-7·t: the float32 roundings of the folded scale that this prediction skips
        lambda lattice, moves: lattice.clear(channel, moves, slack=3e-7),
        lambda lattice, moves: lattice.crossings(channel, moves),
    )


def _move_channels(model: nn.Module, lower_model, graph: DeployGraph, groups, knob: str, choose, apply) -> tuple:
    """Rounds of per-channel moves until no tied channel can be moved (shared by both conv steps).

    Args:
        model, lower_model, graph: as :func:`avoid_ties` (``graph`` already lowered).
        groups: ``graph -> {knob owner path: lattices}``.
        knob: the parameter the owner must have to be moved ("weight" or "bias").
        choose: ``(lattices, channel, owner module) -> (move, crossing cost) | None``.
        apply: ``(owner module, channel, move, total so far or None) -> new total`` (changes the module).

    Returns:
        (final graph, {(path, channel): total move}, crossing report, unresolved owner paths).
    """
    modules = dict(model.named_modules())
    moved: dict[tuple[str, int], object] = {}
    hopeless: set[tuple[str, int]] = set()
    cost = 0.0
    for _ in range(_MAX_ROUNDS):
        changes = []
        for path, lattices in groups(graph).items():
            if path is None or not isinstance(getattr(modules.get(path), knob, None), torch.Tensor):
                continue  # nothing to move: left as is, reported as unresolved
            for channel in map(int, tied_channels(lattices)):
                best = None if (path, channel) in hopeless else choose(lattices, channel, modules[path])
                if best is None:  # no move clears it; later rounds do not change that
                    hopeless.add((path, channel))
                else:
                    changes.append((path, channel, best[0]))
                    cost += best[1]
        if not changes:
            break
        with torch.no_grad():
            for path, channel, move in changes:
                moved[(path, channel)] = apply(modules[path], channel, move, moved.get((path, channel)))
        graph = lower_model(model)
    unresolved = sorted(str(path) for path, lattices in groups(graph).items() if len(tied_channels(lattices)))
    return graph, moved, crossing_report(cost), unresolved


def avoid_ties(
    model: nn.Module, lower_model, graph: DeployGraph | None = None, visits: LatticeVisits | None = None
) -> tuple[DeployGraph, dict]:
    """Scale γ of channels with a near-tie (see the module docstring) until none is left.

    Args:
        model: the model (changed in place).
        lower_model: ``model -> integer DeployGraph`` (fold + lower).
        graph: ``lower_model(model)`` when the caller has it already (it is not lowered again).
        visits: calibration visits of the lattice values (moves then avoid crossing visited ones), or None.

    Returns:
        (the graph of the final model, {"channels_moved", "max_gamma_change", "crossed", "unresolved": [layer]}).
    """

    def scale_gamma(norm, channel: int, epsilon: float, total: float | None) -> float:
        norm.weight[channel] *= 1 + epsilon
        return (1 + (total or 0.0)) * (1 + epsilon) - 1

    graph = lower_model(model) if graph is None else graph
    graph, moved, crossed, unresolved = _move_channels(
        model,
        lower_model,
        graph,
        lambda g: _lattices(g, visits),
        "weight",
        lambda lattices, channel, _: _gamma_change(lattices, channel),
        scale_gamma,
    )
    report = {
        "channels_moved": len(moved),
        "max_gamma_change": max((abs(v) for v in moved.values()), default=0.0),
        "crossed": crossed,
        "unresolved": unresolved,
    }
    return graph, report


def _float_lattices(graph: DeployGraph, visits: LatticeVisits | None = None) -> dict[str, list[FloatLattice]]:
    """{bias owner path: float-bias lattices of the integer layers whose bias it sets} (copies share one)."""
    quant = {n.output: tensor_quant(n.attrs["out_quant"]) for n in graph.nodes if n.attrs.get("out_quant")}
    groups: dict[str, list[FloatLattice]] = {}
    for node in graph.nodes:
        if node.op in INTEGER_LAYERS and node.attrs["out_quant"] is not None:
            owner = node.attrs.get("batchnorm") or node.attrs["source"]
            lattice = FloatLattice(node, quant[node.inputs[0]], _accumulator_visits(visits, node))
            groups.setdefault(owner, []).append(lattice)
    return groups


def _bias_shift(lattices: list[FloatLattice], channel: int) -> tuple[float, float] | None:
    """(shift in real units, crossing cost): the bias shift that clears every lattice of ``channel`` crossing
    least, or None. Shifts are :data:`MOVES` times the finest output step of the group (<= 3e-3 levels of it)."""
    unit = min(lattice.scale for lattice in lattices)
    best = _channel_move(
        lattices,
        channel,
        lambda lattice, moves: lattice.clear(channel, moves * unit),
        lambda lattice, moves: lattice.crossings(channel, moves * unit),
    )
    return None if best is None else (best[0] * unit, best[1])


def avoid_float_ties(
    model: nn.Module, lower_model, graph: DeployGraph | None = None, visits: LatticeVisits | None = None
) -> tuple[DeployGraph, dict]:
    """For float-bias engines: shift the bias of channels with a near-tie until none is left.

    The bias is continuous there (no int32 grid), so the knob is the bias itself: BatchNorm β (or the layer's
    own bias), moved by at most 3e-3 output levels. Dense channels (an 8-bit output with a fine multiplier)
    cannot be cleared and are left, reported as unresolved. Arguments as :func:`avoid_ties`.

    Returns:
        (the graph of the final model, {"channels_moved", "max_shift_levels", "crossed", "unresolved": [layer]}).
    """

    def shift_bias(owner, channel: int, shift: float, total: float | None) -> float:
        owner.bias[channel] += shift
        return (total or 0.0) + shift

    graph = lower_model(model) if graph is None else graph
    units = {path: min(lat.scale for lat in lattices) for path, lattices in _float_lattices(graph).items()}
    graph, moved, crossed, unresolved = _move_channels(
        model,
        lower_model,
        graph,
        lambda g: _float_lattices(g, visits),
        "bias",
        lambda lattices, channel, _: _bias_shift(lattices, channel),
        shift_bias,
    )
    worst = max((abs(shift) / units[path] for (path, _), shift in moved.items()), default=0.0)
    report = {"channels_moved": len(moved), "max_shift_levels": worst, "crossed": crossed, "unresolved": unresolved}
    return graph, report


def float_near_ties(graph: DeployGraph) -> dict:
    """Where an engine that orders the float-bias arithmetic differently could round another way.

    Returns:
        {"channels": count of channels with a value (acc · step + b) / s_y within TIE_MARGIN +
        3e-7·t of a boundary t (dense channels excluded, as in :func:`_tied_channels`), "layers":
        [bias owners with such channels]}.
    """
    tied = {path: tied_channels(lattices) for path, lattices in _float_lattices(graph).items()}
    return {"channels": int(sum(len(c) for c in tied.values())), "layers": sorted(p for p, c in tied.items() if len(c))}


def _sum_groups(graph: DeployGraph, visits: LatticeVisits | None = None) -> list[tuple[DeployNode, list[SumLattice]]]:
    """(residual Add of two quantized tensors, a :class:`SumLattice` per quantizer that reads it) for every
    such Add. A quantizer reads it directly or through ReLU/Clip (monotone and exact) and ops that only move
    or pick values (an option-A shortcut's subsample-and-pad, max-pooling: :data:`INTEGER_PRESERVING_OPS`)."""
    quant = {n.output: n.attrs["out_quant"] for n in graph.nodes if n.attrs.get("out_quant")}
    consumers = graph.consumers()
    groups = []
    for node in graph.nodes:
        if node.op != "add" or not all(tensor in quant for tensor in node.inputs):
            continue
        inputs = [quant[tensor] for tensor in node.inputs]
        lattices, pending = [], [(reader, False) for reader in consumers.get(node.output, [])]
        while pending:
            reader, through_relu = pending.pop()
            if reader.op == "quantize":
                pairs = None if visits is None else visits.pairs.get(node.name)
                lattices.append(SumLattice(reader, inputs, through_relu, pairs))
            elif reader.op in ("relu", "clip", *INTEGER_PRESERVING_OPS):
                through = through_relu or reader.op in ("relu", "clip")
                pending += [(later, through) for later in consumers.get(reader.output, [])]
        if lattices:
            groups.append((node, lattices))
    return groups


def _sum_lattices(graph: DeployGraph) -> list[SumLattice]:
    """Every :class:`SumLattice` of ``graph`` (:func:`_sum_groups`)."""
    return [lattice for _, lattices in _sum_groups(graph) for lattice in lattices]


def _term_knob(graph: DeployGraph, add: DeployNode, modules: dict) -> tuple[int, str, str] | None:
    """(input index, quantizer path, BatchNorm path) of an input of ``add`` whose scale can move alone, or None.

    That is an input written only for this Add by an integer layer whose BatchNorm no other layer uses:
    its quantizer's range and the BatchNorm's γ and β scale together by 1 + ε, so its integers stay and
    only the Add sees the term (1 + ε) times larger.
    """
    producers, consumers = graph.producers(), graph.consumers()
    norm_users: dict[str, int] = {}
    for node in graph.nodes:
        if node.op in INTEGER_LAYERS and node.attrs.get("batchnorm"):
            norm_users[node.attrs["batchnorm"]] = norm_users.get(node.attrs["batchnorm"], 0) + 1
    for index, tensor in enumerate(add.inputs):
        node = producers.get(tensor)
        if node is None or node.op not in INTEGER_LAYERS or len(consumers.get(tensor, [])) != 1:
            continue
        path = node.attrs.get("batchnorm")
        norm, quantizer = modules.get(path), modules.get(tensor)
        tensors = (getattr(norm, "weight", None), getattr(norm, "bias", None), getattr(quantizer, "alpha", None))
        if norm_users.get(path) == 1 and all(isinstance(t, torch.Tensor) for t in tensors):
            return index, tensor, path
    return None


def residual_near_ties(graph: DeployGraph) -> dict:
    """Reachable residual sums within an engine's float error of a rounding boundary (:class:`SumLattice`).

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


def _compensate_readers(graph: DeployGraph, modules: dict, tensor: str, epsilon: float, done: set) -> list[str]:
    """Undo a (1 + ε) scale of ``tensor`` in the integer layers that read it (through value-moving ops).

    Such a layer sees its input (1 + ε) times larger; with BatchNorm γ / (1 + ε), running mean and conv
    bias · (1 + ε) its output is the same in exact arithmetic (the requantization multiplier
    s_x · s_w,c / s_y and the folded bias do not change), so the range move changes nothing downstream of
    this layer. ``done`` holds the BatchNorms already compensated (a conv duplicated for two quantizers
    shares one). Returns the layers that read ``tensor`` and have no BatchNorm to compensate with.
    """
    consumers, left = graph.consumers(), []
    readers = list(consumers.get(tensor, []))
    while readers:
        node = readers.pop()
        if node.op in INTEGER_PRESERVING_OPS:
            readers += consumers.get(node.output, [])
            continue
        if node.op not in INTEGER_LAYERS:
            continue
        path = node.attrs.get("batchnorm")
        norm = modules.get(path)
        if not isinstance(getattr(norm, "weight", None), torch.Tensor) or norm.running_mean is None:
            left.append(node.attrs["source"])
            continue
        if path in done:
            continue
        done.add(path)
        norm.weight.div_(1 + epsilon)
        norm.running_mean.mul_(1 + epsilon)
        conv_bias = getattr(modules.get(node.attrs["source"]), "bias", None)
        if isinstance(conv_bias, torch.Tensor):
            conv_bias.mul_(1 + epsilon)
    return left


def _joint_score(parts: list[tuple[SumLattice, int | None, bool]]):
    """A :func:`best_move` score over several lattices moved by one knob: (lattice, which term the knob is
    in it (None: its own range), whether it must clear); crossing costs add up."""

    def score(moves: np.ndarray):
        scores = [(lattice.score(term, moves), required) for lattice, term, required in parts]
        clear = np.logical_and.reduce([ok if required else np.ones_like(ok) for (ok, _), required in scores])
        return clear, np.sum([cost for (_, cost), _ in scores], axis=0)

    return score


def _sum_move(
    graph: DeployGraph, add: DeployNode, lattices: list[SumLattice], modules: dict, groups: list, partial: bool = True
) -> list:
    """The moves that clear the pairs at risk of one Add's readers: [(kind, path, ε, crossing cost, detail)]
    (detail: the term knob and the Add's name, or the reader's lattice).

    Knobs: the Add's branch term (:func:`_term_knob`, kind "term"), which moves every reader's pairs, and each
    reader's own range (kind "range"), which moves its pairs alone but is a term of every later Add that reads
    the quantizer (``groups``: :func:`_sum_groups`), so what it crosses there counts too. The way that crosses
    least wins: every reader by its range, or the term for some readers (the others' crossings counted, their
    ranges estimated now and moved in the next round; ``partial`` False allows the term only for all readers,
    so that two readers cannot take turns moving it). Readers that no way clears are left at risk (reported).
    """
    needing = [lattice for lattice in lattices if not lattice.clear_as_is()]
    ranges = {}
    for lattice in needing:
        if isinstance(getattr(modules.get(lattice.name), "alpha", None), torch.Tensor):
            later = [
                (reader, other.inputs.index(lattice.output), False)
                for other, readers in groups
                if lattice.output in other.inputs
                for reader in readers
            ]
            best = best_move(_joint_score([(lattice, None, True), *later]))
            if best is not None:
                ranges[lattice.name] = ("range", lattice.name, *best, lattice)
    options = []  # (total crossing cost, moves now)
    if len(ranges) == len(needing):
        options.append((sum(move[3] for move in ranges.values()), list(ranges.values())))
    knob = _term_knob(graph, add, modules)
    if partial:  # the term for any non-empty set of the readers that need a move
        subsets = [list(c) for n in range(1, len(needing) + 1) for c in itertools.combinations(needing, n)]
    else:  # the term keeps every reader clear
        subsets = [lattices]
    for required in subsets if knob is not None else ():
        rest = [lattice for lattice in needing if lattice not in required]
        if any(lattice.name not in ranges for lattice in rest):
            continue
        best = best_move(_joint_score([(lattice, knob[0], lattice in required) for lattice in lattices]))
        if best is not None:
            total = best[1] + sum(ranges[lattice.name][3] for lattice in rest)
            options.append((total, [("term", knob[1], *best, (*knob, add.name))]))
    if not options:
        return list(ranges.values())  # clears what it can
    return min(options, key=lambda option: option[0])[1]


def avoid_sum_ties(
    model: nn.Module, lower_model, graph: DeployGraph | None = None, visits: LatticeVisits | None = None
) -> tuple[DeployGraph, dict]:
    """Move residual sums off the rounding boundaries of the quantizers that read them, changing as little as can be.

    Like :func:`avoid_ties` for convs, with one knob per Add (:func:`_sum_move`): the scale of its branch
    term (the quantizer's range with the BatchNorm γ and β of the layer that writes it, so that layer's
    integers stay), or else each reader's own range (with the integer layers that read it compensated,
    :func:`_compensate_readers`). Either way only the readers' own roundings change, and the move chosen
    crosses the fewest reachable pairs (a move crosses about a fraction |move| of a dense activation
    distribution, and a 4-bit network passes each crossing on). Rounds repeat until nothing moves.
    Arguments as :func:`avoid_ties`.

    Returns:
        (the graph of the final model, {"moves": {quantizer: relative scale change}, "max_scale_change",
        "crossed", "uncompensated": [layer], "unresolved": [quantizer]}).
    """
    modules = dict(model.named_modules())
    moved: dict[str, float] = {}
    crossed, uncompensated, term_moved = 0, set(), set()
    graph = lower_model(model) if graph is None else graph
    for _ in range(_MAX_ROUNDS):
        groups = _sum_groups(graph, visits)
        changes = [
            move
            for add, lattices in groups
            if not all(lattice.clear_as_is() for lattice in lattices)
            for move in _sum_move(graph, add, lattices, modules, groups, add.name not in term_moved)
        ]
        if not changes:
            break
        compensated: set[str] = set()
        with torch.no_grad():
            for kind, path, epsilon, crossings, detail in changes:
                modules[path].alpha.mul_(1 + epsilon)
                term_moved.update([detail[3]] if kind == "term" else [])
                crossed += crossings
                if kind == "term":  # the layer that writes the term scales with it: its integers stay
                    norm = modules[detail[2]]
                    norm.weight.mul_(1 + epsilon)
                    norm.bias.mul_(1 + epsilon)
                else:
                    uncompensated.update(_compensate_readers(graph, modules, detail.output, epsilon, compensated))
                moved[path] = (1 + moved.get(path, 0.0)) * (1 + epsilon) - 1
        graph = lower_model(model)
    left = residual_near_ties(graph)["quantizers"]
    report = {
        "moves": moved,
        "max_scale_change": max((abs(v) for v in moved.values()), default=0.0),
        "crossed": crossing_report(crossed),
        "uncompensated": sorted(uncompensated),
        "unresolved": sorted(left),
    }
    return graph, report


def make_engine_exact(
    model: nn.Module,
    lower_model,
    graph: DeployGraph | None = None,
    arithmetic: str = "int32",
    visits: LatticeVisits | None = None,
) -> tuple[DeployGraph, dict]:
    """Move ``model`` (in place) onto what the engines of ``arithmetic`` compute.

    Both: :func:`avoid_sum_ties` (residual sums off the rounding boundaries).
    "int32" (ONNX Runtime): then :func:`avoid_ties` and :func:`project_biases`, verified.
    "float" (TensorRT, OpenVINO): then :func:`avoid_float_ties` (biases off the conv near-ties; these
    engines add the trained bias in float, so no bias moves onto a grid). Without the moves OpenVINO
    computed the model as trained exactly on the 1-epoch ResNet-20 W4A4 but not on others (docs/parity.md);
    ``fatq-export --as-trained`` skips them. What dense channels leave is counted (:func:`float_near_ties`).
    With ``visits`` (:meth:`LatticeVisits.measure` on calibration images), every move avoids crossing the
    values those images reach.

    Returns:
        (the final graph, the report, with ``"bias_arithmetic"`` and ``"calibration_visits"`` (images counted)).
    """
    if arithmetic not in ("int32", "float"):
        raise FatqError(f"bias arithmetic must be 'int32' or 'float', got {arithmetic!r}.")
    counted = {"calibration_visits": 0 if visits is None else visits.images}
    graph, sums = avoid_sum_ties(model, lower_model, graph, visits)
    if arithmetic == "float":
        graph, ties = avoid_float_ties(model, lower_model, graph, visits)
        near = float_near_ties(graph)
        return graph, {"bias_arithmetic": "float", **counted, "sum_ties": sums, "ties": ties, "near_ties": near}
    graph, ties = avoid_ties(model, lower_model, graph, visits)
    report = project_biases(model, graph)
    final = lower_model(model)
    verify_projection(graph, final)
    return final, {"bias_arithmetic": "int32", **counted, **report, "ties": ties, "sum_ties": sums}
