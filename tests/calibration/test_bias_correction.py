"""Bias correction: every corrected layer's per-channel output mean equals the FP32 model's."""

from __future__ import annotations

import torch
from export_helpers import trained_like

from calibration.bias_correction import _bias_layers, _channel_means, correct_biases
from calibration.ptq import fp32_twin, load_fp32_model, quantize_post_training
from fatq.checkpoint import CIFAR_NORMALIZATION, save_checkpoint


def _models(tmp_path, bits: int):
    path = tmp_path / "fp32.pt"
    save_checkpoint(path, trained_like("resnet20", 32), CIFAR_NORMALIZATION)
    model, _ = load_fp32_model(path, bits, None, None)
    return model, fp32_twin(model, path)


def _batches():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 32, 32, generator=generator) for _ in range(3)]


def test_corrected_means_match_the_fp32_model(tmp_path):
    model, reference = _models(tmp_path, bits=4)
    batches = _batches()
    quantize_post_training(model, batches, "minmax", quiet=True)
    paths = _bias_layers(model)
    assert "layer2.1.bn1" in paths and "linear" in paths
    target = _channel_means(reference, paths, batches)
    before = _channel_means(model, paths, batches)
    weights = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".weight")}
    shifts = correct_biases(model, reference, batches, quiet=True)
    after = _channel_means(model, paths, batches)
    assert set(shifts) == set(paths)
    gap_before = max(float((before[p] - target[p]).abs().max()) for p in paths)
    gap_after = max(float((after[p] - target[p]).abs().max()) for p in paths)
    assert gap_before > 0.05 and gap_after < 1e-4  # moving β moves a BatchNorm's output mean exactly
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # only biases moved


def test_quantize_post_training_with_reference_corrects(tmp_path):
    model, reference = _models(tmp_path, bits=4)
    batches = _batches()
    quantize_post_training(model, batches, "minmax", quiet=True, reference=reference)
    paths = _bias_layers(model)
    target, got = _channel_means(reference, paths, batches), _channel_means(model, paths, batches)
    assert max(float((got[p] - target[p]).abs().max()) for p in paths) < 1e-4
