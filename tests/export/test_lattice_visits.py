"""Calibration visits of lattice values, and moves that avoid crossing them."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from export_helpers import input_shape_for, quantizer_inputs, trained_like

from export.engine_exact import make_engine_exact
from export.lattice_visits import LatticeVisits
from export.pipeline import deploy_graph
from export.reference import DeployReference


def _lowered(model):
    return deploy_graph(model, input_shape_for(model.arch))


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, *input_shape_for("resnet20"), generator=torch.Generator().manual_seed(seed))


def test_counts_match_an_independent_count_of_the_captured_integers():
    model = trained_like("resnet20", 4)
    graph = _lowered(model)
    images = _images(24, 1)
    visits = LatticeVisits.measure(graph, images, "int32", batch=10)  # three batches: the histograms must merge
    _, captured = DeployReference(graph, "int32").run(images, capture=True)
    producers = graph.producers()
    add = next(n for n in graph.nodes if n.op == "add")
    quants = [producers[name].attrs["out_quant"] for name in add.inputs]
    pairs = np.stack(
        [
            (captured[n] / q.get("expand", 1)).numpy().ravel() - q["qmin"]
            for n, q in zip(add.inputs, quants, strict=True)
        ]
    )
    values, counts = np.unique(pairs, axis=1, return_counts=True)
    assert visits.pairs[add.name].sum() == pairs.shape[1]
    assert np.array_equal(visits.pairs[add.name][values[0].astype(int), values[1].astype(int)], counts)
    layer = next(n for n in graph.nodes if n.op == "qconv" and n.inputs[0] in captured and n.attrs["out_quant"])
    a = layer.attrs
    weight = torch.from_numpy(layer.params["weight"].astype(np.float32))
    acc = F.conv2d(captured[layer.inputs[0]], weight, None, a["stride"], a["padding"], a["dilation"], a["groups"])
    scale = float(np.float32(a["out_quant"]["scale"]))
    step = np.float32(a["input_scale"]) * layer.params["weight_scale"].astype(np.float32)
    for channel in (0, 3):
        values, counts = np.unique(acc[:, channel].numpy().astype(np.int64), return_counts=True)
        mine = visits.accumulators[layer.name][channel]
        # only values near a rounding boundary are kept (no move reaches the others), each with its full count
        assert len(mine.values) and np.isin(mine.values, values).all()
        kept = np.isin(values, mine.values)
        assert mine.between(values[kept], values[kept]).tolist() == counts[kept].tolist()
        level = values * float(step[channel]) / scale + layer.params["bias"][channel] / scale
        assert (np.abs(level[~kept] - (np.floor(level[~kept]) + 0.5)) > 0.009).all()
        assert kept.sum() < len(values) / 2
    assert visits.images == 24


def _integers(model, images) -> dict[str, torch.Tensor]:
    """Every activation quantizer's integers on ``images``."""
    return {n: q.integers(read)[0] for n, (q, read) in quantizer_inputs(model, images).items()}


def test_moves_with_visits_change_fewer_integers_on_the_images_they_counted():
    """The moves are a real change of the model; knowing which values images reach, they cross fewer of them."""
    model = trained_like("resnet20", 4)
    images = _images(64, 2)
    before = _integers(model, images)
    changed = {}
    for label, visits in (("blind", None), ("visits", LatticeVisits.measure(_lowered(model), images))):
        moved = copy.deepcopy(model)
        _, report = make_engine_exact(moved, _lowered, arithmetic="float", visits=visits)
        assert report["calibration_visits"] == (0 if visits is None else 64)
        after = _integers(moved, images)
        changed[label] = sum(int((after[n] != before[n]).sum()) for n in before)
    assert changed["visits"] < changed["blind"]
