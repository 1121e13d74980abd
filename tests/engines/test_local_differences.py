"""engines.local_differences: which values an engine computes differently on equal inputs, and whether they are ties.

The "engine" here is the deploy reference itself with one integer changed and everything after it
recomputed from that change (what an engine that rounded that one value the other way would output), so
the expected answer is known: exactly one local difference, at the changed value.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from export_helpers import input_shape_for, lowered_case

import engines.local_differences as local_differences
from engines.local_differences import LocalDifferences, quantized_sources
from export.reference import DeployReference
from export.tie_lattices import tie_distance


@pytest.fixture(scope="module")
def case():
    _, graph = lowered_case("resnet20", 4, json.dumps({}))
    reference = DeployReference(graph, "float")
    x = torch.randn(2, *input_shape_for("resnet20"), generator=torch.Generator().manual_seed(0))
    before: dict[str, torch.Tensor] = {}
    _, integers = reference.run(x, capture=True, pre_rounding=before)
    return graph, reference, x, integers, before


def _engine_with_one_change(reference, x, integers, tensor, position):
    """The reference's integers with ``integers[tensor][position]`` one level higher, and everything after it
    recomputed from that (an engine that rounded that value the other way)."""
    changed = integers[tensor].clone()
    changed[position] += 1
    _, engine = reference.run(x, capture=True, overrides={tensor: changed})
    engine[tensor] = changed
    return {t: v.numpy() for t, v in engine.items()}


def _farthest_from_a_tie(before, integers, tensor):
    """A position of ``tensor`` whose t is farthest from a boundary and below the range's top."""
    t = before[tensor].double()
    distance = torch.from_numpy(tie_distance(t.numpy()))
    distance[integers[tensor] >= integers[tensor].max()] = -1  # leave room for +1
    return tuple(int(i) for i in np.unravel_index(int(distance.argmax()), tuple(t.shape)))


def test_the_pre_rounding_values_round_to_the_integers(case):
    graph, _, _, integers, before = case
    rounded = [n for n in graph.nodes if n.output in before]
    assert len(rounded) > 10
    for node in rounded:
        quant = node.attrs["out_quant"]
        if quant.get("expand", 1) == 1:
            expected = torch.round(before[node.output]).clamp(quant["qmin"], quant["qmax"])
            assert torch.equal(expected, integers[node.output]), node.output


def test_an_engine_equal_to_the_reference_has_no_local_difference(case):
    graph, reference, x, integers, _ = case
    local = LocalDifferences(graph, reference, set(integers))
    local.update(x, {t: v.numpy() for t, v in integers.items()}, integers)
    assert local.result()["values"] == 0 and local.images == 2


def test_one_value_rounded_away_from_a_tie_is_found_once_and_not_called_a_tie(case):
    graph, reference, x, integers, before = case
    tensor = "layer2.1.conv2.input_quantizer"  # a conv output inside the body
    position = _farthest_from_a_tie(before, integers, tensor)
    engine = _engine_with_one_change(reference, x, integers, tensor, position)
    assert sum(int((engine[t] != integers[t].numpy()).sum()) for t in integers) > 1  # it propagates
    local = LocalDifferences(graph, reference, set(integers))
    local.update(x, engine, integers)
    result = local.result()
    assert (result["values"], result["at_ties"], result["elsewhere"]) == (1, 0, 1)
    (example,) = result["examples"]
    assert example["tensor"] == tensor and [example["image"], *example["index"]] == list(position)
    assert example["engine"] == example["reference"] + 1 and not example["tie"]


def test_a_value_within_float_error_of_a_boundary_is_a_tie(case, monkeypatch):
    graph, reference, x, integers, before = case
    tensor = "layer2.1.conv2.input_quantizer"
    position = _farthest_from_a_tie(before, integers, tensor)
    engine = _engine_with_one_change(reference, x, integers, tensor, position)
    monkeypatch.setattr(local_differences, "float_error", lambda t: np.float64(0.5))  # every value "near" a tie
    local = LocalDifferences(graph, reference, set(integers))
    local.update(x, engine, integers)
    assert (local.result()["at_ties"], local.result()["elsewhere"]) == (1, 0)


def test_a_difference_at_an_unobserved_tensor_shows_at_its_observed_reader(case):
    graph, reference, x, integers, before = case
    producers = {node.output: node for node in graph.nodes}
    reader = next(
        n.output
        for n in graph.nodes
        if n.op == "quantize"
        and any("branch_quantizer" in s for s, _ in quantized_sources(n.output, producers, integers))
    )
    hidden = next(s for s, _ in quantized_sources(reader, producers, integers) if "branch_quantizer" in s)
    position = _farthest_from_a_tie(before, integers, hidden)
    engine = _engine_with_one_change(reference, x, integers, hidden, position)
    observed = set(integers) - {hidden}
    local = LocalDifferences(graph, reference, observed)
    local.update(x, {t: engine[t] for t in observed}, integers)
    result = local.result()
    readers = {t for t in observed if hidden in dict(quantized_sources(t, producers, integers))}  # through the Add
    assert reader in readers and 1 <= result["values"] <= len(readers)
    for example in result["examples"]:  # found where the hidden value is read, at its position
        assert example["tensor"] in readers and [example["image"], *example["index"]] == list(position)


def test_an_option_a_shortcut_reads_its_source_subsampled_and_shifted_by_the_padding(case):
    graph, _, _, integers, _ = case
    producers = {node.output: node for node in graph.nodes}
    sources = dict(quantized_sources("layer2.0.shortcut_quantizer", producers, integers))
    assert set(sources) == {"layer1.2.branch_quantizer", "layer1.2.shortcut_quantizer"}  # through the Add
    pad = producers["layer2.0.shortcut"].attrs["pad"]
    assert sources["layer1.2.branch_quantizer"]((1, pad + 4, 3, 5)) == (1, 4, 6, 10)
    assert sources["layer1.2.branch_quantizer"]((1, pad - 1, 3, 5)) is None  # a zero channel
