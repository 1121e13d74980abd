"""Which lattice values real inputs reach, so the engine-exact moves can avoid crossing those.

A move that clears a near-tie (:mod:`export.engine_exact`) carries a few reachable values of its lattice
across a rounding boundary, and each crossing changes the model wherever an input reaches that value.
Reachable is not the same as reached: an accumulator of a 16-channel 3×3 conv spans thousands of values, of
which calibration images reach the middle and rarely the tails, and a residual Add reaches few of its 255 × 255
input pairs often. :class:`LatticeVisits` counts, on calibration images, how often each accumulator value (per
integer layer and output channel) and each input pair (per residual Add) occurs; the lattices of
:mod:`export.tie_lattices` then weigh a crossing by those counts (:data:`VISIT_WEIGHT`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from export.deploy_graph import DeployGraph
from export.reference import DeployReference

# a crossing of a value calibration reached costs this many crossings of values it did not reach
VISIT_WEIGHT = 2.0**32


class _ChannelCounts:
    """Sorted visited values and their cumulative counts, one channel."""

    def __init__(self, values: np.ndarray, counts: np.ndarray):
        self.values = values
        self.cumulative = np.concatenate([[0], np.cumsum(counts)])

    def between(self, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        """Visits of values v with first <= v <= last (integer bounds, broadcast)."""
        low = np.searchsorted(self.values, first, side="left")
        high = np.searchsorted(self.values, last, side="right")
        return np.where(last >= first, self.cumulative[high] - self.cumulative[low], 0)


class LatticeVisits:
    """Visit counts of lattice values on calibration images.

    Attributes:
        accumulators: {integer layer node name: [per output channel: counts of its int8 accumulator values]}.
        pairs: {Add node name: counts [qmax_a − qmin_a + 1, qmax_b − qmin_b + 1] of its input integer pairs}.
        images: how many images were counted.
    """

    def __init__(self):
        self.accumulators: dict[str, list[_ChannelCounts]] = {}
        self.pairs: dict[str, np.ndarray] = {}
        self.images = 0

    @classmethod
    def measure(
        cls, graph: DeployGraph, images: torch.Tensor, arithmetic: str = "float", batch: int = 64
    ) -> LatticeVisits:
        """Count on ``images`` (normalized, [N, C, H, W]) by running ``graph`` (integer dialect) with the
        bias ``arithmetic`` of the file's engines ("int32" or "float")."""
        visits = cls()
        counter = _CountingReference(graph, visits, arithmetic)
        for start in range(0, len(images), batch):
            counter(images[start : start + batch])
        for name, histogram in counter.histograms.items():
            values = np.arange(histogram.low, histogram.low + histogram.counts.shape[1])
            visits.accumulators[name] = [_ChannelCounts(values[row > 0], row[row > 0]) for row in histogram.counts]
        visits.images = len(images)
        return visits


class _Histogram:
    """Counts of integer values per channel over a range [low, low + width) that grows as values arrive."""

    def __init__(self):
        self.low, self.counts = 0, None

    def add(self, values: np.ndarray) -> None:
        """Count ``values`` (int64 [channels, n])."""
        low, high = int(values.min()), int(values.max())
        if self.counts is None:
            self.low, self.counts = low, np.zeros((values.shape[0], high - low + 1), dtype=np.int64)
        new_low, new_high = min(low, self.low), max(high, self.low + self.counts.shape[1] - 1)
        if (new_low, new_high) != (self.low, self.low + self.counts.shape[1] - 1):
            grown = np.zeros((values.shape[0], new_high - new_low + 1), dtype=np.int64)
            grown[:, self.low - new_low : self.low - new_low + self.counts.shape[1]] = self.counts
            self.low, self.counts = new_low, grown
        width = self.counts.shape[1]
        keys = (np.arange(values.shape[0])[:, None] * width + (values - self.low)).ravel()
        self.counts += np.bincount(keys, minlength=self.counts.size).reshape(self.counts.shape)


class _CountingReference(DeployReference):
    """The deploy reference, counting accumulators and Add input pairs as it runs."""

    def __init__(self, graph: DeployGraph, visits: LatticeVisits, arithmetic: str):
        super().__init__(graph, arithmetic)
        self.visits = visits
        self.histograms: dict[str, _Histogram] = {}
        self.out_quant = {node.output: node.attrs["out_quant"] for node in graph.nodes if node.attrs.get("out_quant")}

    def _run_node(self, index, node, env):
        if node.op in ("qconv", "qlinear") and node.attrs.get("out_quant") is not None:
            self._count_accumulators(index, node, env[node.inputs[0]])
        if node.op == "add" and all(name in self.quant for name in node.inputs):
            self._count_pairs(node, env)
        return super()._run_node(index, node, env)

    def _count_accumulators(self, index, node, q_x):
        weight = self._param(index, "weight")
        attrs = node.attrs
        if node.op == "qconv":
            acc = F.conv2d(
                q_x.to(weight.dtype),
                weight,
                None,
                attrs["stride"],
                attrs["padding"],
                attrs["dilation"],
                attrs["groups"],
            )
            acc = acc.transpose(0, 1).reshape(acc.shape[1], -1)
        else:
            acc = F.linear(q_x.to(weight.dtype), weight).T
        self.histograms.setdefault(node.name, _Histogram()).add(acc.round().to(torch.int64).numpy())

    def _count_pairs(self, node, env):
        """Pairs (a − qmin_a, b − qmin_b) of the Add's input integers (a tensor widened by ``expand`` holds
        q · expand: :func:`export.deploy_graph.tensor_quant`)."""
        quants = [self.out_quant[name] for name in node.inputs]
        sizes = [q["qmax"] - q["qmin"] + 1 for q in quants]
        first, second = (
            (env[name] / q.get("expand", 1)).round().to(torch.int64).numpy().ravel() - q["qmin"]
            for name, q in zip(node.inputs, quants, strict=True)
        )
        counts = np.bincount(first * sizes[1] + second, minlength=sizes[0] * sizes[1]).reshape(sizes)
        self.visits.pairs[node.name] = self.visits.pairs.get(node.name, 0) + counts
