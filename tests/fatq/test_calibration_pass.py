"""The calibration pass writes ranges into the right quantizers, from the right activations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fatq.calibration_pass import activation_quantizers, calibrate
from fatq.errors import FatqError
from fatq.models import create_model
from fatq.qconfig import QuantSpec
from fatq.quantizers import ActivationQuantizer


class TwoStage(nn.Module):
    """x -> q1 -> *2 -> relu -> q2 -> +1: the inputs of q1 and q2 are known in closed form."""

    def __init__(self, enabled2: bool = False):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.q1 = ActivationQuantizer(8, signed=True, enabled=False)
        self.q2 = ActivationQuantizer(4, signed=False, enabled=enabled2, alpha_init=0.5)

    def forward(self, x):
        return self.q2(torch.relu(self.q1(x) * self.scale)) + 1


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 5, 5, generator=g) for _ in range(n)]


def test_minmax_ranges_from_float_activations():
    model = TwoStage()
    batches = _batches()
    alphas = calibrate(model, batches, "minmax", quiet=True)
    data = torch.cat(batches)
    assert set(alphas) == {"q1", "q2"}
    assert alphas["q1"] == pytest.approx(float(data.abs().max()), rel=1e-6)
    # q2 sees relu(2x) of the *float* x (all targets are disabled while collecting)
    assert alphas["q2"] == pytest.approx(float(torch.relu(2 * data).max()), rel=1e-6)
    assert model.q1.enabled and model.q2.enabled
    assert model.q2.scale == pytest.approx(alphas["q2"] / 15, rel=1e-6)
    assert model.q1.scale == pytest.approx(alphas["q1"] / 127, rel=1e-6)


def test_default_targets_only_disabled_quantizers():
    model = TwoStage(enabled2=True)
    alphas = calibrate(model, _batches(), "minmax", quiet=True)
    assert set(alphas) == {"q1"}
    assert float(model.q2.alpha.detach()) == 0.5  # the learned range is untouched


def test_explicit_paths_and_non_targets_stay_active():
    model = TwoStage(enabled2=True)
    batches = _batches()
    alphas = calibrate(model, batches, "minmax", quantizers=["q1"], quiet=True)
    assert set(alphas) == {"q1"}
    assert model.q2.enabled and float(model.q2.alpha.detach()) == 0.5
    # recalibrating an enabled quantizer: it is disabled while collecting, then re-enabled
    model.q1.set_range(0.01)
    alphas = calibrate(model, batches, "minmax", quantizers=["q1"], quiet=True)
    assert alphas["q1"] == pytest.approx(float(torch.cat(batches).abs().max()), rel=1e-6)
    assert model.q1.enabled


def test_bad_paths_and_empty_batches():
    model = TwoStage()
    with pytest.raises(FatqError, match="not an activation quantizer"):
        calibrate(model, _batches(), quantizers=["scale"], quiet=True)
    with pytest.raises(FatqError, match="no batches"):
        calibrate(model, [], quiet=True)
    assert not model.q1.enabled  # flags restored


def test_unused_quantizer_is_an_error():
    model = TwoStage()
    model.unused = ActivationQuantizer(8, signed=True, enabled=False)
    with pytest.raises(FatqError, match="saw no data"):
        calibrate(model, _batches(1), quiet=True)


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_resnet_edge_and_residual_quantizers(method):
    spec = QuantSpec(weight_bits=4, act_bits=4, edge_inputs="float", residual_inputs="float", transform=False)
    model = create_model("resnet20", spec=spec)
    model.train()
    disabled = {p for p, q in activation_quantizers(model).items() if not q.enabled}
    body_alpha = {p: float(q.alpha.detach()) for p, q in activation_quantizers(model).items() if q.enabled}
    assert "conv1.input_quantizer" in disabled and "linear.input_quantizer" in disabled
    alphas = calibrate(model, [torch.randn(2, 3, 32, 32)], method, quiet=True)
    assert set(alphas) == disabled
    assert all(a > 0 for a in alphas.values())
    assert model.training  # mode restored
    for path, q in activation_quantizers(model).items():
        assert q.enabled
        if path in body_alpha:
            assert float(q.alpha.detach()) == body_alpha[path]
