"""Quantizers against METHOD.md's formulas (numpy float64) and closed-form gradients (§1.6–1.8, §2, §3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

from fatq.errors import FatqError
from fatq.quantizers import (
    ActivationQuantizer,
    MaxAbsWeightQuantizer,
    PerChannelWeightQuantizer,
    PowerOfTwoWeightQuantizer,
    UniformWeightQuantizer,
)

ALL_BITS = range(2, 9)


def weight_integers_reference(w: np.ndarray, alpha: float, bits: int) -> np.ndarray:
    """METHOD.md §1.6: u = clamp(W/α, -1, 1), q = sign(u) · round(|u| · n) (numpy rounds half to even)."""
    n = 2 ** (bits - 1) - 1
    u = np.clip(np.asarray(w, np.float64) / alpha, -1, 1)
    return np.sign(u) * np.round(np.abs(u) * n)


def activation_integers_reference(x: np.ndarray, alpha: float, bits: int, signed: bool) -> np.ndarray:
    """METHOD.md §2: unsigned v = clamp(x/α, 0, 1), q = round(v·m); signed as the weights."""
    if signed:
        return weight_integers_reference(x, alpha, bits)
    m = min(2**bits - 1, 127)  # project rule: no uint8 path in the engines, so 8 bits use [0, 127]
    return np.round(np.clip(np.asarray(x, np.float64) / alpha, 0, 1) * m)


def exact_alpha(levels: int, scale: float = 0.125) -> float:
    """An alpha whose scale alpha/levels is a power of two, so x/scale is exact in float32."""
    return levels * scale


def spread(alpha: float, count: int = 4001) -> torch.Tensor:
    """Values covering [-1.5α, 1.5α] densely plus random ones, float32."""
    return torch.cat([torch.linspace(-1.5 * alpha, 1.5 * alpha, count), torch.randn(1000) * alpha])


# ---------------------------------------------------------------- integer ranges and formulas


@pytest.mark.parametrize("bits", ALL_BITS)
def test_uniform_weight_integers(bits):
    n = 2 ** (bits - 1) - 1
    quantizer = UniformWeightQuantizer(bits, alpha_init=exact_alpha(n))
    w = spread(quantizer.alpha.item())
    q, scale = quantizer.integers(w)
    assert quantizer.int_range == (-n, n)
    assert q.min().item() == -n and q.max().item() == n
    np.testing.assert_array_equal(q.numpy(), weight_integers_reference(w.numpy(), quantizer.alpha.item(), bits))
    assert scale.item() == quantizer.alpha.item() / n
    assert torch.equal(quantizer(w), q * scale)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_activation_integers(bits, signed):
    quantizer = ActivationQuantizer(bits, signed=signed)
    levels = 2 ** (bits - 1) - 1 if signed else min(2**bits - 1, 127)
    with torch.no_grad():
        quantizer.alpha.fill_(exact_alpha(levels))
    x = spread(quantizer.alpha.item())
    q, scale = quantizer.integers(x)
    lo = -levels if signed else 0
    assert quantizer.int_range == (lo, levels)
    assert q.min().item() == lo and q.max().item() == levels
    np.testing.assert_array_equal(
        q.numpy(), activation_integers_reference(x.numpy(), quantizer.alpha.item(), bits, signed)
    )
    assert torch.equal(quantizer(x), q * scale)
    assert torch.equal(quantizer.scale, scale)


def test_unsigned_activation_levels_follow_method_below_8_bits():
    assert [ActivationQuantizer(b, signed=False).int_range[1] for b in range(2, 8)] == [3, 7, 15, 31, 63, 127]
    assert ActivationQuantizer(8, signed=False).int_range == (0, 127)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_power_of_two_integers_fit_int8(bits):
    """Levels {0} ∪ {2^-i, i = 1..n} normalised to max 1, scaled to integers {0} ∪ {±2^j}."""
    n = 2 ** (bits - 1) - 1
    quantizer = PowerOfTwoWeightQuantizer(bits, alpha_init=1.0)
    w = torch.rand(20000) * 2.4 - 1.2
    q, scale = quantizer.integers(w)
    top = 2 ** (n - 1)
    assert quantizer.int_range == (-top, top) and top <= 127
    allowed = {0.0} | {float(s * 2**j) for j in range(n) for s in (-1, 1)}
    assert set(q.unique().tolist()) == allowed  # every level reached, nothing else
    # Projection to the nearest level (numpy reference on |u|, ties are measure-zero here).
    u = np.clip(w.numpy().astype(np.float64), -1, 1)
    levels = np.concatenate([[0.0], 2.0 ** -np.arange(1, n + 1) * 2])
    nearest = levels[np.abs(np.abs(u)[:, None] - levels[None, :]).argmin(axis=1)]
    np.testing.assert_array_equal(q.numpy(), np.sign(u) * nearest * top)
    assert scale.item() == pytest.approx(1.0 / top)
    assert torch.equal(quantizer(w), q * scale)


def test_max_abs_weights_use_absolute_maximum():
    """METHOD.md §3 [project rule]: scale = max|W|/127, so a large negative weight maps to -127."""
    w = torch.tensor([-5.0, 1.0, 2.0, 0.3])
    quantizer = MaxAbsWeightQuantizer()
    q, scale = quantizer.integers(w)
    assert scale.item() == pytest.approx(5.0 / 127)
    assert q.tolist() == [-127.0, 25.0, 51.0, 8.0]
    assert torch.equal(quantizer(w), q * scale)
    w = torch.randn(64, 3, 3, 3)
    q, _ = quantizer.integers(w)
    assert q.abs().max().item() == 127 and q.min().item() >= -127


def test_per_channel_integers_and_scale_shape():
    bits, channels = 4, 6
    quantizer = PerChannelWeightQuantizer(bits, channels)
    alphas = [exact_alpha(7, 2.0**-k) for k in range(channels)]
    with torch.no_grad():
        quantizer.alpha.copy_(torch.tensor(alphas))
    w = torch.randn(channels, 3, 3, 3) * 0.5
    q, scale = quantizer.integers(w)
    assert scale.shape == (channels, 1, 1, 1)
    for c, alpha in enumerate(alphas):
        np.testing.assert_array_equal(q[c].numpy(), weight_integers_reference(w[c].numpy(), alpha, bits))
    assert torch.equal(quantizer(w), q * scale)


def test_round_half_to_even_on_ties():
    ties = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5])
    even = [0.0, 2.0, 2.0, 4.0, 0.0, -2.0, -2.0, -4.0]
    weight = UniformWeightQuantizer(4, alpha_init=7.0)  # scale exactly 1
    assert weight.integers(ties)[0].tolist() == even
    signed = ActivationQuantizer(4, signed=True, alpha_init=7.0)
    assert signed.integers(ties)[0].tolist() == even
    unsigned = ActivationQuantizer(4, signed=False, alpha_init=15.0)
    assert unsigned.integers(ties)[0].tolist() == [0.0, 2.0, 2.0, 4.0, 0.0, 0.0, 0.0, 0.0]
    edge = MaxAbsWeightQuantizer()  # scale exactly 1 with max|W| = 127
    assert edge.integers(torch.cat([torch.tensor([127.0]), ties]))[0].tolist() == [127.0, *even]


def test_bits_outside_range_are_refused():
    for bits in (1, 9, 16):
        with pytest.raises(FatqError, match="bits"):
            UniformWeightQuantizer(bits)
        with pytest.raises(FatqError, match="bits"):
            ActivationQuantizer(bits, signed=False)


def test_disabled_activation_quantizer_is_identity_and_set_range_enables():
    quantizer = ActivationQuantizer(4, signed=False, enabled=False)
    x = torch.randn(100) * 10
    assert quantizer(x) is x
    quantizer.set_range(2.0)
    assert quantizer.enabled and quantizer.alpha.item() == 2.0
    assert quantizer(x).max().item() == pytest.approx(2.0)


def test_init_from_data_sets_alpha_to_first_training_batch_peak():
    quantizer = ActivationQuantizer(8, signed=True, init_from_data=True)
    x = torch.randn(256) * 3
    quantizer.eval()
    quantizer(x)
    assert quantizer.alpha.item() == 5.0 and not quantizer.initialized  # evaluation never initialises
    quantizer.train()
    quantizer(x)
    assert quantizer.initialized and quantizer.alpha.item() == pytest.approx(x.abs().max().item())
    quantizer(x * 10)
    assert quantizer.alpha.item() == pytest.approx(x.abs().max().item())  # only the first batch


def test_activation_flags_travel_in_state_dict():
    source = ActivationQuantizer(8, signed=False, enabled=False, init_from_data=True)
    target = ActivationQuantizer(8, signed=False)
    target.load_state_dict(source.state_dict())
    assert not target.enabled and not target.initialized


# ---------------------------------------------------------------- gradients (closed forms)


def _backward(quantizer, x, upstream):
    x = x.clone().requires_grad_(True)
    (quantizer(x) * upstream).sum().backward()
    return x.grad, quantizer.alpha.grad


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_uniform_weight_gradients(bits):
    """§1.7: dα = Σ g · [sign(u) where |W/α| > 1, else q/n − W/α]; dW = g everywhere."""
    n = 2 ** (bits - 1) - 1
    alpha = 1.3
    quantizer = UniformWeightQuantizer(bits, alpha_init=alpha)
    w = torch.randn(4000) * 1.2  # a good share beyond ±α
    g = torch.randn(4000)
    grad_w, grad_alpha = _backward(quantizer, w, g)

    w64, g64 = w.double().numpy(), g.double().numpy()
    ratio = w64 / alpha
    q = weight_integers_reference(w64, alpha, bits)
    clipped = np.abs(ratio) > 1
    assert clipped.mean() > 0.1
    expected = (g64 * np.where(clipped, np.sign(ratio), q / n - ratio)).sum()
    assert grad_alpha.item() == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert torch.equal(grad_w, g)  # straight through, also outside the clip range


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_activation_gradients(bits, signed):
    """§2: dα = Σ g · [clip bound / α where clipped, else Q(x)/α − x/α]; dx = g inside the range, 0 outside.

    The clip bound over α is +1 above the range, and below it -1 (signed) or 0 (unsigned: with the
    project's lower clamp Q(x) = 0 for every α there, so its true derivative is 0).
    """
    alpha = 2.0
    quantizer = ActivationQuantizer(bits, signed=signed, alpha_init=alpha)
    x = torch.randn(4000) * 2.0
    g = torch.randn(4000)
    grad_x, grad_alpha = _backward(quantizer, x, g)

    x64, g64 = x.double().numpy(), g.double().numpy()
    ratio = x64 / alpha
    levels = 2 ** (bits - 1) - 1 if signed else min(2**bits - 1, 127)
    q = activation_integers_reference(x64, alpha, bits, signed)
    lower = -1.0 if signed else 0.0
    above, below = ratio > 1, ratio < lower
    assert above.mean() > 0.1 and below.mean() > 0.1
    d_alpha = np.where(above, 1.0, np.where(below, lower, q / levels - ratio))
    assert grad_alpha.item() == pytest.approx((g64 * d_alpha).sum(), rel=1e-4, abs=1e-4)
    np.testing.assert_array_equal(grad_x.numpy(), np.where(above | below, 0.0, g.numpy()))


def test_per_channel_gradients():
    bits, channels = 3, 5
    n = 2 ** (bits - 1) - 1
    alphas = np.linspace(0.5, 2.5, channels)
    quantizer = PerChannelWeightQuantizer(bits, channels)
    with torch.no_grad():
        quantizer.alpha.copy_(torch.tensor(alphas, dtype=torch.float32))
    w = torch.randn(channels, 4, 3, 3) * 1.5
    g = torch.randn(channels, 4, 3, 3)
    grad_w, grad_alpha = _backward(quantizer, w, g)
    assert grad_alpha.shape == (channels,)
    for c, alpha in enumerate(alphas):
        w64, g64 = w[c].double().numpy(), g[c].double().numpy()
        ratio = w64 / alpha
        q = weight_integers_reference(w64, alpha, bits)
        expected = (g64 * np.where(np.abs(ratio) > 1, np.sign(ratio), q / n - ratio)).sum()
        assert grad_alpha[c].item() == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert torch.equal(grad_w, g)


def test_max_abs_gradient_is_straight_through():
    w = torch.randn(3, 8)
    g = torch.randn(3, 8)
    quantizer = MaxAbsWeightQuantizer()
    w_leaf = w.clone().requires_grad_(True)
    (quantizer(w_leaf) * g).sum().backward()
    assert torch.equal(w_leaf.grad, g)


@pytest.mark.parametrize(
    "quantizer",
    [
        UniformWeightQuantizer(4, alpha_init=1.5),
        ActivationQuantizer(4, signed=True, alpha_init=1.5),
        ActivationQuantizer(4, signed=False, alpha_init=1.5),
        PowerOfTwoWeightQuantizer(3, alpha_init=1.5),
    ],
    ids=["weight", "act-signed", "act-unsigned", "power-of-two"],
)
def test_gradcheck_alpha_in_clipped_region(quantizer):
    """Where every input is clipped, Q = ±α (or 0) is smooth in α: the custom gradient is the true one."""
    quantizer = quantizer.double()
    magnitude = torch.rand(64, dtype=torch.float64) * 2 + 1.7  # |x| in [1.7, 3.7] > α = 1.5 (and > α ± eps)
    x = magnitude * torch.where(torch.rand(64) > 0.5, 1.0, -1.0).double()
    alpha = quantizer.alpha.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: functional_call(quantizer, {"alpha": a}, (x,)), (alpha,))


@pytest.mark.parametrize("bits", [4, 8])
def test_full_range_signed_activation_quantizer(bits):
    """QuantSpec target "cpu": [-n - 1, n] at scale alpha / n; gradients as above with the lower bound -(n + 1)/n."""
    alpha = 2.0
    quantizer = ActivationQuantizer(bits, signed=True, alpha_init=alpha, full_range=True)
    n = 2 ** (bits - 1) - 1
    assert quantizer.int_range == (-n - 1, n)
    x = torch.randn(4000) * 2.0
    g = torch.randn(4000)
    q, scale = quantizer.integers(x)
    x64 = x.double().numpy()
    expected = np.clip(np.round(x.numpy() / np.float32(alpha / n)), -n - 1, n)
    np.testing.assert_array_equal(q.numpy(), expected)
    assert q.min().item() == -n - 1
    grad_x, grad_alpha = _backward(quantizer, x, g)
    ratio = x64 / alpha
    lower = -(n + 1) / n
    above, below = ratio > 1, ratio < lower
    d_alpha = np.where(above, 1.0, np.where(below, lower, expected / n - ratio))
    assert grad_alpha.item() == pytest.approx((g.double().numpy() * d_alpha).sum(), rel=1e-4, abs=1e-4)
    np.testing.assert_array_equal(grad_x.numpy(), np.where(above | below, 0.0, g.numpy()))


@pytest.mark.parametrize("bits", [4, 8])
def test_full_range_unsigned_activation_quantizer(bits):
    """QuantSpec full_range_8bit: unsigned [0, 2^b - 1] at scale alpha / (2^b - 1), uncapped (uint8's 255 at 8 bits)."""
    alpha = 3.0
    quantizer = ActivationQuantizer(bits, signed=False, alpha_init=alpha, full_range=True)
    m = 2**bits - 1
    assert quantizer.int_range == (0, m)
    if bits < 8:  # below 8 bits the portable range is already all of it
        assert ActivationQuantizer(bits, signed=False).int_range == (0, m)
    x = torch.randn(4000) * 3.0
    q, scale = quantizer.integers(x)
    expected = np.clip(np.round(x.numpy() / np.float32(alpha / m)), 0, m)
    np.testing.assert_array_equal(q.numpy(), expected)
    assert q.max().item() == m and float(scale) == pytest.approx(alpha / m)
