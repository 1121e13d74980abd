"""A growing, exactly mergeable histogram of activation magnitudes, split by sign.

Bins are uniform over [0, num_bins * width) and the bin width is always a power of two. That
makes two operations exact (no count is lost or moved to a wrong bin):

* growth: when a batch holds a value beyond the range, the width doubles (as often as
  needed) and adjacent bin pairs are summed, because floor(x / 2w) == floor(floor(x / w) / 2);
* merging: two histograms (other batches, other DDP ranks) are brought to the larger of
  their widths the same way and added.

So a histogram collected batch by batch, or per rank and merged, equals the histogram
collected in one shot at the final width. Dividing by a power of two is exact in floating
point, so this holds bit for bit, not only up to rounding.

Positive and negative values are counted separately (by magnitude), so one collection serves
both a signed quantizer (which sees |x|) and an unsigned one (which maps negatives to 0).
Exact zeros are also counted on their own: after a ReLU they are often half of all values,
and a method may want to leave out values that every threshold represents exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fatq.errors import FatqError

DEFAULT_BINS = 2048


class MagnitudeHistogram:
    """Histogram of |x| for x >= 0 and for x < 0, over [0, num_bins * width).

    Attributes:
        num_bins: bins per sign (a power of two, so growth keeps the bin count).
        counts: float64 [2, num_bins] on CPU; row 0 counts x >= 0, row 1 counts x < 0 by |x|.
        zeros: how many of the values in row 0, bin 0 are exactly 0.
        width: bin width (a power of two), or None before any non-empty batch.
        min_value, max_value: exact extremes of everything collected (inf/-inf when empty).
    """

    def __init__(self, num_bins: int = DEFAULT_BINS):
        if num_bins < 2 or num_bins & (num_bins - 1):
            raise FatqError(f"histogram bins must be a power of two >= 2, got {num_bins}.")
        self.num_bins = num_bins
        self.reset()

    def reset(self) -> None:
        """Forget everything collected."""
        self.counts = torch.zeros(2, self.num_bins, dtype=torch.float64)
        self.zeros = 0.0
        self.width: float | None = None
        self.min_value = math.inf
        self.max_value = -math.inf

    @property
    def total(self) -> float:
        """Number of values collected."""
        return float(self.counts.sum())

    @property
    def upper_edge(self) -> float:
        """num_bins * width: every collected magnitude lies below it."""
        return self.num_bins * self.width if self.width is not None else 0.0

    @property
    def edges(self) -> Tensor:
        """Bin edges, float64 [num_bins + 1]."""
        return torch.arange(self.num_bins + 1, dtype=torch.float64) * (self.width or 0.0)

    def _width_for(self, peak: float) -> float:
        """Smallest power-of-two width with peak < num_bins * width."""
        if peak <= 0:
            return 2.0**-126  # all zeros so far: any width holds them in bin 0; growth is cheap
        return 2.0 ** (math.floor(math.log2(peak / self.num_bins)) + 1)

    def _coarsen(self, width: float) -> None:
        """Re-bin to a larger power-of-two ``width`` by summing groups of 2^k adjacent bins."""
        factor = round(width / self.width)
        if factor <= 1:
            return
        if factor >= self.num_bins:
            merged = torch.zeros_like(self.counts)
            merged[:, 0] = self.counts.sum(dim=1)
        else:
            merged = torch.zeros_like(self.counts)
            merged[:, : self.num_bins // factor] = self.counts.reshape(2, -1, factor).sum(dim=2)
        self.counts = merged
        self.width = width

    def collect(self, x: Tensor) -> None:
        """Add every element of ``x`` (any shape, float dtype, any device)."""
        x = x.detach().float().flatten()
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x)
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise FatqError("calibration data holds NaN or infinite activations; check the model and inputs.")
        peak = max(abs(lo), abs(hi))
        needed = self._width_for(peak)
        if self.width is None:
            self.width = needed
        elif needed > self.width:
            self._coarsen(needed)
        index = torch.floor(x.abs() / self.width).long()
        index += (x < 0).long() * self.num_bins
        counts = torch.bincount(index, minlength=2 * self.num_bins).reshape(2, self.num_bins)
        self.counts += counts.to(device="cpu", dtype=torch.float64)
        self.zeros += float((x == 0).sum())
        self.min_value = min(self.min_value, lo)
        self.max_value = max(self.max_value, hi)

    def merge(self, other: MagnitudeHistogram) -> None:
        """Add ``other``'s counts (exact: both are brought to the larger width first)."""
        if other.num_bins != self.num_bins:
            raise FatqError(f"cannot merge histograms of {self.num_bins} and {other.num_bins} bins.")
        if other.width is None:
            return
        if self.width is None:
            self.width = other.width
        incoming = MagnitudeHistogram(self.num_bins)
        incoming.counts, incoming.width = other.counts.clone(), other.width
        width = max(self.width, other.width)
        self._coarsen(width)
        incoming._coarsen(width)
        self.counts += incoming.counts
        self.zeros += other.zeros
        self.min_value = min(self.min_value, other.min_value)
        self.max_value = max(self.max_value, other.max_value)

    def all_reduce(self, device: torch.device | str = "cpu") -> None:
        """Merge this histogram across all ranks of the default process group (no-op without one).

        Every rank ends with the same, global histogram. ``device`` is where the collectives run:
        "cpu" for gloo, the rank's CUDA device for NCCL.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        # Widths are powers of two: reduce their exponents (an empty rank contributes -inf).
        exponent = math.log2(self.width) if self.width is not None else -math.inf
        stats = torch.tensor([exponent, self.max_value, -self.min_value], dtype=torch.float64, device=device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        if math.isinf(stats[0].item()):
            return  # no rank collected anything
        width = 2.0 ** stats[0].item()
        if self.width is None:
            self.width = width
        self._coarsen(width)
        counts = torch.cat([self.counts.flatten(), torch.tensor([self.zeros], dtype=torch.float64)]).to(device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        counts = counts.cpu()
        self.counts, self.zeros = counts[:-1].reshape(2, self.num_bins), float(counts[-1])
        self.max_value, self.min_value = stats[1].item(), -stats[2].item()

    def magnitudes(self, signed: bool, drop_exact: bool = False) -> Tensor:
        """Counts of the values a quantizer sees, float64 [num_bins] over ``edges``.

        Signed: |x| of every value. Unsigned: the positive values; negatives are clipped to 0 by
        the quantizer, so they are counted in bin 0.

        Args:
            signed: for a signed (symmetric) or an unsigned quantizer.
            drop_exact: leave out the values that every threshold maps to exactly 0 with no
                error: exact zeros, and for an unsigned quantizer the negatives.
        """
        if signed:
            counts = self.counts.sum(dim=0)
        else:
            counts = self.counts[0].clone()
            if not drop_exact:
                counts[0] += self.counts[1].sum()
        if drop_exact:
            counts[0] -= self.zeros
        return counts
