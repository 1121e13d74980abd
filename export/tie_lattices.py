"""The finite sets of values an engine rounds, and what a small move of the model does to them.

Every place an integer engine rounds (a requantization after an integer layer, a quantizer that reads a
residual sum) sees values from a lattice fixed by the exported integers: N · M for an int32-bias layer,
n · M + c for a float-bias layer, (a·s_a + b·s_b) / s for a residual sum. A value closer to a rounding
boundary k + ½ than the float error of the engine's arithmetic may round the other way in the engine
than in PyTorch (a *near-tie*). :mod:`export.engine_exact` moves one knob of the model per lattice (a
BatchNorm γ, a bias, a quantizer's range) to clear those; each lattice here answers two questions about
candidate moves [J]:

- ``clear(channel, moves)``: does every reachable value keep the margin from every boundary?
- ``crossings(channel, moves)``: how many reachable values round to another integer than before?

A crossing is a real change of the model (the value it stands for now rounds the other way), and a
4-bit network is chaotic: moving one ResNet-20 W4A4 quantizer's range by 1e-5 changed 0.50 % of its
top-1 predictions, 1e-4 changed 2.65 % (2,000 test images, ``benchmarks/move_cost.py``). :func:`best_move`
therefore takes the clearing move that crosses the fewest reachable values, and only then the smallest.
"""

from __future__ import annotations

import numpy as np

from export.lattice_visits import VISIT_WEIGHT

# distance (in output levels) every value must keep from a rounding boundary: 2.5x the largest
# model-vs-engine difference measured on a trained ResNet-20 W4A4 (2e-6 levels)
TIE_MARGIN = 5e-6
# float error of an engine's residual-sum quantizer, in output levels per unit of (128 + |t| + Σ|terms|/s):
# four half-ulps; 128 covers OpenVINO's int8 FakeQuantize, which computes (x + 128·s) / s (offset by its input_low)
SUM_ERROR = 2.0**-22


def tie_distance(t: np.ndarray) -> np.ndarray:
    """|t − (k + ½)| for the nearest rounding boundary k + ½, in output levels (float64, t's shape)."""
    t = np.asarray(t, dtype=np.float64)
    return np.abs(t - (np.floor(t) + 0.5))


def float_error(t: np.ndarray, magnitude: np.ndarray | float = 0.0) -> np.ndarray:
    """How far an engine's float order can move t from the model's (levels): SUM_ERROR · (128 + |t| + magnitude),
    ``magnitude`` = Σ|terms| / s for a residual sum (see SUM_ERROR)."""
    return (128 + np.abs(np.asarray(t, dtype=np.float64)) + magnitude) * SUM_ERROR


# relative moves (of a γ or a range) or bias moves (in output levels) tried: fine steps first, since a
# move of δ levels crosses about a fraction δ of a dense activation distribution
MOVES = np.concatenate(
    [sign * np.arange(1, 1001) * 1e-7 for sign in (1, -1)] + [sign * np.arange(11, 301) * 1e-5 for sign in (1, -1)]
)
MOVES = MOVES[np.argsort(np.abs(MOVES), kind="stable")]
_CHUNK = 200


def best_move(score) -> tuple[float, int] | None:
    """(move, its crossings): the move of :data:`MOVES` that clears, with the fewest crossings, then the
    smallest; None if none clears.

    ``score(moves [J]) -> (clear bool [J], crossings [J])``. Moves are scored in chunks of increasing size.
    The search stops at a clearing move without a crossing (nothing later can beat it), or at a chunk where
    every move, clearing or not, crosses at least as many values as the best so far (crossings grow with
    the size of a move: larger ones are not tried).
    """
    best, best_cost = None, np.inf
    for start in range(0, MOVES.size, _CHUNK):
        moves = MOVES[start : start + _CHUNK]
        clear, crossings = score(moves)
        if best is not None and crossings.min() >= best_cost:
            break
        cost = np.where(clear, crossings, np.inf)
        if cost.min() < best_cost:  # first minimum in a chunk is the smallest move (MOVES is sorted by size)
            best, best_cost = float(moves[np.argmin(cost)]), float(cost.min())
        if best_cost == 0:
            break
    return None if best is None else (best, int(best_cost))


def _crossing_cost(x0: np.ndarray, x1: np.ndarray, low, high, visits, offset: float = 0.0) -> np.ndarray:
    """Cost of the integers n in [low, high] with min(x0, x1) <= n < max(x0, x1), summed over the last axis:
    their count, plus :data:`VISIT_WEIGHT` per calibration visit of the value n − ``offset`` (``visits``: a
    channel's counts of :class:`export.lattice_visits.LatticeVisits`, or None)."""
    lo, hi = np.minimum(x0, x1), np.maximum(x0, x1)
    first, last = np.maximum(np.ceil(lo), low), np.minimum(np.ceil(hi) - 1, high)
    cost = np.maximum(last - first + 1, 0).sum(axis=-1)
    if visits is not None:
        cost = cost + VISIT_WEIGHT * visits.between(first - offset, last - offset).sum(axis=-1)
    return cost


def _visited(visits, channel: int | slice, n: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray | bool:
    """Whether calibration reached the lattice values ``n`` ([channels, B] for all channels, [J, B] for one),
    as accumulators n − ``offset[channel]``; True everywhere without ``visits`` (every value must clear)."""
    if visits is None:
        return True
    offset = np.zeros(len(visits)) if offset is None else offset
    if not isinstance(channel, slice):
        acc = n - offset[channel]
        return visits[channel].between(acc, acc) > 0
    rows = [visits[c].between(row - offset[c], row - offset[c]) > 0 for c, row in enumerate(n)]
    return np.stack(rows)


def _dense(multiplier: np.ndarray, visits) -> np.ndarray:
    """Channels whose values lie too close together to clear them all (M < 4·TIE_MARGIN: an 8-bit output with
    a fine multiplier); bool [channels]. With calibration visits none is: only the reached values must clear."""
    return np.zeros(multiplier.shape, bool) if visits is not None else multiplier < 4 * TIE_MARGIN


class Int32Lattice:
    """The values N · M an integer layer's pre-activation can take, per output channel (int32-bias engines).

    N = accumulator + int32 bias lies in [bias − A, bias + A] with A = Σ|w| · max|q_x| (a
    channel whose weights are all 0 has the single value bias · M); M is the requantization
    multiplier as ONNX Runtime computes it (:func:`export.reference.requant_multiplier`). The knob is
    the channel's BatchNorm γ: a move ε scales M by 1 + ε.
    """

    def __init__(self, node, input_quant: dict, visits=None):
        from export.reference import requant_multiplier

        self.visits = visits  # [channel] accumulator counts (LatticeVisits), or None
        out_quant = node.attrs["out_quant"]
        weight = np.abs(node.params["weight"].astype(np.int64)).reshape(node.params["weight"].shape[0], -1)
        reach = weight.sum(axis=1) * max(abs(input_quant["qmin"]), abs(input_quant["qmax"]))
        bias = node.params["bias_int32"].astype(np.int64)
        self.bias = bias.astype(np.float64)
        self.low, self.high = (bias - reach).astype(np.float64), (bias + reach).astype(np.float64)
        self.multiplier = requant_multiplier(node.attrs["input_scale"], node.params["weight_scale"], out_quant["scale"])
        # rounding boundaries k + ½ inside the output range (beyond it both sides clamp alike)
        self.boundaries = np.arange(out_quant["qmin"], out_quant["qmax"], dtype=np.float64) + 0.5
        # no γ change clears values this close together; they are as good as continuous (a given one is rarely hit)
        self.dense = _dense(self.multiplier, visits)

    def clear(self, channel: int | slice = slice(None), moves: np.ndarray | float = 0.0, slack: float = 0.0):
        """Whether every reachable N·M(1 + move) keeps TIE_MARGIN (+ slack·t) from every boundary t.

        Returns bool [channels] (all channels, no moves) or [J] (one channel, moves [J]).
        """
        multiplier = (self.multiplier[channel] * (1 + np.asarray(moves))).astype(np.float32)[..., None]
        low, high = self.low[channel], self.high[channel]
        if np.ndim(low):
            low, high = low[..., None], high[..., None]
        n = np.clip(np.round(self.boundaries / multiplier.astype(np.float64)), low, high)
        value = (n.astype(np.float32) * multiplier).astype(np.float64)  # the engine's float32 product
        tied = np.abs(value - self.boundaries) < TIE_MARGIN + slack * np.abs(self.boundaries)
        return ~(tied & _visited(self.visits, channel, n, self.bias)).any(axis=-1)

    def crossings(self, channel: int, moves: np.ndarray) -> np.ndarray:
        """Cost [J] of the reachable N of ``channel`` whose N·M falls on the other side of a boundary after
        M·(1 + move): their count, plus :data:`VISIT_WEIGHT` per visit (N = accumulator + int32 bias)."""
        multiplier = self.multiplier[channel]
        if multiplier == 0:
            return np.zeros(len(moves))
        before = self.boundaries / multiplier
        after = self.boundaries / (multiplier * (1 + np.asarray(moves)))[:, None]
        visits = None if self.visits is None else self.visits[channel]
        return _crossing_cost(before, after, self.low[channel], self.high[channel], visits, self.bias[channel])


class FloatLattice:
    """The values y / s_y of an integer layer with a float bias (TensorRT's and OpenVINO's arithmetic).

    y = acc · step + b with acc in [−A, A] (A = Σ|w| · max|q_x|), step = float32(s_x · s_w,c):
    the values n · M + c with M = step / s_y and c = b / s_y, per output channel. The knob is the
    bias: a move of δ real units adds δ / s_y to every value.
    """

    def __init__(self, node, input_quant: dict, visits=None):
        self.visits = visits  # [channel] accumulator counts (LatticeVisits), or None
        out_quant = node.attrs["out_quant"]
        weight = np.abs(node.params["weight"].astype(np.int64)).reshape(node.params["weight"].shape[0], -1)
        reach = (weight.sum(axis=1) * max(abs(input_quant["qmin"]), abs(input_quant["qmax"]))).astype(np.float64)
        self.low, self.high = -reach, reach
        self.scale = float(np.float32(out_quant["scale"]))
        step = np.float32(node.attrs["input_scale"]) * node.params["weight_scale"].astype(np.float32)
        self.multiplier = step.astype(np.float64) / self.scale
        self.offset = node.params["bias"].astype(np.float32).astype(np.float64) / self.scale
        self.boundaries = np.arange(out_quant["qmin"], out_quant["qmax"], dtype=np.float64) + 0.5
        self.dense = _dense(self.multiplier, visits)

    def clear(self, channel: int | slice = slice(None), shift: np.ndarray | float = 0.0) -> np.ndarray:
        """Whether every reachable value (with the bias moved by ``shift`` real units, [J]) keeps
        TIE_MARGIN + 3e-7·|t| from every boundary t; bool [channels] (all channels) or [J] (one channel)."""
        offset = self.offset[channel] + np.asarray(shift, dtype=np.float64) / self.scale
        multiplier = np.broadcast_to(self.multiplier[channel], np.shape(offset))
        low = np.broadcast_to(self.low[channel], np.shape(offset))
        high = np.broadcast_to(self.high[channel], np.shape(offset))
        offset, multiplier, low, high = (v[..., None] for v in (offset, multiplier, low, high))
        n = np.clip(np.round((self.boundaries - offset) / multiplier), low, high)
        value = n * multiplier + offset
        # 3e-7·t: float32 roundings of acc·step, + b and / s_y that engines order differently
        tied = np.abs(value - self.boundaries) < TIE_MARGIN + 3e-7 * np.abs(self.boundaries)
        return ~(tied & _visited(self.visits, channel, n)).any(axis=-1)

    def crossings(self, channel: int, shift: np.ndarray) -> np.ndarray:
        """Cost [J] of the reachable n of ``channel`` whose n·M + c falls on the other side of a boundary after
        the bias moves by ``shift`` real units [J]: their count, plus :data:`VISIT_WEIGHT` per visit."""
        multiplier = self.multiplier[channel]
        if multiplier == 0:
            return np.zeros(len(shift))
        before = (self.boundaries - self.offset[channel]) / multiplier
        after = before - (np.asarray(shift, dtype=np.float64) / self.scale / multiplier)[:, None]
        visits = None if self.visits is None else self.visits[channel]
        return _crossing_cost(before, after, self.low[channel], self.high[channel], visits)


class SumLattice:
    """The values t = (a·s_a + b·s_b) / s of a quantizer that reads a residual sum of two quantized tensors.

    Every integer pair (a, b) in the two ranges is reachable (at most 255 × 255). A pair is at risk when t
    lies closer than (128 + |t| + (|a·s_a| + |b·s_b|) / s) · 2^-22 to a rounding boundary inside the
    quantizer's range: engines compute t in other float32 orders than PyTorch, and OpenVINO's signed int8
    FakeQuantize adds 128·s before it divides (an error of up to ~(128 + |t|)·2^-24 levels), so such a pair
    may round the other way in some engine. Measured: on a ResNet-20 W4A4 fine-tuned 50 steps, OpenVINO
    rounded 0.0042 % of ``layer2.2.shortcut_quantizer``'s values the other way (99.69 % top-1 agreement).

    Two knobs move the values: the scale of one term (``term`` 0 or 1: s_a or s_b times 1 + ε, every
    t moving by ε·a·s_a / s) or the quantizer's own scale (``term`` None: s times 1 + ε, t by about −ε·t).
    """

    def __init__(self, quantizer, inputs: list[dict], through_relu: bool, visits: np.ndarray | None = None):
        self.name = quantizer.name
        self.output = quantizer.output
        self.quant = quantizer.attrs["out_quant"]
        self.scale = float(np.float32(self.quant["scale"]))
        self.term_scales = [float(np.float32(q["scale"])) for q in inputs]
        grids = [np.arange(q["qmin"], q["qmax"] + 1, dtype=np.float64) for q in inputs]
        # every pair (a, b) as the two real terms a·s_a, b·s_b: [2, pairs]
        first, second = np.repeat(grids[0], grids[1].size), np.tile(grids[1], grids[0].size)
        self.integers = np.stack([first, second]).astype(np.float32)  # every pair (a, b): [2, pairs]
        self.terms = np.stack([first * self.term_scales[0], second * self.term_scales[1]])
        self.through_relu = through_relu  # negative sums are 0 before the quantizer: exact, never at risk
        # calibration visits of each pair (LatticeVisits.pairs, flattened like ``terms``), or None
        self.visits = None if visits is None else np.asarray(visits, dtype=np.float64).ravel()
        self._before = self._as_pytorch(self.integers, None, np.zeros(1))[0]
        # what no move changes: each pair's t, its distance to the nearest boundary and its float-error window
        self._t = self.terms.sum(axis=0) / self.scale
        self._distance = tie_distance(self._t)
        self._window = float_error(self._t, np.abs(self.terms).sum(axis=0) / self.scale)

    def _values(self, terms: np.ndarray, term: int | None, moves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(t [J, pairs], |a·s_a| + |b·s_b| [J, pairs]) with the knob moved by ``moves`` [J], each scale held
        as the model will hold it (float32(α · (1 + ε)) / levels, rounded like the export)."""
        moves = np.asarray(moves, dtype=np.float64)[:, None]
        factors = [np.ones_like(moves), np.ones_like(moves)]
        scale = np.full_like(moves, self.scale)
        if term is None:
            scale = (self.scale * (1 + moves)).astype(np.float32).astype(np.float64)
        else:
            held = (self.term_scales[term] * (1 + moves)).astype(np.float32).astype(np.float64)
            factors[term] = held / self.term_scales[term]
        first, second = terms[0][None, :] * factors[0], terms[1][None, :] * factors[1]
        return (first + second) / scale, (np.abs(first) + np.abs(second)) / scale

    def _held_scales(self, term: int | None, moves: np.ndarray) -> list[np.ndarray]:
        """[s_a, s_b, s] as float32 [J, 1] with the knob moved by ``moves`` [J] (float32(s · (1 + ε)), within an
        ulp of what the model holds, float32(float32(α · (1 + ε)) / levels))."""
        scales = [np.full((len(moves), 1), v, dtype=np.float32) for v in (*self.term_scales, self.scale)]
        knob = 2 if term is None else term
        scales[knob] = (scales[knob][:, 0].astype(np.float64) * (1 + np.asarray(moves)))[:, None].astype(np.float32)
        return scales

    def _as_pytorch(self, integers: np.ndarray, term: int | None, moves: np.ndarray) -> np.ndarray:
        """The integers the PyTorch model rounds pairs (``integers`` [2, P]) to, [J, P]: float32 products
        q·s of both quantizers, their float32 sum, divided by s in float32, rounded half to even, clamped."""
        scale_a, scale_b, scale = self._held_scales(term, moves)
        total = integers[0][None, :] * scale_a + integers[1][None, :] * scale_b  # float32 throughout
        return self._rounded(np.rint(total / scale).astype(np.float64))

    def _at_risk(self, t: np.ndarray, magnitude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inside = (t > self.quant["qmin"] - 0.5) & (t < self.quant["qmax"] + 0.5)
        if self.through_relu:
            inside &= t > 0
        return inside & (tie_distance(t) < float_error(t, magnitude)), inside

    def clear_as_is(self) -> bool:
        """Whether no pair that must clear (every pair at risk; with visits, the visited ones) is at risk now."""
        return bool(self.score(None, np.zeros(1))[0][0])

    def pairs_at_risk(self) -> tuple[int, int]:
        """(pairs at risk, pairs inside the range) at the model's own scales."""
        near, inside = self._at_risk(*self._values(self.terms, None, np.zeros(1)))
        return int(near.sum()), int(inside.sum())

    def _rounded(self, t: np.ndarray) -> np.ndarray:
        rounded = np.clip(np.floor(t + 0.5), self.quant["qmin"], self.quant["qmax"])
        return np.maximum(rounded, 0) if self.through_relu else rounded

    def score(self, term: int | None, moves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(no pair at risk, crossing cost), each [J], for ``moves`` [J]: the cost counts the pairs that round
        to another integer than before, plus :data:`VISIT_WEIGHT` per calibration visit of them."""
        reach = np.abs(self._t) if term is None else np.abs(self.terms[term]) / self.scale
        # only pairs this close to a boundary can be at risk or cross under these moves
        nearby = self._distance < np.abs(moves).max() * reach * 1.01 + self._window
        t, magnitude = self._values(self.terms[:, nearby], term, moves)
        near, _ = self._at_risk(t, magnitude)
        if self.visits is not None:  # only pairs the calibration images reach must clear
            near &= self.visits[nearby][None, :] > 0
        crossed = self._as_pytorch(self.integers[:, nearby], term, moves) != self._before[nearby][None, :]
        cost = crossed.sum(axis=1).astype(np.float64)
        if self.visits is not None:
            cost += VISIT_WEIGHT * (crossed * self.visits[nearby][None, :]).sum(axis=1)
        return ~near.any(axis=1), cost


def tied_channels(lattices: list) -> np.ndarray:
    """Channels with a near-tie in a lattice that can be cleared (dense lattices are skipped: no move
    clears those, and their crossings are only counted when a move is chosen)."""
    tied = np.logical_or.reduce([~lattice.clear() & ~lattice.dense for lattice in lattices])
    return np.flatnonzero(tied)
