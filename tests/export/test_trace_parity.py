"""benchmarks/trace_parity.py: the values the deploy reference rounds, and their distance to a tie."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from export_helpers import input_shape_for, lowered_case

from export.reference import DeployReference

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from trace_parity import PreRounding, quantized_sources, tie_distance  # noqa: E402


def test_tie_distance_is_the_distance_to_the_nearest_half_level():
    t = np.array([69.5, 73.4999924, 42.1464691, -37.6245384, 3.0])
    np.testing.assert_allclose(tie_distance(t), [0.0, 7.6e-6, 0.3535309, 0.1245384, 0.5], atol=1e-6)


def test_recorded_values_round_to_the_integers_the_reference_computes():
    _, graph = lowered_case("resnet20", 4, json.dumps({}))
    reference = DeployReference(graph, "float")
    x = torch.randn(2, *input_shape_for("resnet20"), generator=torch.Generator().manual_seed(0))
    _, integers = reference.run(x, capture=True)
    tracer = PreRounding(reference)
    captured = tracer.run(x, overrides={})
    assert set(captured) == set(integers)
    rounded_here = [n for n in graph.nodes if n.output in integers and n.op in ("quantize", "qconv", "qlinear")]
    assert rounded_here
    for node in rounded_here:
        quant = node.attrs["out_quant"]
        assert torch.equal(captured[node.output], integers[node.output])
        if quant.get("expand", 1) == 1:
            expected = torch.round(tracer.values[node.output]).clamp(quant["qmin"], quant["qmax"]).float()
            assert torch.equal(expected, integers[node.output]), node.output
    assert torch.round is not tracer._round  # the patch is undone


def test_overrides_feed_the_next_nodes_and_sources_cross_float_ops():
    _, graph = lowered_case("resnet20", 4, json.dumps({}))
    reference = DeployReference(graph, "float")
    x = torch.randn(1, *input_shape_for("resnet20"), generator=torch.Generator().manual_seed(1))
    _, integers = reference.run(x, capture=True)
    producers = {node.output: node for node in graph.nodes}
    add_reader = next(
        n
        for n in graph.nodes
        if n.op == "quantize" and n.inputs[0] in producers and producers[n.inputs[0]].op in ("add", "relu")
    )
    sources = quantized_sources(add_reader.output, producers, reference.quant)
    assert len(sources) == 2  # the residual Add's two quantized inputs, through the float Add (and ReLU)
    shifted = integers[sources[0]] + 1
    changed = PreRounding(reference).run(x, overrides={sources[0]: shifted})
    assert not torch.equal(changed[add_reader.output], integers[add_reader.output])
