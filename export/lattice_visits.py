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
        for name, sparse in counter.counts.items():
            keys, counts = sparse.merged()
            channel_of, accumulator = keys >> _CHANNEL_SHIFT, (keys & ((1 << _CHANNEL_SHIFT) - 1)) - _ACC_OFFSET
            channels = counter.graph_nodes[name].params["weight"].shape[0]
            visits.accumulators[name] = [
                _ChannelCounts(accumulator[channel_of == c], counts[channel_of == c]) for c in range(channels)
            ]
        visits.images = len(images)
        return visits


class _SparseCounts:
    """Counts of (channel, accumulator) keys, merged batch by batch (only the keys that occur are kept)."""

    def __init__(self):
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray) -> None:
        self.parts.append(np.unique(keys, return_counts=True))
        if len(self.parts) > 8:  # merge now and then: memory stays near the number of distinct keys
            self.parts = [self.merged()]

    def merged(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted distinct keys, their counts)."""
        keys = np.concatenate([k for k, _ in self.parts]) if self.parts else np.zeros(0, np.int64)
        counts = np.concatenate([c for _, c in self.parts]) if self.parts else np.zeros(0, np.int64)
        distinct, inverse = np.unique(keys, return_inverse=True)
        return distinct, np.bincount(inverse, weights=counts, minlength=distinct.size).astype(np.int64)


# one int64 key per (channel, accumulator): the channel in the high bits, the accumulator offset to stay >= 0
_CHANNEL_SHIFT, _ACC_OFFSET = 40, 1 << 39
# accumulator values counted: those whose value (in output levels) lies within BAND + MOVE_REACH·|t| of a
# rounding boundary; every candidate move (export.tie_lattices.MOVES: at most 3e-3 levels or 3e-3 relative)
# and near-tie stays inside it, so the far ones, most of an accumulator's range, need no memory
_BAND, _MOVE_REACH = 0.01, 3e-3


class _CountingReference(DeployReference):
    """The deploy reference, counting accumulators and Add input pairs as it runs."""

    def __init__(self, graph: DeployGraph, visits: LatticeVisits, arithmetic: str):
        super().__init__(graph, arithmetic)
        self.visits = visits
        self.counts: dict[str, _SparseCounts] = {}
        self.graph_nodes = {node.name: node for node in graph.nodes}
        self.out_quant = {node.output: node.attrs["out_quant"] for node in graph.nodes if node.attrs.get("out_quant")}
        # per counted layer: (multiplier, offset) [C_out, 1] of its values in output levels, acc · M + c (the
        # float-bias form; the int32 form differs by under half a step)
        self.levels = {}
        for node in graph.nodes:
            if node.op in ("qconv", "qlinear") and node.attrs["out_quant"] is not None:
                step = np.float32(node.attrs["input_scale"]) * node.params["weight_scale"].astype(np.float32)
                scale = float(np.float32(node.attrs["out_quant"]["scale"]))
                multiplier, offset = step.astype(np.float64) / scale, node.params["bias"] / scale
                self.levels[node.name] = (multiplier[:, None], offset[:, None])

    def _run_node(self, index, node, env):
        if node.op == "add" and all(name in self.quant for name in node.inputs):
            self._count_pairs(node, env)
        return super()._run_node(index, node, env)

    def _accumulate(self, index, node, q_x):
        acc = super()._accumulate(index, node, q_x)
        if node.name in self.levels:
            self._count_accumulators(node, acc)
        return acc

    def _count_accumulators(self, node, acc: torch.Tensor) -> None:
        """Count the accumulator values ([N, C_out, ...]) near a rounding boundary, per output channel."""
        acc = acc.transpose(0, 1).reshape(acc.shape[1], -1).round().to(torch.int64).numpy()  # [channels, positions]
        multiplier, offset = self.levels[node.name]
        level = acc * multiplier + offset
        near = np.abs(level - (np.floor(level) + 0.5)) < _BAND + _MOVE_REACH * np.abs(level)
        channel = np.broadcast_to(np.arange(acc.shape[0], dtype=np.int64)[:, None], acc.shape)
        keys = (channel[near] << _CHANNEL_SHIFT) | (acc[near] + _ACC_OFFSET)
        self.counts.setdefault(node.name, _SparseCounts()).add(keys)

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
