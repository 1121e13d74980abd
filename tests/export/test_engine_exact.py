"""Moving biases onto the engine's int32 grid: integers unchanged, biases exactly the engine's."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from export_helpers import input_shape_for, quantizer_inputs, trained_like

from export.deploy_graph import tensor_quant
from export.engine_exact import (
    avoid_ties,
    engine_bias,
    make_engine_exact,
    project_biases,
    residual_near_ties,
    verify_projection,
)
from export.fold import fold
from export.pipeline import deploy_graph
from export.reference import DeployReference
from export.tie_lattices import TIE_MARGIN, Int32Lattice, best_move
from fatq.errors import FatqError

CASES = [("resnet20", 4), ("resnet20", 2), ("mobilenetv2", 4), ("vgg_small", 3)]


def _lowered(model):
    return deploy_graph(model, input_shape_for(model.arch))


def _bias_gap_in_steps(graph) -> float:
    """Largest |float bias − engine bias| of any integer layer, in accumulator steps."""
    worst = 0.0
    for node in graph.nodes:
        if node.op in ("qconv", "qlinear"):
            step = np.float32(node.attrs["input_scale"]) * node.params["weight_scale"].astype(np.float32)
            gap = np.abs(node.params["bias"] - engine_bias(node.params, node.attrs["input_scale"])) / step
            worst = max(worst, float(gap.max()))
    return worst


@pytest.mark.parametrize("arch,bits", CASES)
def test_projection_keeps_integers_and_lands_on_the_grid(arch, bits):
    model = trained_like(arch, bits)
    graph = _lowered(model)
    assert _bias_gap_in_steps(graph) > 0.1  # the rounding the engine imposes is real
    report = project_biases(model, graph)
    again = _lowered(model)
    verify_projection(graph, again)
    # what is left is β's float32 resolution (~6e-8 |β|) against steps as small as 1e-5
    assert _bias_gap_in_steps(again) < 0.02
    assert 0 < report["max_shift_levels"] < 0.5
    assert report["channels"] > 0 and report["layers"]


def test_projected_model_matches_the_deploy_reference_closer():
    model = trained_like("resnet20", 4)
    graph = _lowered(model)
    reference = DeployReference(graph)
    x = torch.randn(64, *input_shape_for("resnet20"), generator=torch.Generator().manual_seed(1))
    expected = reference(x)
    with torch.no_grad():
        before = (model(x) - expected).abs().mean().item()
        project_biases(model, graph)
        after = (model(x) - expected).abs().mean().item()
    assert after < before / 10


def test_verify_projection_names_a_changed_layer():
    model = trained_like("resnet20", 4)
    graph = _lowered(model)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.layer1[0].bn1.bias += 0.5
    with pytest.raises(FatqError, match="layer1.0.conv1"):
        verify_projection(graph, _lowered(moved))


def test_projection_needs_the_integer_graph():
    model = trained_like("resnet20", 4)
    with pytest.raises(FatqError, match="integer"):
        project_biases(model, fold(model, input_shape_for("resnet20")))


def _nearest_tie_distance(graph) -> float:
    """Smallest |float32(N)·M − (k + ½)| over the reachable N next to each boundary, non-dense channels."""
    quant = {n.output: tensor_quant(n.attrs["out_quant"]) for n in graph.nodes if n.attrs.get("out_quant")}
    worst = np.inf
    for node in graph.nodes:
        if node.op not in ("qconv", "qlinear") or node.attrs["out_quant"] is None:
            continue
        lattice = Int32Lattice(node, quant[node.inputs[0]])
        for c in range(lattice.multiplier.size):
            m = np.float32(lattice.multiplier[c])
            if m < 4 * TIE_MARGIN:
                continue
            for t in lattice.boundaries:
                centre = np.floor(t / float(m))
                n = np.arange(centre - 3, centre + 4)
                n = n[(n >= lattice.low[c]) & (n <= lattice.high[c])].astype(np.float32)
                if n.size:
                    worst = min(worst, float(np.abs((n * m).astype(np.float64) - t).min()))
    return worst


def test_avoid_ties_clears_every_reachable_value_of_the_boundaries():
    model = trained_like("resnet20", 4, seed=3)
    lower_model = _lowered
    assert _nearest_tie_distance(_lowered(model)) < TIE_MARGIN  # random models have near-ties too
    graph, report = avoid_ties(model, lower_model)
    assert report["channels_moved"] > 0 and report["unresolved"] == []
    assert 0 < report["max_gamma_change"] < 5e-3
    assert _nearest_tie_distance(graph) >= TIE_MARGIN


def test_make_engine_exact_model_agrees_with_the_deploy_reference():
    """After both steps the eval model and the engine arithmetic give the same integers everywhere."""
    model = trained_like("resnet20", 4)
    graph, report = make_engine_exact(model, _lowered)
    assert report["ties"]["unresolved"] == [] and report["max_shift_levels"] < 0.5
    x = torch.randn(64, *input_shape_for("resnet20"), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        difference = (model(x) - DeployReference(graph)(x)).abs().max().item()
    assert difference < 1e-4


@pytest.mark.parametrize("name, bits", CASES)
def test_float_bias_arithmetic_moves_only_sum_ranges_and_biases_and_the_model_is_what_it_computes(name, bits):
    """TensorRT/OpenVINO add the trained float bias: residual-sum ranges and biases move off near-ties, nothing else."""
    model = trained_like(name, bits)
    before = copy.deepcopy(model.state_dict())
    graph, report = make_engine_exact(model, _lowered, arithmetic="float")
    assert report["bias_arithmetic"] == "float" and report["sum_ties"]["unresolved"] == []
    after = model.state_dict()
    moved = [k for k, v in before.items() if isinstance(v, torch.Tensor) and not torch.equal(v, after[k])]
    alphas = [k for k in moved if k.endswith("quantizer.alpha")]
    assert sorted(k.removesuffix(".alpha") for k in alphas) == sorted(report["sum_ties"]["moves"])
    assert all(abs(after[k] / before[k] - 1) <= 3e-3 for k in alphas)
    # besides ranges: BatchNorm γ/β/running mean (a term's writer, a range's readers) and biases
    assert all(k.rsplit(".", 1)[1] in ("weight", "bias", "running_mean") for k in moved if k not in alphas)
    assert report["ties"]["max_shift_levels"] <= 3e-3
    assert residual_near_ties(graph)["pairs"] == 0 and isinstance(report["near_ties"]["layers"], list)
    x = torch.randn(32, *input_shape_for(name), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = model(x), DeployReference(graph, "float")(x)
    assert (expected.argmax(1) == got.argmax(1)).all()
    _assert_differences_are_float_ties(model, graph, x)


def _assert_differences_are_float_ties(model, graph, x: torch.Tensor) -> None:
    """Layer by layer (the model's integers fed back in), the float-bias reference rounds every quantized
    tensor like the model, except values the model computes within 1e-4 levels of a boundary k + ½ (an
    8-bit lattice too dense to clear: ``near_ties``), and those by one level."""
    integers, levels = {}, {}
    for name, (quantizer, read) in quantizer_inputs(model, x).items():
        integers[name], scale = quantizer.integers(read)
        levels[name] = read / scale
    producers = graph.producers()
    expand = {name: producers[name].attrs["out_quant"].get("expand", 1) for name in integers}
    overrides = {n: q * expand[n] for n, q in integers.items()}
    _, captured = DeployReference(graph, "float").run(x, capture=True, overrides=overrides)
    for name, theirs in integers.items():
        differs = captured[name] / expand[name] != theirs
        t = levels[name][differs]
        assert ((captured[name] / expand[name] - theirs).abs() <= 1).all(), name
        assert ((t - (torch.floor(t) + 0.5)).abs() < 1e-4).all(), name


def test_residual_sum_ranges_move_off_rounding_boundaries():
    # 0.25·a + 0.5·b on a scale of 1.0 hits k + 0.5 exactly; avoid_sum_ties is what clears such a lattice
    from export.engine_exact import _sum_lattices

    for scales, clearing_knobs in (((0.25, 0.5, 1.0), [None]), ((0.25, 0.0391, 1.0), [None, 0])):
        (lattice,) = _sum_lattices(_sum_graph(*scales))
        for term in (None, 0, 1):
            best = best_move(lambda moves, term=term, lattice=lattice: lattice.score(term, moves))
            if term not in clearing_knobs:
                # a term's scale cannot move the pairs where that term is 0 (0.25·a alone ties at a = 2, 6, ...)
                assert best is None, (scales, term)
                continue
            epsilon, crossed = best
            assert abs(epsilon) <= 3e-3 and lattice.score(term, np.array([epsilon]))[0][0]
            assert crossed == _brute_force_sum_crossings(lattice, term, epsilon)


def _brute_force_sum_crossings(lattice, term, epsilon) -> int:
    """Pairs (a, b) that PyTorch (float32 q·s products, their sum, / s, round half to even; relu'd, clamped)
    rounds to another integer when one scale moves by 1 + ε."""
    a, b = torch.meshgrid(torch.arange(-127.0, 128.0), torch.arange(0.0, 128.0), indexing="ij")
    scales = [*lattice.term_scales, lattice.scale]
    moved = list(scales)
    knob = 2 if term is None else term
    moved[knob] = float(np.float32(scales[knob] * (1 + epsilon)))

    def rounded(s):
        s = [torch.tensor(v, dtype=torch.float32) for v in s]
        return torch.clamp(torch.round((a * s[0] + b * s[1]) / s[2]), 0, 15)

    return int((rounded(scales) != rounded(moved)).sum())


def test_best_move_takes_the_fewest_crossings_then_the_smallest():
    from export.tie_lattices import MOVES

    def score(moves):  # clear beyond 1e-6; crossings 2 for negative moves, 1 below 5e-6, 0 from 5e-6 on
        clear = np.abs(moves) > 1e-6
        crossings = np.where(moves < 0, 2, np.where(moves < 5e-6 - 1e-12, 1, 0))
        return clear, crossings

    assert best_move(score) == (pytest.approx(5e-6), 0)
    assert best_move(lambda moves: (np.zeros(len(moves), bool), np.zeros(len(moves)))) is None
    assert np.all(np.diff(np.abs(MOVES)) >= 0)


def test_lattice_crossings_match_an_enumeration():
    """Int32Lattice/FloatLattice.crossings against counting every reachable value that changes side."""
    from export.tie_lattices import FloatLattice

    model = trained_like("resnet20", 4)
    graph = _lowered(model)
    quant = {n.output: tensor_quant(n.attrs["out_quant"]) for n in graph.nodes if n.attrs.get("out_quant")}
    node = next(n for n in graph.nodes if n.op == "qconv" and n.attrs["out_quant"] is not None)
    moves = np.array([-3e-3, -1e-4, 2e-5, 1e-3])
    lattice = Int32Lattice(node, quant[node.inputs[0]])
    for channel in range(3):
        n = np.arange(lattice.low[channel], lattice.high[channel] + 1)
        before = np.searchsorted(lattice.boundaries, n * lattice.multiplier[channel])
        expected = [
            int((before != np.searchsorted(lattice.boundaries, n * lattice.multiplier[channel] * (1 + e))).sum())
            for e in moves
        ]
        assert lattice.crossings(channel, moves).tolist() == expected
    lattice = FloatLattice(node, quant[node.inputs[0]])
    shifts = moves * lattice.scale
    for channel in range(3):
        n = np.arange(lattice.low[channel], lattice.high[channel] + 1)
        value = n * lattice.multiplier[channel] + lattice.offset[channel]
        before = np.searchsorted(lattice.boundaries, value)
        expected = [
            int((before != np.searchsorted(lattice.boundaries, value + shift / lattice.scale)).sum())
            for shift in shifts
        ]
        assert lattice.crossings(channel, shifts).tolist() == expected


def test_sum_moves_keep_every_integer_of_the_graph():
    """A term move scales a layer's BatchNorm with its quantizer; a range move compensates its readers:
    the lowered integers (weights, int32 biases) stay, only the scales move."""
    from export.engine_exact import avoid_sum_ties

    model = trained_like("resnet20", 4)
    before = _lowered(model)
    after, report = avoid_sum_ties(model, _lowered)
    assert report["moves"] and report["unresolved"] == []
    for a, b in zip(before.nodes, after.nodes, strict=True):
        if a.op in ("qconv", "qlinear"):
            assert np.array_equal(a.params["weight"], b.params["weight"]), a.name
            assert np.array_equal(a.params["bias_int32"], b.params["bias_int32"]), a.name


def test_unknown_bias_arithmetic_is_refused():
    with pytest.raises(FatqError, match="bias arithmetic"):
        make_engine_exact(trained_like("resnet20", 4), _lowered, arithmetic="fixed")


def _sum_graph(scale_a: float, scale_b: float, scale_out: float):
    """input -> two quantizers -> add -> relu -> quantize: a residual sum of two quantized tensors."""
    from export.deploy_graph import DeployGraph, DeployNode

    def quantize(name, source, scale, qmin, qmax):
        attrs = {"scale": scale, "qmin": qmin, "qmax": qmax, "out_quant": {"scale": scale, "qmin": qmin, "qmax": qmax}}
        return DeployNode(name, "quantize", [source], name, attrs)

    nodes = [
        quantize("a", "input", scale_a, -127, 127),
        quantize("b", "input", scale_b, 0, 127),
        DeployNode("add", "add", ["a", "b"], "add", {}),
        DeployNode("relu", "relu", ["add"], "relu", {}),
        quantize("out", "relu", scale_out, 0, 15),
    ]
    return DeployGraph(nodes, "input", [1, 2, 2], "out", dialect="integer")


def test_residual_near_ties_counts_sums_on_a_rounding_boundary():
    # 0.25·a + 0.5·b hits every multiple of 0.25: t = k + 0.5 exactly for many pairs at scale 1
    on_grid = residual_near_ties(_sum_graph(0.25, 0.5, 1.0))
    assert on_grid["pairs"] > 0 and set(on_grid["quantizers"]) == {"out"}
    # an independent count: pairs with relu'd t inside the range at exactly k + 0.5
    a, b = np.meshgrid(np.arange(-127, 128) * 0.25, np.arange(0, 128) * 0.5, indexing="ij")
    t = (a + b).ravel()
    assert on_grid["pairs"] == int(((t > 0) & (t < 15.5) & (t % 1 == 0.5)).sum())
    # scales without that structure leave no sum within float error of a boundary
    assert residual_near_ties(_sum_graph(0.0213, 0.0391, 0.2379))["pairs"] == 0
