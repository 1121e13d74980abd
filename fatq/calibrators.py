"""Range calibrators: min-max, percentile, entropy (KL divergence) and MSE, plus a registry.

Every calibrator has the shape ONNX Runtime's and ModelOpt's calibrators share:
``collect(tensor)`` over any number of batches, ``compute(bits, signed) -> Range``, ``reset()``,
and for data-parallel calibration ``merge(other)`` / ``all_reduce()``. The clipping threshold
alpha a calibrator returns is in the units of the activation; the quantizer's scale is
alpha / levels with the project's level counts (``fatq.quantizers``: signed n = 2^(b-1) - 1,
unsigned m = min(2^b - 1, 127)).

The histogram methods share :class:`~fatq.histogram.MagnitudeHistogram` (2048 bins by
default, power-of-two bin width, exact growth and merging). After growth the occupied part of
the histogram spans between half and all of its bins; the entropy and MSE searches run over
the occupied bins only.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from fatq.errors import FatqError
from fatq.histogram import DEFAULT_BINS, MagnitudeHistogram
from fatq.quantizers import check_bits, signed_levels, unsigned_levels

MIN_ALPHA = 1e-8  # the floor ActivationQuantizer.set_range applies: a constant-zero tensor still gets a range


@dataclass(frozen=True)
class Range:
    """A calibrated quantization range.

    Attributes:
        alpha: clipping threshold (> 0); the quantizer clips to [0, alpha] or [-alpha, alpha].
        scale: alpha / levels, the QuantizeLinear scale.
        bits: bit-width it was computed for.
        signed: symmetric signed range (True) or unsigned [0, alpha] (False).
        levels: positive integer levels (n or m).
    """

    alpha: float
    scale: float
    bits: int
    signed: bool
    levels: int


def levels_for(bits: int, signed: bool) -> int:
    """Positive integer levels of an activation quantizer with these settings."""
    check_bits(bits, "calibration bits")
    return signed_levels(bits) if signed else unsigned_levels(bits)


def make_range(alpha: float, bits: int, signed: bool) -> Range:
    """A :class:`Range` for threshold ``alpha`` (floored at :data:`MIN_ALPHA`)."""
    levels = levels_for(bits, signed)
    alpha = max(float(alpha), MIN_ALPHA)
    return Range(alpha=alpha, scale=alpha / levels, bits=bits, signed=signed, levels=levels)


class Calibrator(ABC):
    """Collects statistics of one tensor over batches and turns them into a range."""

    name: str = ""

    @property
    @abstractmethod
    def empty(self) -> bool:
        """True until a non-empty batch was collected."""

    @abstractmethod
    def collect(self, x: Tensor) -> None:
        """Add one batch (any shape, float dtype, any device)."""

    @abstractmethod
    def compute(self, bits: int, signed: bool) -> Range:
        """The range for a quantizer of ``bits`` bits and this signedness; FatqError if empty."""

    @abstractmethod
    def reset(self) -> None:
        """Forget everything collected."""

    @abstractmethod
    def merge(self, other: Calibrator) -> None:
        """Add the statistics ``other`` (same class and settings) collected."""

    @abstractmethod
    def all_reduce(self, device: torch.device | str = "cpu") -> None:
        """Merge the statistics of every rank of the default process group (no-op without one)."""

    def _check_same(self, other: Calibrator) -> None:
        if type(other) is not type(self):
            raise FatqError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}.")


class MinMaxCalibrator(Calibrator):
    """alpha = max|x| (signed) or max(x, 0) (unsigned) over everything collected."""

    name = "minmax"

    def __init__(self):
        self.reset()

    @property
    def empty(self) -> bool:
        return not math.isfinite(self.max_value)

    def reset(self) -> None:
        self.min_value, self.max_value = math.inf, -math.inf

    def collect(self, x: Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(x.float()))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise FatqError("calibration data holds NaN or infinite activations; check the model and inputs.")
        self.min_value, self.max_value = min(self.min_value, lo), max(self.max_value, hi)

    def compute(self, bits: int, signed: bool) -> Range:
        if self.empty:
            raise FatqError("the min-max calibrator has collected no data.")
        alpha = max(abs(self.min_value), abs(self.max_value)) if signed else max(self.max_value, 0.0)
        return make_range(alpha, bits, signed)

    def merge(self, other: Calibrator) -> None:
        self._check_same(other)
        self.min_value = min(self.min_value, other.min_value)
        self.max_value = max(self.max_value, other.max_value)

    def all_reduce(self, device: torch.device | str = "cpu") -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        stats = torch.tensor([self.max_value, -self.min_value], dtype=torch.float64, device=device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        self.max_value, self.min_value = stats[0].item(), -stats[1].item()


class HistogramCalibrator(Calibrator):
    """Base of the methods that choose alpha from a :class:`MagnitudeHistogram`."""

    drop_exact = False  # leave out values every threshold represents exactly (see MagnitudeHistogram)

    def __init__(self, num_bins: int = DEFAULT_BINS):
        self.histogram = MagnitudeHistogram(num_bins)

    @property
    def empty(self) -> bool:
        return self.histogram.width is None

    def reset(self) -> None:
        self.histogram.reset()

    def collect(self, x: Tensor) -> None:
        self.histogram.collect(x)

    def merge(self, other: Calibrator) -> None:
        self._check_same(other)
        self.histogram.merge(other.histogram)

    def all_reduce(self, device: torch.device | str = "cpu") -> None:
        self.histogram.all_reduce(device)

    def _occupied(self, signed: bool) -> tuple[Tensor, float, float]:
        """(counts up to the last non-empty bin [k] float64, bin width, exact max magnitude)."""
        hist = self.histogram
        if self.empty:
            raise FatqError(f"the {self.name} calibrator has collected no data.")
        counts = hist.magnitudes(signed, self.drop_exact)
        nonzero = torch.nonzero(counts).flatten()
        occupied = int(nonzero[-1]) + 1 if nonzero.numel() else 1
        peak = max(abs(hist.min_value), abs(hist.max_value)) if signed else max(hist.max_value, 0.0)
        return counts[:occupied], hist.width, peak

    def compute(self, bits: int, signed: bool) -> Range:
        counts, width, peak = self._occupied(signed)
        levels = levels_for(bits, signed)
        return make_range(min(self._threshold(counts, width, levels), peak), bits, signed)

    @abstractmethod
    def _threshold(self, counts: Tensor, width: float, levels: int) -> float:
        """alpha from occupied magnitude counts [k] (bin j covers [j*width, (j+1)*width))."""


class PercentileCalibrator(HistogramCalibrator):
    """alpha = the given percentile of |x| (signed) or of max(x, 0) (unsigned).

    Linear interpolation inside the bin where the cumulative count crosses the percentile,
    so the error is below one bin width.

    Args:
        percentile: in (0, 100]; 99.99 by default.
        num_bins: histogram bins.
    """

    name = "percentile"

    def __init__(self, percentile: float = 99.99, num_bins: int = DEFAULT_BINS):
        if not 0 < percentile <= 100:
            raise FatqError(f"percentile must be in (0, 100], got {percentile}.")
        super().__init__(num_bins)
        self.percentile = float(percentile)

    def _threshold(self, counts: Tensor, width: float, levels: int) -> float:
        cumulative = torch.cumsum(counts, 0)
        target = self.percentile / 100.0 * float(cumulative[-1])
        j = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64)))
        j = min(j, counts.numel() - 1)
        below = float(cumulative[j - 1]) if j > 0 else 0.0
        fraction = (target - below) / float(counts[j]) if counts[j] > 0 else 1.0
        return (j + fraction) * width


def entropy_divergences(counts: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """KL(P || Q) of TensorRT's entropy calibration for every candidate threshold bin i.

    For a candidate i (threshold i * width), P is the histogram clipped to its first i bins with
    the outliers beyond added to bin i - 1; Q splits bins 0..i-1 into ``groups`` consecutive
    groups (bin j belongs to group floor(j * groups / i)), and spreads each group's count evenly
    over the group's non-empty bins (empty bins stay empty). Both are normalised. Candidates run
    from i = groups (one bin per group) to the number of bins.

    Computed for all candidates at once from cumulative sums over the groups: with
    S_g = group total, n_g = its non-empty bins, q_j = S_g / n_g,
    sum_j P_j log(P_j / q_j) = sum_g (sum_{j in g} h_j log h_j - S_g log(S_g / n_g)), corrected
    for bin i - 1, where P differs from the histogram.

    Args:
        counts: float64 [k] magnitude counts.
        groups: quantized bins (levels + 1: 128 for int8 as in TensorRT).

    Returns:
        (candidates int64 [c], divergences float64 [c]); +inf where P has mass on an empty bin of Q.
    """
    h = counts.to(torch.float64)
    k = h.numel()
    if k < groups:
        return torch.tensor([k]), torch.zeros(1, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    cum = torch.cat([zero, torch.cumsum(h, 0)])
    cum_nonzero = torch.cat([zero, torch.cumsum((h > 0).double(), 0)])
    h_log_h = torch.where(h > 0, h * torch.log(torch.where(h > 0, h, 1.0)), 0.0)
    cum_hlogh = torch.cat([zero, torch.cumsum(h_log_h, 0)])

    candidates = torch.arange(groups, k + 1)  # [c]
    g = torch.arange(groups + 1)  # group boundaries: start of group g is ceil(g * i / groups)
    bounds = (g[None, :] * candidates[:, None] + groups - 1) // groups  # [c, groups + 1]
    starts, ends = bounds[:, :-1], bounds[:, 1:]
    sums = cum[ends] - cum[starts]
    nonzero = cum_nonzero[ends] - cum_nonzero[starts]
    safe = sums > 0
    per_group = (cum_hlogh[ends] - cum_hlogh[starts]) - torch.where(
        safe, sums * torch.log(torch.where(safe, sums / nonzero.clamp_min(1), 1.0)), 0.0
    )
    cross = per_group.sum(dim=1)  # sum_j h_j log(h_j / q_j) over bins < i

    total = float(cum[-1])
    last = h[candidates - 1]
    outliers = total - cum[candidates]
    last_q = torch.where(safe[:, -1], sums[:, -1] / nonzero[:, -1].clamp_min(1), 1.0)
    p_last = last + outliers
    correction = torch.where(p_last > 0, p_last * torch.log(torch.where(p_last > 0, p_last, 1.0) / last_q), 0.0)
    correction -= torch.where(last > 0, last * torch.log(torch.where(last > 0, last, 1.0) / last_q), 0.0)
    clipped_total = cum[candidates]
    kl = (cross + correction) / total + torch.log(clipped_total / total)
    kl = torch.where((last == 0) & (outliers > 0), torch.full_like(kl, math.inf), kl)
    return candidates, kl


class EntropyCalibrator(HistogramCalibrator):
    """alpha minimising the KL divergence between the clipped and the quantized distribution.

    TensorRT's entropy calibration (its 2017 GTC talk "8-bit Inference with TensorRT"), with
    the number of quantized bins generalised from 128 (int8) to the quantizer's non-negative
    integer values, levels + 1 (signed b bits: 2^(b-1); unsigned: m + 1). The threshold is the
    upper edge of the last included bin; among equal divergences the largest threshold wins.

    Values every threshold represents exactly (exact zeros; negatives for an unsigned
    quantizer) are left out of the histogram. After a ReLU they are about half of all values,
    all in bin 0: kept in, that spike dominates the divergence, which is then smallest when each
    group holds a single bin, i.e. at the smallest candidate threshold (measured: ResNet-20
    thresholds collapsed to 128 bins and accuracy to chance). ModelOpt's entropy calibrator
    guards against the same spike by overwriting bin 0 with bin 1.
    """

    name = "entropy"
    drop_exact = True

    def _threshold(self, counts: Tensor, width: float, levels: int) -> float:
        if float(counts.sum()) <= 0:
            return width  # nothing but exact zeros: any threshold is exact
        candidates, kl = entropy_divergences(counts, levels + 1)
        best = torch.nonzero(kl == kl.min()).flatten()[-1]
        return float(candidates[best]) * width


class MSECalibrator(HistogramCalibrator):
    """alpha minimising the expected squared quantization error over the histogram.

    Candidates are bin edges j * width; a bin's values are represented by its centre (the bins
    are much narrower than a quantization step at 2048 bins). Values beyond alpha are clipped to
    it, so the errors of clipping and of rounding are both counted. The search visits every
    8th edge, then every edge around the best of those (the error curve is smooth at that
    scale), which is 6-7 times cheaper than visiting all of them.
    """

    name = "mse"
    _STRIDE = 8
    _CHUNK = 256  # candidates per step: bounds memory at chunk * bins float64

    def _errors(self, candidates: Tensor, counts: Tensor, width: float, levels: int) -> Tensor:
        """Expected squared error (times the count) for thresholds ``candidates * width``, float64 [c]."""
        centres = (torch.arange(counts.numel(), dtype=torch.float64) + 0.5) * width
        errors = []
        for chunk in candidates.split(self._CHUNK):
            step = (chunk.double() * width / levels)[:, None]
            quantized = torch.clamp(torch.round(centres[None, :] / step), 0, levels) * step
            errors.append(((centres[None, :] - quantized) ** 2 * counts[None, :]).sum(dim=1))
        return torch.cat(errors)

    def _threshold(self, counts: Tensor, width: float, levels: int) -> float:
        k = counts.numel()
        coarse = torch.unique(torch.cat([torch.arange(1, k + 1, self._STRIDE), torch.tensor([k])]))
        best = int(coarse[int(torch.argmin(self._errors(coarse, counts, width, levels)))])
        fine = torch.arange(max(1, best - self._STRIDE + 1), min(k, best + self._STRIDE - 1) + 1)
        return float(fine[int(torch.argmin(self._errors(fine, counts, width, levels)))]) * width


CALIBRATORS: dict[str, type[Calibrator]] = {
    "minmax": MinMaxCalibrator,
    "percentile": PercentileCalibrator,
    "entropy": EntropyCalibrator,
    "mse": MSECalibrator,
}


def make_calibrator(method: str, **options) -> Calibrator:
    """A new calibrator of ``method`` (a key of :data:`CALIBRATORS`) with its options.

    Options: ``num_bins`` for the histogram methods, ``percentile`` for "percentile".
    """
    try:
        cls = CALIBRATORS[method]
    except KeyError:
        raise FatqError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATORS)}.") from None
    try:
        return cls(**options)
    except TypeError:
        raise FatqError(f"calibration method {method!r} takes no option(s) {sorted(options)}.") from None
