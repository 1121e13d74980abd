"""Uniform quantizers with learned clipping (METHOD.md §1.6–1.8, §2, §3).

One source of truth for integers: every quantizer has ``integers(x) -> (q, scale)`` and its
fake-quant forward returns exactly ``q * scale`` computed by the same function, so export reads
the integers the model trained with.

Integer ranges (all fit signed int8 with zero point 0, the only form the engines accept):

==========================  ==================  =====================
quantizer                   integers            scale
==========================  ==================  =====================
weight, b bits              [-n, n], n=2^(b-1)-1  alpha_w / n
activation, signed, b bits  [-n, n]             alpha_a / n
activation, unsigned        [0, m], m=min(2^b-1, 127)  alpha_a / m
first/last weights          [-127, 127]          max|W| / 127
==========================  ==================  =====================

Unsigned activations cap at 127 levels (not 255 at b = 8) because engines have no uint8 path
(DEPLOY.md); for b <= 7 this is exactly METHOD.md's 2^b - 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

MIN_BITS, MAX_BITS, FLOAT_BITS = 2, 8, 32


def check_bits(bits: int, what: str = "bits") -> int:
    """Validate a bit-width: 2..8 quantize, 32 means full precision."""
    if bits != FLOAT_BITS and not MIN_BITS <= bits <= MAX_BITS:
        from fatq.errors import FatqError

        raise FatqError(f"{what} must be in {MIN_BITS}..{MAX_BITS} or {FLOAT_BITS}, got {bits}.")
    return bits


def signed_levels(bits: int) -> int:
    """n = 2^(b-1) - 1: positive levels of a symmetric narrow-range quantizer."""
    return 2 ** (bits - 1) - 1


def unsigned_levels(bits: int) -> int:
    """m = 2^b - 1, capped at 127 so the integers fit int8 with zero point 0."""
    return min(2**bits - 1, 127)


def round_clamp(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integers clamp(round_half_even(x / scale), qmin, qmax), as float (ONNX QuantizeLinear)."""
    # round/clamp in place on the fresh quotient: same values, one allocation instead of three
    return (x / scale).round_().clamp_(qmin, qmax)


def uniform_integers(w: Tensor, alpha: Tensor, levels: int) -> Tensor:
    """Integers of a symmetric narrow-range quantizer with clipping threshold ``alpha`` (broadcast
    against ``w``): clamp(round_half_even(w / (alpha / levels)), -levels, levels), no gradient."""
    return round_clamp(w.detach(), (alpha / levels).detach(), -levels, levels)


class _LearnedScaleQuant(torch.autograd.Function):
    """Returns q * (alpha / levels) for precomputed integers q; custom gradients.

    Gradients (METHOD.md §1.7 and §2), with r = x / alpha: d out / d alpha = q/levels where x
    was clamped (r * levels outside [qmin, qmax]), else q/levels - r. d out / d x = 1, or 0
    where clamped when ``clip_grad`` (activations; weights pass straight through everywhere).

    Speed (CPU training is dominated by these elementwise passes over activations): the forward
    computes d out / d alpha and the clamp mask once, mostly in place, and the backward is a
    single dot product plus one masked fill. Every quantizer has qmax == levels and qmin in
    {0, -levels}, so "r * levels > qmax" is exactly "r > 1" and "r * levels < qmin" exactly
    "r < qmin / levels" (multiplying by the exact integer ``levels`` is monotonic and maps 1 to
    levels), which saves a full multiply pass.
    """

    @staticmethod
    def forward(ctx, x, alpha, q, levels: int, qmin: int, qmax: int, clip_grad: bool):
        out = q * (alpha / levels)
        if qmax != levels or qmin not in (0, -levels, -levels - 1):
            raise ValueError(f"unsupported integer range [{qmin}, {qmax}] for {levels} levels")
        ratio = x / alpha
        clamped = ratio > 1
        # a full-range signed quantizer (qmin = -levels - 1) compares with the float32 qmin / levels
        clamped |= ratio < (qmin // levels if qmin in (0, -levels) else qmin / levels)
        d_alpha = q / levels
        d_alpha.sub_(ratio.masked_fill_(clamped, 0.0))  # q/levels where clamped, else q/levels - r
        ctx.save_for_backward(d_alpha, clamped)
        ctx.alpha_shape = alpha.shape
        ctx.clip_grad = clip_grad
        return out

    @staticmethod
    def backward(ctx, grad):
        d_alpha, clamped = ctx.saved_tensors
        if len(ctx.alpha_shape) == 0 or ctx.alpha_shape.numel() == 1:
            # float32 accumulation: under fp16 autocast a half-precision sum of millions of
            # (loss-scaled) terms would overflow
            grad_alpha = torch.dot(grad.reshape(-1).float(), d_alpha.reshape(-1).float()).reshape(ctx.alpha_shape)
        else:  # per-channel alpha of shape [C, 1, ...]: reduce every other axis
            grad_alpha = (grad.float() * d_alpha.float()).sum(dim=tuple(range(1, grad.dim())), keepdim=True)
        grad_x = grad.masked_fill(clamped, 0.0) if ctx.clip_grad else grad
        return grad_x, grad_alpha, None, None, None, None, None


def _learned_scale_quant(x: Tensor, alpha: Tensor, q: Tensor, levels: int, qmin: int, qmax: int, clip_grad: bool):
    """q * (alpha / levels), through :class:`_LearnedScaleQuant` only when a gradient is wanted
    (the backward bookkeeping would otherwise cost several passes per forward in evaluation)."""
    if torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad):
        return _LearnedScaleQuant.apply(x, alpha, q, levels, qmin, qmax, clip_grad)
    return q * (alpha / levels)


class _StraightThroughRound(torch.autograd.Function):
    """q * scale with the gradient passed straight to x (scale is a constant here)."""

    @staticmethod
    def forward(ctx, x, scale, qmin: int, qmax: int):
        return round_clamp(x, scale, qmin, qmax) * scale

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


class UniformWeightQuantizer(nn.Module):
    """b-bit symmetric narrow-range weight quantizer with a learned clipping threshold alpha_w.

    Args:
        bits: 2..8.
        alpha_init: initial alpha_w (METHOD.md: 3.0, in units of the standardized weights).
    """

    kind = "uniform"

    def __init__(self, bits: int, alpha_init: float = 3.0):
        super().__init__()
        self.bits = check_bits(bits, "weight bits")
        self.levels = signed_levels(bits)
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    @property
    def int_range(self) -> tuple[int, int]:
        return -self.levels, self.levels

    def _integers(self, w: Tensor) -> Tensor:
        return uniform_integers(w, self.alpha, self.levels)

    def integers(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Integer weights q (float dtype, values in [-n, n], shape of ``w``) and scale (0-dim)."""
        return self._integers(w), (self.alpha / self.levels).detach()

    def forward(self, w: Tensor) -> Tensor:
        qmin, qmax = self.int_range
        return _learned_scale_quant(w, self.alpha, self._integers(w), self.levels, qmin, qmax, False)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, levels=±{self.levels}"


class PowerOfTwoWeightQuantizer(UniformWeightQuantizer):
    """Logarithmic levels {0} ∪ {2^-i}, i = 0 … n-1 (normalised to max 1), times alpha_w.

    Integers are level · 2^(n-1) with scale alpha_w / 2^(n-1): they fit int8 only for b <= 4,
    so export refuses wider power-of-two layers. Gradients as for the uniform quantizer.
    """

    kind = "power_of_two"

    def __init__(self, bits: int, alpha_init: float = 3.0):
        super().__init__(bits, alpha_init)
        exponents = torch.arange(self.levels, dtype=torch.float32)
        values = torch.cat([torch.zeros(1), 2.0**-exponents])
        self.register_buffer("level_values", values, persistent=False)
        self.levels = 2 ** (self.levels - 1)  # divisor: the smallest non-zero level is 1/levels

    @property
    def int_range(self) -> tuple[int, int]:
        return -self.levels, self.levels

    def _integers(self, w: Tensor) -> Tensor:
        u = torch.clamp(w.detach() / self.alpha.detach(), -1, 1)
        nearest = (u.abs().unsqueeze(-1) - self.level_values).abs().argmin(dim=-1)
        return torch.sign(u) * self.level_values[nearest] * self.levels


class PerChannelWeightQuantizer(nn.Module):
    """b-bit symmetric weights with one clipping threshold per output channel (PTQ).

    ``alpha`` has shape [C_out]; ``integers`` returns a scale of shape [C_out, 1, ...] that
    broadcasts against the weight. Ranges are set by calibration (max or MSE) and may be
    fine-tuned with the same gradient as :class:`UniformWeightQuantizer`.
    """

    kind = "per_channel"

    def __init__(self, bits: int, channels: int):
        super().__init__()
        self.bits = check_bits(bits, "weight bits")
        self.levels = signed_levels(bits)
        self.alpha = nn.Parameter(torch.ones(channels))

    @property
    def int_range(self) -> tuple[int, int]:
        return -self.levels, self.levels

    def _alpha(self, w: Tensor) -> Tensor:
        return self.alpha.view(-1, *([1] * (w.dim() - 1)))

    def integers(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Integers (shape of ``w``) and scale [C_out, 1, ...]."""
        scale = (self._alpha(w) / self.levels).detach()
        return round_clamp(w.detach(), scale, -self.levels, self.levels), scale

    def forward(self, w: Tensor) -> Tensor:
        q, _ = self.integers(w)
        return _learned_scale_quant(w, self._alpha(w), q, self.levels, -self.levels, self.levels, False)


class MaxAbsWeightQuantizer(nn.Module):
    """8-bit per-tensor weights for the first and last layers: scale = max|W| / 127 (METHOD.md §3)."""

    kind = "max_abs"
    bits = 8
    levels = 127

    @property
    def int_range(self) -> tuple[int, int]:
        return -self.levels, self.levels

    def _scale(self, w: Tensor) -> Tensor:
        return (w.detach().abs().max() / self.levels).clamp_min(torch.finfo(torch.float32).tiny)

    def integers(self, w: Tensor) -> tuple[Tensor, Tensor]:
        scale = self._scale(w)
        return round_clamp(w.detach(), scale, -self.levels, self.levels), scale

    def forward(self, w: Tensor) -> Tensor:
        return _StraightThroughRound.apply(w, self._scale(w), -self.levels, self.levels)


class ActivationQuantizer(nn.Module):
    """b-bit activation quantizer with a learned clipping threshold alpha_a.

    Unsigned (input after ReLU/ReLU6): integers [0, m], m = 2^b - 1 capped at 127 (int8), or with
    ``full_range`` uncapped: [0, 255], all 256 uint8 values at 8 bits. Signed: [-n, n], or with ``full_range``
    [-n - 1, n], all 256 int8 values at 8 bits. Full range is QuantSpec target "cpu" (unsigned: with
    ``full_range_8bit``): the engine's int8/uint8 saturation is then the quantizer's clamp, so engines need no
    separate clamp pass; the scale stays alpha / n or alpha / m. A quantizer can be
    *disabled* (identity; the paper keeps first/last inputs float) and later given a range by
    calibration, which also enables it. With ``init_from_data`` the first training batch sets
    alpha to max|x| (the max over all DDP ranks) before it is learned.

    The flags ``enabled`` and ``initialized`` are plain bools (no device sync per forward) saved
    in the state dict as extra state, so a checkpoint says whether the quantizer is active and
    whether its range was set.
    """

    def __init__(
        self,
        bits: int,
        signed: bool,
        alpha_init: float = 5.0,
        enabled: bool = True,
        init_from_data: bool = False,
        full_range: bool = False,
    ):
        super().__init__()
        self.bits = check_bits(bits, "activation bits")
        self.signed = bool(signed)
        self.full_range = bool(full_range)
        if signed:
            self.levels = signed_levels(bits)
        else:  # full range: all 2^b - 1 levels of uint8 at 8 bits, beyond int8's 127
            self.levels = 2**self.bits - 1 if self.full_range else unsigned_levels(bits)
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.enabled = bool(enabled)
        self.initialized = not init_from_data

    @property
    def int_range(self) -> tuple[int, int]:
        if not self.signed:
            return (0, self.levels)
        return (-self.levels - 1 if self.full_range else -self.levels, self.levels)

    @property
    def scale(self) -> Tensor:
        """Current scale alpha / levels (0-dim, detached)."""
        return (self.alpha / self.levels).detach()

    def set_range(self, alpha: float) -> None:
        """Set alpha (e.g. a calibrated one), mark the range as set and enable the quantizer."""
        with torch.no_grad():
            self.alpha.fill_(max(float(alpha), 1e-8))
        self.initialized = True
        self.enabled = True

    def _init_from_batch(self, x: Tensor) -> None:
        peak = x.detach().abs().max().float().reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        self.set_range(peak.item())

    def _integers(self, x: Tensor) -> Tensor:
        qmin, qmax = self.int_range
        return round_clamp(x.detach(), self.scale, qmin, qmax)

    def integers(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Integers q of ``x`` (float dtype, same shape) and the scale (0-dim)."""
        return self._integers(x), self.scale

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self.training and not self.initialized:
            self._init_from_batch(x)
        qmin, qmax = self.int_range
        return _learned_scale_quant(x, self.alpha, self._integers(x), self.levels, qmin, qmax, True)

    def get_extra_state(self) -> dict:
        return {"enabled": self.enabled, "initialized": self.initialized}

    def set_extra_state(self, state: dict) -> None:
        self.enabled = bool(state["enabled"])
        self.initialized = bool(state["initialized"])

    def extra_repr(self) -> str:
        lo, hi = self.int_range
        return f"bits={self.bits}, signed={self.signed}, range=[{lo}, {hi}], enabled={self.enabled}"


# --- the FAT reference code's semantics (imported checkpoints, fatq/reference_import.py) -----------


class _PassThrough(torch.autograd.Function):
    """Returns ``value`` (the quantized weight) with the gradient passed straight to ``w``."""

    @staticmethod
    def forward(ctx, w, value):
        return value

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class SignedMaxWeightQuantizer(MaxAbsWeightQuantizer):
    """The reference code's first/last-layer rule (METHOD.md §3): q = round(W / max(W) · 127), no clamp.

    max(W) is the *signed* maximum, so where min(W) < −max(W) integers fall below −127 and do not fit
    int8. The scale is max(W) / 127. With the extra-state flag ``int8_fallback`` (set only by export,
    :mod:`export.edge_weights`, which records it) the layer uses fatq's max|W| rule instead. Integers
    are computed in the reference's operation order (divide by max(W), then times 127), so they are
    the reference's integers even at a rounding tie.
    """

    kind = "signed_max"

    def __init__(self):
        super().__init__()
        self.int8_fallback = False

    def integers(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Integers (shape of ``w``; may be < −127 unless ``int8_fallback``) and the 0-dim scale."""
        if self.int8_fallback:
            return super().integers(w)
        peak = w.detach().max().clamp_min(torch.finfo(torch.float32).tiny)
        return (w.detach() / peak * self.levels).round_(), peak / self.levels

    def forward(self, w: Tensor) -> Tensor:
        q, scale = self.integers(w)
        return _PassThrough.apply(w, q * scale)

    def get_extra_state(self) -> dict:
        return {"int8_fallback": self.int8_fallback}

    def set_extra_state(self, state: dict) -> None:
        self.int8_fallback = bool(state["int8_fallback"])

    def extra_repr(self) -> str:
        return "rule=max|W| (int8 fallback)" if self.int8_fallback else "rule=signed max(W), no clamp"


class TopClampActivationQuantizer(ActivationQuantizer):
    """The reference code's activation rule (METHOD.md §2): q = round(min(x / α, 1) · m), m = 2^b − 1.

    Only the top is clamped, and m is not capped at 127 (255 levels at 8 bits). For the post-ReLU
    inputs it is used on (the factory refuses signed inputs) x ≥ 0, so the integers lie in [0, m] and
    the function equals the unsigned quantizer's up to the operation order, which is the reference's
    here (divide by α, clamp, times m) so that ties round as the reference rounds them.
    """

    clamp = "top"

    def __init__(self, bits: int, alpha_init: float = 5.0):
        super().__init__(bits, signed=False, alpha_init=alpha_init)
        self.levels = 2**bits - 1

    def _integers(self, x: Tensor) -> Tensor:
        return (x.detach() / self.alpha.detach()).clamp_(max=1.0).mul_(self.levels).round_()


class ReferenceOrderWeightQuantizer(UniformWeightQuantizer):
    """:class:`UniformWeightQuantizer` with the reference code's operation order (METHOD.md §1.6).

    q = sign(u) · round(|u| · n), u = clamp(W_t / α_w, −1, 1), instead of round(W_t / (α_w / n)): the
    same number in real arithmetic, but in float32 the two can round to different integers where
    W_t / α_w · n lies within an ulp of a half-integer (seen once in 9,216 weights at 8 bits), so
    imported checkpoints use this order to keep every integer the reference's.
    """

    def _integers(self, w: Tensor) -> Tensor:
        u = (w.detach() / self.alpha.detach()).clamp_(-1, 1)
        return u.abs().mul_(self.levels).round_().mul_(u.sign())


# Smallest learned clipping threshold training leaves: far below any useful range (init 3.0 for
# weights, 5.0/8.0 for activations), so it only ever acts on a step that would have made alpha
# zero or negative (export refuses those: a scale must be positive).
ALPHA_FLOOR = 1e-3


@torch.no_grad()
def clamp_alphas_(model: nn.Module, floor: float = ALPHA_FLOOR) -> None:
    """Raise every learned clipping threshold of ``model`` to at least ``floor``, in place.

    Why a bound after each optimizer step rather than a positive parametrization (alpha =
    exp(theta)), measured (docs/data-pipeline.md, "Keeping α positive"): on the random-init
    MobileNetV2 W4A4 repro the parametrization underflowed seven alphas to exactly 0 after one
    step and went NaN at step 2 (the bound: NaN at step 4, from exploding weight gradients, with
    every alpha >= the floor before it); and it is a different optimizer for alpha (SGD on theta
    moves alpha by about -lr * alpha^2 * g, weight decay pulls alpha to 1), which changed a
    healthy ResNet-20 run. The bound changes no step in which alpha stays above it (the method's
    update stays exactly METHOD.md's), keeps the state-dict key and every writer of alpha
    (calibration, PTQ), and old checkpoints load unchanged. No count is returned: on CUDA it would cost
    a device sync per quantizer per step. NaN stays NaN (clamp propagates it) for the trainer's
    non-finite check to report.
    """
    for module in model.modules():
        if isinstance(module, (UniformWeightQuantizer, PerChannelWeightQuantizer, ActivationQuantizer)):
            module.alpha.clamp_(min=floor)
