"""Calibrators against closed forms, brute force and a direct numpy implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fatq.calibrators import (
    CALIBRATORS,
    EntropyCalibrator,
    MinMaxCalibrator,
    MSECalibrator,
    PercentileCalibrator,
    entropy_divergences,
    make_calibrator,
)
from fatq.errors import FatqError
from fatq.histogram import MagnitudeHistogram


def _gaussian(n=200_000, seed=0, sigma=1.0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) * sigma


def _collect(calibrator, data, chunks=4):
    for part in data.chunk(chunks):
        calibrator.collect(part)
    return calibrator


# --- histogram ---------------------------------------------------------------------------------


def test_histogram_growth_keeps_counts_and_equals_one_shot():
    g = torch.Generator().manual_seed(1)
    # ranges grow over the batches (0.01 -> 100) so the histogram re-bins several times
    parts = [torch.randn(1000, generator=g) * s for s in (0.01, 0.5, 3.0, 100.0, 1.0)]
    grown = MagnitudeHistogram(256)
    for p in parts:
        grown.collect(p)
    one_shot = MagnitudeHistogram(256)
    one_shot.collect(torch.cat(parts))
    assert grown.total == 5000
    assert grown.width == one_shot.width
    assert torch.equal(grown.counts, one_shot.counts)
    data = torch.cat(parts)
    assert grown.min_value == float(data.min()) and grown.max_value == float(data.max())
    assert float(data.abs().max()) < grown.upper_edge <= 2 * float(data.abs().max())


def test_histogram_counts_match_numpy_and_split_sign():
    data = torch.tensor([-3.0, -0.2, 0.0, 0.1, 0.1, 2.9, 5.0])
    hist = MagnitudeHistogram(8)
    hist.collect(data)
    assert hist.width == 1.0  # 5 / 8 -> smallest power of two w with 5 < 8 w
    pos = np.histogram(data[data >= 0].numpy(), bins=8, range=(0, 8))[0]
    neg = np.histogram((-data[data < 0]).numpy(), bins=8, range=(0, 8))[0]
    assert hist.counts[0].tolist() == pos.tolist()
    assert hist.counts[1].tolist() == neg.tolist()
    assert hist.magnitudes(signed=True).tolist() == (pos + neg).tolist()
    unsigned = hist.magnitudes(signed=False)
    assert unsigned[0] == pos[0] + 2 and unsigned.sum() == 7  # negatives clip to 0
    assert hist.zeros == 1
    assert hist.magnitudes(signed=False, drop_exact=True).tolist() == (pos - np.eye(8)[0]).tolist()
    assert hist.magnitudes(signed=True, drop_exact=True).sum() == 6


def test_histogram_merge_equals_one_shot():
    g = torch.Generator().manual_seed(2)
    a, b = torch.relu(torch.randn(3000, generator=g) * 0.1), torch.randn(2000, generator=g) * 7
    ha, hb, whole = MagnitudeHistogram(512), MagnitudeHistogram(512), MagnitudeHistogram(512)
    ha.collect(a)
    hb.collect(b)
    whole.collect(torch.cat([a, b]))
    hb_first = MagnitudeHistogram(512)
    hb_first.merge(hb)
    hb_first.merge(ha)  # merging in the other order, into an empty histogram
    ha.merge(hb)
    for merged in (ha, hb_first):
        assert merged.width == whole.width
        assert torch.equal(merged.counts, whole.counts) and merged.zeros == whole.zeros
        assert merged.min_value == whole.min_value and merged.max_value == whole.max_value


def test_histogram_zeros_then_data_and_bad_input():
    hist = MagnitudeHistogram(64)
    hist.collect(torch.zeros(10))
    hist.collect(torch.tensor([1e6, -3.0]))
    assert hist.total == 12 and hist.counts[0, 0] == 10
    with pytest.raises(FatqError, match="NaN or infinite"):
        hist.collect(torch.tensor([1.0, math.nan]))
    with pytest.raises(FatqError, match="power of two"):
        MagnitudeHistogram(1000)


# --- min-max and percentile ---------------------------------------------------------------------


def test_minmax_uniform_closed_form():
    data = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) * 6 - 2  # U(-2, 4)
    cal = _collect(MinMaxCalibrator(), data)
    signed = cal.compute(8, signed=True)
    assert signed.alpha == pytest.approx(float(data.abs().max()))
    assert signed.scale == pytest.approx(signed.alpha / 127)
    unsigned = cal.compute(4, signed=False)
    assert unsigned.alpha == pytest.approx(float(data.max())) and unsigned.levels == 15
    assert float(data.max()) == pytest.approx(4, abs=1e-2)


@pytest.mark.parametrize("percentile", [90.0, 99.0, 99.99])
def test_percentile_gaussian_and_uniform(percentile):
    data = _gaussian()
    cal = _collect(PercentileCalibrator(percentile), data)
    width = cal.histogram.width
    expected = float(np.percentile(data.abs().numpy(), percentile))
    assert cal.compute(8, signed=True).alpha == pytest.approx(expected, abs=width)
    # closed form for |N(0, 1)|: P(|x| < t) = erf(t / sqrt 2)
    t = cal.compute(8, signed=True).alpha
    assert math.erf(t / math.sqrt(2)) == pytest.approx(percentile / 100, abs=5 * math.sqrt(1e-4 / 2e5) + 2e-3)
    uniform = torch.rand(100_000, generator=torch.Generator().manual_seed(3)) * 3  # U(0, 3)
    ucal = _collect(PercentileCalibrator(percentile), uniform)
    assert ucal.compute(8, signed=False).alpha == pytest.approx(3 * percentile / 100, abs=0.01)


def test_percentile_100_is_max_and_unsigned_ignores_negatives():
    data = torch.tensor([-10.0, 0.5, 1.0, 2.0])
    cal = _collect(PercentileCalibrator(100.0), data, chunks=2)
    assert cal.compute(8, signed=True).alpha == 10.0
    assert cal.compute(8, signed=False).alpha == 2.0


# --- MSE: brute force over thresholds on the raw samples ---------------------------------------


def _empirical_mse(x: np.ndarray, alpha: float, levels: int, signed: bool) -> float:
    step = alpha / levels
    lo = -levels if signed else 0
    q = np.clip(np.round(x / step), lo, levels) * step
    return float(np.mean((x - q) ** 2))


@pytest.mark.parametrize(
    ("dist", "bits", "signed"), [("gauss", 4, True), ("gauss", 8, True), ("relu", 4, False), ("uniform", 3, False)]
)
def test_mse_matches_brute_force(dist, bits, signed):
    x = _gaussian(100_000)
    if dist == "relu":
        x = torch.relu(x)
    elif dist == "uniform":
        x = torch.rand(100_000, generator=torch.Generator().manual_seed(5)) * 2
    cal = _collect(MSECalibrator(), x)
    rng = cal.compute(bits, signed)
    xs = x.numpy().astype(np.float64)
    peak = float(np.abs(xs).max())
    grid = np.linspace(peak / 200, peak, 600)
    errors = [_empirical_mse(xs, a, rng.levels, signed) for a in grid]
    best = min(errors)
    assert _empirical_mse(xs, rng.alpha, rng.levels, signed) <= best * 1.01
    assert rng.alpha == pytest.approx(grid[int(np.argmin(errors))], rel=0.1)


# --- entropy: a direct numpy implementation of TensorRT's procedure -----------------------------


def _reference_kl(h: np.ndarray, groups: int) -> dict[int, float]:
    """Loop over candidates exactly as TensorRT's GTC 2017 pseudo-code describes."""
    result = {}
    for i in range(groups, len(h) + 1):
        p = h[:i].astype(np.float64).copy()
        p[i - 1] += h[i:].sum()
        q = np.zeros(i)
        group_of = (np.arange(i) * groups) // i
        for g in range(groups):
            members = np.flatnonzero(group_of == g)
            nonempty = members[h[members] > 0]
            if nonempty.size:
                q[nonempty] = h[members].sum() / nonempty.size
        p, q = p / p.sum(), q / q.sum()
        support = p > 0
        if np.any(q[support] == 0):
            result[i] = math.inf
        else:
            result[i] = float(np.sum(p[support] * np.log(p[support] / q[support])))
    return result


@pytest.mark.parametrize("groups", [8, 16, 128])
def test_entropy_divergences_match_direct_numpy(groups):
    rng = np.random.default_rng(groups)
    bins = 300
    gauss = np.histogram(np.abs(rng.standard_normal(50_000)), bins=bins, range=(0, 5))[0].astype(np.float64)
    gappy = rng.integers(0, 50, size=bins).astype(np.float64)
    gappy[rng.random(bins) < 0.3] = 0  # empty bins inside, including near candidates' last bins
    for h in (gauss, gappy):
        candidates, kl = entropy_divergences(torch.from_numpy(h), groups)
        reference = _reference_kl(h, groups)
        assert candidates.tolist() == list(reference)
        ref = np.array(list(reference.values()))
        finite = np.isfinite(ref)
        assert np.array_equal(np.isfinite(kl.numpy()), finite)
        np.testing.assert_allclose(kl.numpy()[finite], ref[finite], rtol=1e-9, atol=1e-12)


def test_entropy_threshold_is_argmin_edge():
    data = _gaussian(100_000)
    cal = _collect(EntropyCalibrator(num_bins=512), data)
    counts = cal.histogram.magnitudes(signed=True)
    counts = counts[: int(torch.nonzero(counts).max()) + 1]
    reference = _reference_kl(counts.numpy(), 128)
    best = min(reference.values())
    i = max(c for c, v in reference.items() if v == best)
    rng = cal.compute(8, signed=True)
    assert rng.alpha == pytest.approx(i * cal.histogram.width)
    assert 2.0 < rng.alpha < float(data.abs().max())  # clips the tail, keeps the bulk
    low = cal.compute(4, signed=True).alpha
    assert low < rng.alpha  # fewer levels -> more clipping


def test_entropy_ignores_the_relu_zero_spike():
    # half the values of a ReLU output are exactly 0; kept in bin 0, that spike pulls the
    # threshold down (towards one bin per group); left out, the bulk of the tail is kept
    x = torch.relu(_gaussian(100_000))
    cal = _collect(EntropyCalibrator(), x)
    alpha = cal.compute(8, signed=False).alpha
    with_zeros = cal.histogram.magnitudes(signed=False)
    with_zeros = with_zeros[: int(torch.nonzero(with_zeros).max()) + 1]
    candidates, kl = entropy_divergences(with_zeros, 128)
    kept = float(candidates[int(torch.argmin(kl))]) * cal.histogram.width
    assert kept < 0.6 * alpha  # the failure mode, if the zeros were kept
    assert 3.0 < alpha <= float(x.max())
    only_zeros = _collect(EntropyCalibrator(), torch.zeros(100))
    assert only_zeros.compute(8, signed=True).alpha > 0


# --- registry, merging, reset --------------------------------------------------------------------


def test_registry_and_options():
    assert set(CALIBRATORS) == {"minmax", "percentile", "entropy", "mse"}
    assert isinstance(make_calibrator("percentile", percentile=99.9), PercentileCalibrator)
    with pytest.raises(FatqError, match="unknown calibration method"):
        make_calibrator("kl")
    with pytest.raises(FatqError, match="takes no option"):
        make_calibrator("minmax", percentile=99.0)
    with pytest.raises(FatqError, match="percentile must be"):
        make_calibrator("percentile", percentile=0)


@pytest.mark.parametrize("method", list(CALIBRATORS))
def test_merge_equals_one_shot_and_reset(method):
    data = _gaussian(20_000, seed=4)
    a, b = make_calibrator(method), make_calibrator(method)
    a.collect(data[:5000] * 0.1)
    b.collect(data[5000:])
    whole = make_calibrator(method)
    whole.collect(torch.cat([data[:5000] * 0.1, data[5000:]]))
    a.merge(b)
    assert a.compute(6, signed=True) == whole.compute(6, signed=True)
    a.reset()
    assert a.empty
    with pytest.raises(FatqError, match="no data"):
        a.compute(8, signed=True)
    with pytest.raises(FatqError, match="cannot merge"):
        a.merge(make_calibrator("minmax" if method != "minmax" else "mse"))


def _ddp_worker(rank: int, world: int, folder: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    try:
        data = _gaussian(4000, seed=7)
        part = data[:1000] * 0.05 if rank == 0 else data[1000:] * 3
        alphas = {}
        for method in ("minmax", "entropy"):
            cal = make_calibrator(method)
            cal.collect(part)
            cal.all_reduce()
            alphas[method] = cal.compute(8, signed=True).alpha
    finally:
        dist.destroy_process_group()
    with open(f"{folder}/rank{rank}.json", "w") as f:
        json.dump(alphas, f)


def test_all_reduce_across_two_gloo_ranks(tmp_path):
    import json

    import torch.multiprocessing as mp

    # spawn, not fork: a child forked after the parent ran torch ops can deadlock in its thread pool
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    data = _gaussian(4000, seed=7)
    whole = torch.cat([data[:1000] * 0.05, data[1000:] * 3])
    for method in ("minmax", "entropy"):
        cal = make_calibrator(method)
        cal.collect(whole)
        expected = cal.compute(8, signed=True).alpha
        assert results[0][method] == results[1][method] == expected
