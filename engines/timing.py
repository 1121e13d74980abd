"""Latency measurement: warm-up, timed iterations, order statistics.

Runs that are compared with each other (int8 against fp32, one engine against another) are timed
*interleaved*: the iterations of every runner are split into rounds and the runners take turns,
so a slow phase of a shared machine hits all of them alike instead of whichever ran then.

Latency source: runners that time themselves on the device (TensorRT, with CUDA events) report
engine-only time, and host<->device copies separately; every other runner is timed by the wall
clock (``time.perf_counter_ns``) around :meth:`engines.runner.Runner.infer`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engines.runner import Runner
from fatq.errors import FatqError

PERCENTILES = {"p90": 90.0, "p99": 99.0}


@dataclass(frozen=True)
class LatencyStats:
    """Order statistics of per-call latencies in milliseconds (linear-interpolated percentiles)."""

    min: float
    median: float
    p90: float
    p99: float
    max: float
    mean: float
    count: int

    @classmethod
    def from_samples(cls, samples_ms: list[float] | np.ndarray) -> LatencyStats:
        values = np.asarray(samples_ms, dtype=np.float64)
        if values.size == 0:
            raise ValueError("no latency samples")
        return cls(
            min=float(values.min()),
            median=float(np.median(values)),
            p90=float(np.percentile(values, PERCENTILES["p90"])),
            p99=float(np.percentile(values, PERCENTILES["p99"])),
            max=float(values.max()),
            mean=float(values.mean()),
            count=int(values.size),
        )

    def to_dict(self) -> dict:
        return {
            "min": self.min,
            "median": self.median,
            "p90": self.p90,
            "p99": self.p99,
            "max": self.max,
            "mean": self.mean,
        }


@dataclass(frozen=True)
class TimingResult:
    """Timing of one runner at one batch size.

    Attributes:
        batch_size: images per call.
        latency: per-call latency (engine-only where ``source`` is "cuda-events").
        source: "wall-clock" or "cuda-events".
        transfers: {"h2d": LatencyStats, "d2h": LatencyStats} for device runners, else {}.
    """

    batch_size: int
    latency: LatencyStats
    source: str
    transfers: dict

    @property
    def throughput_ips(self) -> float:
        """Images per second at the median latency."""
        return self.batch_size / (self.latency.median / 1000.0)


class _Samples:
    """Per-runner accumulator of wall-clock and device-side timings."""

    def __init__(self):
        self.wall: list[float] = []
        self.device: dict[str, list[float]] = {"engine_ms": [], "h2d_ms": [], "d2h_ms": []}

    def add(self, runner: Runner, wall_ms: float) -> None:
        self.wall.append(wall_ms)
        timing = runner.last_timing()
        if timing:
            for key, values in self.device.items():
                values.append(float(timing[key]))

    def result(self, batch_size: int) -> TimingResult:
        if self.device["engine_ms"]:
            transfers = {
                "h2d": LatencyStats.from_samples(self.device["h2d_ms"]),
                "d2h": LatencyStats.from_samples(self.device["d2h_ms"]),
            }
            return TimingResult(
                batch_size, LatencyStats.from_samples(self.device["engine_ms"]), "cuda-events", transfers
            )
        return TimingResult(batch_size, LatencyStats.from_samples(self.wall), "wall-clock", {})


def time_interleaved(
    runners: dict[str, Runner],
    feeds: dict[str, dict[str, np.ndarray]],
    batch_size: int,
    warmup: int,
    iterations: int,
    rounds: int = 5,
    on_step: Callable[[], None] | None = None,
) -> dict[str, TimingResult]:
    """Time several active runners at one batch size, taking turns.

    Args:
        runners: {label: active runner}.
        feeds: {label: feed dict} with arrays of batch ``batch_size``.
        batch_size: images per call (for throughput).
        warmup: untimed calls per runner before timing (also compiles per-shape models).
        iterations: timed calls per runner, split over ``rounds`` turns.
        rounds: number of turns; each runner runs ``iterations / rounds`` timed calls per turn,
            after one untimed call.
        on_step: called after every timed or warm-up call (progress bars).

    Returns:
        {label: TimingResult}.
    """
    if iterations < 1 or warmup < 0:
        raise FatqError(f"need at least 1 iteration and 0 warm-up calls, got {iterations} and {warmup}.")
    rounds = max(1, min(rounds, iterations))
    for label, runner in runners.items():
        for _ in range(warmup):
            runner.infer(feeds[label])
            if on_step:
                on_step()
    samples = {label: _Samples() for label in runners}
    per_round = [iterations // rounds + (1 if r < iterations % rounds else 0) for r in range(rounds)]
    for count in per_round:
        for label, runner in runners.items():
            # one untimed call per turn: the runner that ran before may still hold the cores
            # (ONNX Runtime's spinning threads) and this runner's data has left the caches
            runner.infer(feeds[label])
            for _ in range(count):
                start = time.perf_counter_ns()
                runner.infer(feeds[label])
                samples[label].add(runner, (time.perf_counter_ns() - start) / 1e6)
                if on_step:
                    on_step()
    return {label: samples[label].result(batch_size) for label in runners}
