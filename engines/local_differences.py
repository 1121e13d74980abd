"""The values an engine computes differently from the deploy reference on equal inputs, and whether each is a tie.

``fatq-export --check`` counts identical integers per observed tensor, but one value that differs changes
the values computed from it, down to the classifier. This module finds the values each node computes
differently *itself*: the deploy reference runs again with every observed tensor replaced by the engine's
integers (``DeployReference.run(overrides=...)``), so each node reads what the engine's node read, and a
value that still differs is a **local difference**.

Each local difference is judged by the reference's value before rounding, t (in output levels): its
distance to the nearest rounding boundary k + 1/2, taken at the node and at every unobserved quantized
tensor it was computed from through a residual Add, a ReLU or an option-A shortcut (OpenVINO fuses an 8-bit
branch quantizer into its conv, where it cannot be observed; the reference's t there stands in for the
engine's). A distance within the engines' float error,
``SUM_ERROR · (128 + |t|)`` levels (four half-ulps of OpenVINO's FakeQuantize, which offsets t by 128 first,
:mod:`export.tie_lattices`), is a rounding **tie** that the engine's float order decides: the export keeps
reachable values away from boundaries (:mod:`export.engine_exact`) except in lattices too dense to clear.
Any other local difference means the engine computes something other than the reference.

Measured with OpenVINO 2026.4.1 and ONNX Runtime 1.32.0 on the 48 files and engines of docs/parity.md's sweep
(10,000 test images each): every local difference lay within 2.4e-5 levels of a boundary.
"""

from __future__ import annotations

import numpy as np
import torch

from export.deploy_graph import DeployGraph
from export.reference import DeployReference
from export.tie_lattices import float_error, tie_distance

MAX_EXAMPLES = 5
ELEMENTWISE_OPS = frozenset({"add", "relu", "clip"})


Position = tuple  # (image, channel, row, column) or (image, feature)


def _subsampled(pad: int, after):
    """A position before ``subsample_pad`` {pad} (x[:, :, ::2, ::2], ``pad`` zero channels each side) for a
    position after it, composed with ``after`` (the mapping of the ops after it); None inside the padding."""

    def before(position: Position) -> Position | None:
        position = after(position)
        if position is None or position[1] < pad:
            return None
        image, channel, row, column = position
        return (image, channel - pad, 2 * row, 2 * column)

    return before


def quantized_sources(tensor: str, producers: dict, quant: dict) -> list[tuple[str, callable]]:
    """The quantized tensors the node of ``tensor`` computes from through float ops, each with the mapping
    from a position of ``tensor`` to the position it reads there (None: none, e.g. a padded channel).

    Walks back through elementwise ops (:data:`ELEMENTWISE_OPS`: a residual Add, a ReLU; same position) and
    an option-A shortcut's ``subsample_pad``; stops at quantized tensors and any other op.
    """
    found, stack = [], [(name, _same) for name in producers[tensor].inputs]
    while stack:
        name, mapping = stack.pop()
        node = producers.get(name)
        if name in quant:
            found.append((name, mapping))
        elif node is not None and node.op in ELEMENTWISE_OPS:
            stack.extend((source, mapping) for source in node.inputs)
        elif node is not None and node.op == "subsample_pad":
            stack.append((node.inputs[0], _subsampled(node.attrs["pad"], mapping)))
    return found


def _same(position: Position) -> Position:
    return position


def _inside(position: Position | None, shape: torch.Size) -> bool:
    """Whether ``position`` indexes a tensor of ``shape``."""
    if position is None or len(position) != len(shape):
        return False
    return all(0 <= i < n for i, n in zip(position, shape, strict=True))


class LocalDifferences:
    """Accumulates the local differences of an engine against the deploy reference over batches.

    Args:
        graph: the deploy graph the file was written from.
        reference: its deploy reference with the engine's bias arithmetic.
        observed: the quantized tensors the engine's debug copy outputs.
    """

    def __init__(self, graph: DeployGraph, reference: DeployReference, observed: set[str]):
        self.reference = reference
        self.observed = [node.output for node in graph.nodes if node.output in observed]
        producers = {node.output: node for node in graph.nodes}
        unobserved = set(reference.quant) - observed
        # where a node's t is read: itself, then the unobserved quantized tensors it computes from
        self.paths = {
            tensor: [
                (tensor, _same),
                *((s, m) for s, m in quantized_sources(tensor, producers, reference.quant) if s in unobserved),
            ]
            for tensor in self.observed
        }
        self.images = 0
        self.at_ties = 0
        self.elsewhere = 0
        self.max_tie_distance = 0.0
        self.examples: dict[bool, list[dict]] = {True: [], False: []}  # tie or not -> the first few

    def update(self, x: torch.Tensor, engine: dict[str, np.ndarray], reference: dict[str, torch.Tensor]) -> None:
        """Add one batch.

        Args:
            x: the batch the engine ran, float32 [N, C, H, W].
            engine: {observed tensor: the engine's integers}, float32, the reference's shapes.
            reference: {tensor: integers} the reference computed on its own (``run(capture=True)``).
        """
        start, self.images = self.images, self.images + x.shape[0]
        if all(np.array_equal(engine[t], reference[t].numpy()) for t in self.observed):
            return  # nothing differs: no second run needed
        overrides = {t: torch.from_numpy(np.asarray(engine[t], dtype=np.float32)) for t in self.observed}
        before: dict[str, torch.Tensor] = {}
        _, local = self.reference.run(x, capture=True, overrides=overrides, pre_rounding=before)
        for tensor in self.observed:
            computed, seen = local[tensor].numpy(), np.asarray(engine[tensor])
            for position in map(tuple, np.argwhere(computed != seen)):
                self._judge(tensor, position, computed, seen[position], before, start)

    def _judge(
        self, tensor: str, position: Position, ours: np.ndarray, theirs: float, before: dict, start: int
    ) -> None:
        """Classify one local difference by the nearest tie along its path (see the module)."""
        candidates = []  # (distance, tensor, t) at the node and where it reads the unobserved tensors
        for name, mapping in self.paths[tensor]:
            there = mapping(position)
            if name in before and _inside(there, before[name].shape):
                t = float(before[name][there])
                candidates.append((float(tie_distance(t)), name, t))
        distance, via, t = min(candidates) if candidates else (float("inf"), tensor, float("nan"))
        tie = bool(distance <= float(float_error(t)))
        if tie:
            self.at_ties += 1
            self.max_tie_distance = max(self.max_tie_distance, distance)
        else:
            self.elsewhere += 1
        if len(self.examples[tie]) < MAX_EXAMPLES:
            self.examples[tie].append(
                {
                    "tensor": tensor,
                    "image": start + int(position[0]),
                    "index": [int(i) for i in position[1:]],
                    "reference": int(ours[position]),
                    "engine": int(theirs),
                    "rounded_at": via,
                    "t": t,
                    "tie_distance_levels": distance,
                    "tie": tie,
                }
            )

    def result(self) -> dict:
        """{"values", "at_ties", "elsewhere", "max_tie_distance_levels", "examples"} over all batches."""
        return {
            "values": self.at_ties + self.elsewhere,
            "at_ties": self.at_ties,
            "elsewhere": self.elsewhere,
            "max_tie_distance_levels": self.max_tie_distance,
            "examples": self.examples[False] + self.examples[True],  # differences away from a tie first
        }
