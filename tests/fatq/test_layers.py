"""Quantized layers: outputs equal integer arithmetic times scales; the eval-mode weight cache stays correct."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fatq.layers import QuantConv2d, QuantLinear
from fatq.quantizers import ActivationQuantizer, MaxAbsWeightQuantizer, UniformWeightQuantizer


def quant_conv(in_ch=4, out_ch=6, kernel=3, groups=1, bias=True, bits=4, signed=False, transform=True) -> QuantConv2d:
    return QuantConv2d(
        in_ch,
        out_ch,
        kernel,
        padding=1,
        groups=groups,
        bias=bias,
        weight_quantizer=UniformWeightQuantizer(bits),
        input_quantizer=ActivationQuantizer(bits, signed=signed, alpha_init=2.0),
        transform=transform,
    )


def quant_linear(in_f=12, out_f=5, bits=4) -> QuantLinear:
    return QuantLinear(
        in_f,
        out_f,
        weight_quantizer=UniformWeightQuantizer(bits),
        input_quantizer=ActivationQuantizer(bits, signed=False, alpha_init=2.0),
        transform=True,
    )


@pytest.mark.parametrize(
    "groups,signed,bits", [(1, False, 4), (1, True, 3), (6, False, 2)], ids=["conv", "signed-input", "depthwise"]
)
def test_conv_output_is_integer_conv_times_scales(groups, signed, bits):
    in_ch = 6 if groups > 1 else 4
    layer = quant_conv(in_ch=in_ch, groups=groups, bits=bits, signed=signed)
    x = torch.randn(2, in_ch, 7, 7) * 1.5
    with torch.no_grad():
        y = layer(x)
        q_x, s_x = layer.input_quantizer.integers(x)
        q_w, s_w = layer.weight_integers()
        w_t = layer.transformed_weight()
    # The weight integers are METHOD.md §1.6 applied to the transformed weight.
    n = 2 ** (bits - 1) - 1
    alpha = layer.weight_quantizer.alpha.item()
    u = np.clip(w_t.double().numpy() / alpha, -1, 1)
    near_tie = np.abs(np.abs(u) * n % 1 - 0.5) < 1e-4  # float32 vs float64 may round these differently
    np.testing.assert_array_equal(q_w.numpy()[~near_tie], (np.sign(u) * np.round(np.abs(u) * n))[~near_tie])
    assert q_x.min() >= (-(2 ** (bits - 1) - 1) if signed else 0)
    # Integer accumulation (exact in float64), then one rescale: what an integer engine computes.
    acc = F.conv2d(q_x.double(), q_w.double(), padding=1, groups=groups)
    assert torch.equal(acc, acc.round())
    expected = acc * (s_x.double() * s_w.double()) + layer.bias.double().view(1, -1, 1, 1)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_linear_output_is_integer_matmul_times_scales():
    layer = quant_linear()
    x = torch.rand(3, 12) * 3
    with torch.no_grad():
        y = layer(x)
        q_x, s_x = layer.input_quantizer.integers(x)
        q_w, s_w = layer.weight_integers()
    acc = q_x.double().numpy() @ q_w.double().numpy().T
    expected = acc * (s_x.item() * s_w.item()) + layer.bias.detach().double().numpy()
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_edge_layer_without_transform_quantizes_raw_weights():
    layer = QuantConv2d(
        3, 8, 3, weight_quantizer=MaxAbsWeightQuantizer(), input_quantizer=ActivationQuantizer(8, True), transform=False
    )
    q_w, s_w = layer.weight_integers()
    assert isinstance(layer.weight_transform, nn.Identity)
    assert s_w.item() == pytest.approx(layer.weight.detach().abs().max().item() / 127)
    assert torch.equal(q_w, torch.round(layer.weight.detach() / s_w))


def test_weight_integers_are_what_forward_uses():
    layer = quant_conv()
    q, scale = layer.weight_integers()
    assert torch.equal(layer.quantized_weight(), q * scale)
    assert q.abs().max().item() <= 7


def test_float_state_dict_loads_into_quantized_layer():
    plain = nn.Conv2d(4, 6, 3, padding=1)
    layer = quant_conv()
    missing, unexpected = layer.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    assert all(k.split(".")[0] in ("weight_transform", "weight_quantizer", "input_quantizer") for k in missing)
    assert torch.equal(layer.weight, plain.weight)


# ---------------------------------------------------------------- eval-mode cache


def _eval_weight(layer: nn.Module) -> torch.Tensor:
    layer.eval()
    with torch.no_grad():
        return layer.quantized_weight()


def _fresh_weight(layer: nn.Module) -> torch.Tensor:
    """The quantized weight computed along the training path (never cached)."""
    with torch.enable_grad():
        return layer.weight_quantizer(layer.transformed_weight()).detach()


@pytest.mark.parametrize("make", [quant_conv, quant_linear], ids=["conv", "linear"])
def test_eval_cache_equals_training_output(make):
    layer = make()
    x = torch.rand(2, 4, 6, 6) * 3 if isinstance(layer, QuantConv2d) else torch.rand(2, 12) * 3
    layer.train()
    y_train = layer(x).detach()
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
        cached = layer.quantized_weight()
        assert layer.quantized_weight() is cached  # really cached
    # eval runs the integer form of the same function: equal up to float32 rounding
    torch.testing.assert_close(y_eval, y_train, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached, _fresh_weight(layer))


@pytest.mark.parametrize("make", [quant_conv, quant_linear], ids=["conv", "linear"])
def test_eval_forward_is_the_exact_integer_product(make):
    """Eval output = float32(Σ q_x q_w · s_x s_w) with the sum exact: within 2 roundings of float64 truth."""
    layer = make().eval()
    is_conv = isinstance(layer, QuantConv2d)
    x = torch.rand(2, 4, 6, 6) * 3 if is_conv else torch.rand(2, 12) * 3
    with torch.no_grad():
        y_eval = layer(x).double()
        q_x, s_x = layer.input_quantizer.integers(x)
        q_w, s_w = layer.weight_integers()
        op = (lambda a, w: layer._conv_forward(a, w, None)) if is_conv else torch.nn.functional.linear
        truth = op(q_x.double(), q_w.double()) * float(s_x) * float(s_w)
        if layer.bias is not None:
            truth = truth + layer.bias.double().reshape(1, -1, *([1] * (truth.dim() - 2)))
        fake_quant = op(layer.input_quantizer(x), layer.quantized_weight()).double()
    exact_error = (y_eval - truth).abs().max().item()
    assert exact_error <= 3 * torch.finfo(torch.float32).eps * truth.abs().max().item()
    assert exact_error <= (fake_quant - truth).abs().max().item() + 1e-12


@pytest.mark.parametrize("parameter", ["weight", "weight_quantizer.alpha", "weight_transform.mask.weight"])
def test_eval_cache_invalidated_by_optimizer_step(parameter):
    layer = quant_conv()
    before = _eval_weight(layer).clone()
    target = layer.get_parameter(parameter)
    optimizer = torch.optim.SGD([target], lr=0.5)
    layer.train()
    layer(torch.rand(2, 4, 6, 6) * 3).square().sum().backward()
    assert target.grad is not None and target.grad.abs().sum() > 0
    optimizer.step()
    after = _eval_weight(layer)
    assert not torch.equal(after, before)
    assert torch.equal(after, _fresh_weight(layer))


def test_eval_cache_invalidated_by_load_state_dict_and_in_place_edit():
    layer, other = quant_conv(), quant_conv()
    with torch.no_grad():
        other.weight_quantizer.alpha.fill_(2.0)
    _eval_weight(layer)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(_eval_weight(layer), _eval_weight(other))
    with torch.no_grad():
        layer.weight.mul_(-1)
    assert torch.equal(_eval_weight(layer), _fresh_weight(layer))
    assert not torch.equal(_eval_weight(layer), _eval_weight(other))
