"""Moving biases onto the engine's int32 grid: integers unchanged, biases exactly the engine's."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from export_helpers import input_shape_for, trained_like

from export.engine_bias import engine_bias, project_biases, verify_projection
from export.fold import fold
from export.lower import lower
from export.reference import DeployReference
from fatq.errors import FatqError

CASES = [("resnet20", 4), ("resnet20", 2), ("mobilenetv2", 4), ("vgg_small", 3)]


def _lowered(model):
    return lower(fold(model, input_shape_for(model.arch)))


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
