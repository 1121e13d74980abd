"""The FAT weight transform (METHOD.md §1.1–1.5): FFT, learned soft spectral mask, inverse FFT."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

UNSATURATED_SCALE = 3.0  # S ≈ 3 · 0.886 at init: sigmoid ≈ 0.93, derivative ≈ 0.06


class FATTransform(nn.Module):
    """W -> Re(IFFT(FFT(standardize(W)) * sigmoid(T(|FFT|)))) per output channel.

    Args:
        out_channels: C_out of the layer whose weights are transformed.
        row_length: N = numel / C_out, the length of the rows the FFT runs along.
        init: "paper" or "unsaturated" (below).

    The mask layer ``mask`` is ``Linear(C_out, C_out, bias=False)`` and mixes output channels at
    every frequency. The result is in standardized units (the learned alpha_w of the quantizer,
    init 3.0, clips it at about 3 sigma).

    Initialisation: "paper" sets every entry of T to 1 / C_out (METHOD.md §1.4), so S is the mean
    spectral magnitude over channels, about 0.886·sqrt(N) for standardized rows; sigmoid(S) rounds
    to exactly 1.0 in float32 once S > ~16.6 (N ≳ 350), and such a mask gets no gradient.
    "unsaturated" scales T by 3 / sqrt(N): S ≈ 2.7 and the mask starts near 0.93 with gradient.
    """

    def __init__(self, out_channels: int, row_length: int = 1, init: str = "paper"):
        super().__init__()
        if init not in ("paper", "unsaturated"):
            raise ValueError(f"mask init must be 'paper' or 'unsaturated', got {init!r}")
        self.mask = nn.Linear(out_channels, out_channels, bias=False)
        scale = 1.0 if init == "paper" else UNSATURATED_SCALE / math.sqrt(row_length)
        nn.init.constant_(self.mask.weight, scale / out_channels)

    def forward(self, weight: Tensor) -> Tensor:
        """Transform a weight [C_out, ...] into a tensor of the same shape, float32 (float64 for float64 input)."""
        # cuFFT in half precision handles only power-of-two sizes, and N = C_in*k*k rarely is:
        # compute the transform in float32 whatever autocast says (float64 stays float64, which
        # lets tests check gradients with torch.autograd.gradcheck).
        with torch.autocast(device_type=weight.device.type, enabled=False):
            w = weight.to(torch.promote_types(weight.dtype, torch.float32))
            mean, std = w.mean().detach(), w.std().detach()
            rows = ((w - mean) / std).reshape(w.shape[0], -1)  # [C_out, N]
            spectrum = torch.fft.fft(rows, dim=-1)  # complex [C_out, N]
            gate = torch.sigmoid(self.mask(spectrum.abs().t()).t())  # real [C_out, N]
            filtered = torch.fft.ifft(spectrum * gate, dim=-1).real
        return filtered.reshape(weight.shape)
