"""FAT transform (METHOD.md §1.1–1.5) against a numpy float64 reference built on an explicit DFT matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

from fatq.transform import FATTransform

# Conv and linear weight shapes; N = numel / C_out covers primes, odd composites and powers of two.
SHAPES = [
    (8, 3, 3, 3),  # conv, N = 27
    (6, 1, 3, 3),  # depthwise conv, N = 9
    (5, 12, 5, 5),  # conv, N = 300
    (16, 5, 1, 1),  # 1x1 conv, N = 5 (prime)
    (10, 7),  # linear, N = 7
    (4, 16),  # linear, N = 16
]


def dft_matrix(n: int) -> np.ndarray:
    """D[k, j] = exp(-2πi kj / n), complex128 [n, n]."""
    k = np.arange(n)
    return np.exp(-2j * np.pi * np.outer(k, k) / n)


def fat_transform_reference(
    weight: np.ndarray, mask: np.ndarray, mean: float | None = None, std: float | None = None
) -> np.ndarray:
    """METHOD.md §1.1–1.5 in float64 numpy.

    Args:
        weight: [C_out, ...].
        mask: T, [C_out, C_out] (the mask layer's weight, applied across channels per frequency).
        mean, std: standardization statistics; default: those of ``weight`` (std unbiased, as
            torch.std and the reference code compute it).
    """
    w = np.asarray(weight, dtype=np.float64)
    mean = w.mean() if mean is None else mean
    std = w.std(ddof=1) if std is None else std
    rows = ((w - mean) / std).reshape(w.shape[0], -1)
    d = dft_matrix(rows.shape[1])
    spectrum = rows @ d.T
    gate = 1.0 / (1.0 + np.exp(-(mask @ np.abs(spectrum))))
    filtered = (spectrum * gate) @ np.conj(d).T / rows.shape[1]
    return filtered.real.reshape(w.shape)


def make_transform(c_out: int, initial_mask: bool, dtype=torch.float32) -> FATTransform:
    transform = FATTransform(c_out).to(dtype)
    if not initial_mask:
        with torch.no_grad():
            transform.mask.weight.copy_(torch.randn(c_out, c_out, dtype=dtype) * 0.5)
    return transform


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("initial_mask", [True, False], ids=["initial-mask", "learned-mask"])
def test_transform_matches_numpy_dft(shape, initial_mask):
    weight = torch.randn(shape) * 0.1 + 0.02
    transform = make_transform(shape[0], initial_mask)
    expected = fat_transform_reference(weight.numpy(), transform.mask.weight.detach().numpy())
    with torch.no_grad():
        got32 = transform(weight)
        got64 = transform.double()(weight.double())
    assert got32.dtype == torch.float32 and got32.shape == weight.shape
    np.testing.assert_allclose(got32.numpy(), expected, rtol=0, atol=5e-5)
    assert got64.dtype == torch.float64
    np.testing.assert_allclose(got64.numpy(), expected, rtol=0, atol=1e-11)


def test_initial_mask_is_uniform():
    transform = FATTransform(12)
    assert torch.all(transform.mask.weight == 1.0 / 12)
    assert transform.mask.bias is None


def test_open_mask_returns_standardized_weight():
    """With the gate saturated at 1 the transform is only the standardization (closed form)."""
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64) * 0.3 + 0.1
    transform = FATTransform(4).double()
    with torch.no_grad():
        transform.mask.weight.fill_(200.0)
        got = transform(weight)
    expected = (weight - weight.mean()) / weight.std()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_half_precision_input_is_transformed_in_float32():
    weight = torch.randn(4, 8)
    transform = FATTransform(4)
    with torch.no_grad():
        got = transform(weight.bfloat16())
    assert got.dtype == torch.float32
    expected = fat_transform_reference(weight.bfloat16().float().numpy(), transform.mask.weight.detach().numpy())
    np.testing.assert_allclose(got.numpy(), expected, atol=5e-5)


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (5, 7)], ids=["conv", "linear"])
def test_gradcheck_wrt_mask(shape):
    weight = torch.randn(shape, dtype=torch.float64)
    transform = make_transform(shape[0], initial_mask=False, dtype=torch.float64)
    mask = transform.mask.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: functional_call(transform, {"mask.weight": t}, (weight,)), (mask,))


@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (3, 5)], ids=["conv", "linear"])
def test_weight_gradient_treats_statistics_as_constants(shape):
    """d(sum G*W_t)/dW against numpy central differences with μ and σ held fixed (METHOD.md §1.1).

    If the statistics carried gradient, autograd would add their terms and differ from this.
    """
    weight = torch.randn(shape, dtype=torch.float64)
    transform = make_transform(shape[0], initial_mask=False, dtype=torch.float64)
    upstream = torch.randn(shape, dtype=torch.float64)
    w = weight.clone().requires_grad_(True)
    (transform(w) * upstream).sum().backward()

    w0, mask, g = weight.numpy(), transform.mask.weight.detach().numpy(), upstream.numpy()
    mean, std = w0.mean(), w0.std(ddof=1)
    numeric = np.zeros_like(w0)
    eps = 1e-6
    for index in np.ndindex(w0.shape):
        plus, minus = w0.copy(), w0.copy()
        plus[index] += eps
        minus[index] -= eps
        f_plus = (fat_transform_reference(plus, mask, mean, std) * g).sum()
        f_minus = (fat_transform_reference(minus, mask, mean, std) * g).sum()
        numeric[index] = (f_plus - f_minus) / (2 * eps)
    np.testing.assert_allclose(w.grad.numpy(), numeric, rtol=1e-6, atol=1e-7)


def _mask_and_grad(transform: FATTransform, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmoid(S) [C_out, N], dLoss/dT) for a loss that depends on every output weight."""
    out = transform(weight)
    (out * torch.randn_like(out, generator=torch.Generator().manual_seed(1))).sum().backward()
    with torch.no_grad():
        w = weight.float()
        rows = ((w - w.mean()) / w.std()).reshape(w.shape[0], -1)
        gate = torch.sigmoid(transform.mask(torch.fft.fft(rows, dim=-1).abs().t()).t())
    return gate, transform.mask.weight.grad


def test_the_paper_mask_init_saturates_long_rows_and_unsaturated_does_not():
    """N = 576 (a 64-channel 3x3 conv): sigmoid(S) rounds to exactly 1.0 for most entries at T = 1/C_out,
    which get no gradient; T = 3/(C_out sqrt(N)) starts every entry below 1 with a gradient."""
    weight = torch.randn(64, 64, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.05
    gate, grad = _mask_and_grad(FATTransform(64, 576, "paper"), weight)
    assert (gate == 1.0).float().mean() > 0.5
    gate, grad = _mask_and_grad(FATTransform(64, 576, "unsaturated"), weight)
    assert (gate < 1.0).all() and 0.85 < gate.mean() < 0.97
    assert (grad != 0).all()
    with pytest.raises(ValueError, match="mask init"):
        FATTransform(4, 9, "zeros")
