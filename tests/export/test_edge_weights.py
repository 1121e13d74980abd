"""export.edge_weights: reference stem/classifier integers below −127 are re-quantized with max|W|, and recorded."""

from __future__ import annotations

import pytest
import torch
from reference_forward import reference_state, save_reference

from export.edge_weights import describe, fit_edge_weights_to_int8, refuse_wide_activations
from export.fold import fold
from fatq.checkpoint import load_fatq_checkpoint, model_from_checkpoint
from fatq.errors import FatqError
from fatq.reference_import import import_reference, save_imported


def imported(tmp_path, negative_stem: bool):
    state = reference_state("resnet20", 4, seed=3, negative_stem=negative_stem)
    return import_reference(save_reference(tmp_path, state), "resnet20", 4)


def test_out_of_int8_stem_is_requantized_with_max_abs_and_recorded(tmp_path):
    model, report = imported(tmp_path, negative_stem=True)
    with pytest.raises(FatqError, match="beyond int8"):  # without the step, export refuses: never silent
        fold(model, [3, 32, 32], disabled_quantizers="skip")
    before_linear = model.linear.weight_integers()[0].clone()
    records = fit_edge_weights_to_int8(model)
    assert [r["layer"] for r in records] == ["conv1"] == report.beyond_int8
    (record,) = records
    assert record["old_integer_range"] == report.edge_integer_ranges["conv1"] and record["old_integer_range"][0] < -127
    w = model.conv1.weight.detach()
    expected = torch.round(w / (w.abs().max() / 127))  # fatq's max|W| rule, written out
    q, scale = model.conv1.weight_integers()
    assert torch.equal(q, expected) and record["new_integer_range"] == [int(q.min()), int(q.max())]
    assert record["new_integer_range"][0] == -127 and scale == pytest.approx(float(w.abs().max()) / 127)
    assert 0 < record["relative_weight_change"] < 0.01 and "conv1" in describe(records)
    assert torch.equal(model.linear.weight_integers()[0], before_linear)  # the classifier fit: untouched
    fold(model, [3, 32, 32], disabled_quantizers="skip")
    assert fit_edge_weights_to_int8(model) == []  # idempotent


def test_requantized_rule_survives_a_checkpoint_round_trip(tmp_path):
    model, report = imported(tmp_path, negative_stem=True)
    fit_edge_weights_to_int8(model)
    save_imported(model, report, tmp_path / "m.pt")
    reloaded = model_from_checkpoint(load_fatq_checkpoint(tmp_path / "m.pt"))
    assert reloaded.conv1.weight_quantizer.int8_fallback
    assert torch.equal(reloaded.conv1.weight_integers()[0], model.conv1.weight_integers()[0])


def test_layers_that_fit_keep_the_reference_integers(tmp_path):
    model, report = imported(tmp_path, negative_stem=False)
    before = model.conv1.weight_integers()[0].clone()
    assert report.beyond_int8 == [] and fit_edge_weights_to_int8(model) == []
    assert torch.equal(model.conv1.weight_integers()[0], before)


def test_eight_bit_imports_are_refused_for_int8_engines(tmp_path):
    model, _ = import_reference(save_reference(tmp_path, reference_state("resnet20", 8)), "resnet20", 8)
    with pytest.raises(FatqError, match="255 activation levels"):
        refuse_wide_activations(model)
    refuse_wide_activations(imported(tmp_path, negative_stem=False)[0])  # 4 bits: 15 levels, fine
