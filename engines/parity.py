"""Accuracy, agreement with a reference model, and the CI accuracy-parity gate.

All functions take logits as numpy arrays [N, num_classes] (float32/float64) and labels as
integer arrays [N]; they are pure, so tests check them against closed forms.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fatq.errors import FatqError


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Percentage of samples whose label is among the ``k`` largest logits.

    ``k`` is capped at the number of classes (top-5 of a 3-class model is 100 %). Ties are broken
    by the sort order (stable on the class index).
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise FatqError(f"logits must be [N, C] and labels [N], got {logits.shape} and {labels.shape}.")
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(100.0 * np.mean(np.any(top == labels[:, None], axis=1)))


@dataclass(frozen=True)
class Agreement:
    """How closely an engine's logits follow the reference's on the same inputs.

    Attributes:
        top1_agreement_pct: % of samples where both pick the same class.
        max_abs_logit_diff: max over samples and classes of |engine - reference|.
        mean_abs_logit_diff: mean of the same.
        cosine: mean over samples of the cosine similarity of the two logit vectors.
        cosine_min: its minimum over samples.
        samples: N.
    """

    top1_agreement_pct: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    cosine: float
    cosine_min: float
    samples: int

    def to_dict(self) -> dict:
        return asdict(self)


def agreement(logits: np.ndarray, reference: np.ndarray) -> Agreement:
    """Compare ``logits`` [N, C] with ``reference`` [N, C] (see :class:`Agreement`)."""
    a, b = np.asarray(logits, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise FatqError(f"engine logits {a.shape} and reference logits {b.shape} must have the same [N, C] shape.")
    diff = np.abs(a - b)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    # Two zero vectors agree perfectly; a zero against a non-zero vector does not.
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    cosine = np.where(both_zero, 1.0, dots / np.where(norms > 0, norms, 1.0))
    return Agreement(
        top1_agreement_pct=float(100.0 * np.mean(a.argmax(axis=1) == b.argmax(axis=1))),
        max_abs_logit_diff=float(diff.max()),
        mean_abs_logit_diff=float(diff.mean()),
        cosine=float(cosine.mean()),
        cosine_min=float(cosine.min()),
        samples=int(a.shape[0]),
    )


@dataclass(frozen=True)
class GateResult:
    """Outcome of the parity gate: ``passed`` and one sentence per violated bound."""

    passed: bool
    reasons: list[str]
    min_agreement_pct: float | None
    max_accuracy_drop_pts: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_gate(
    agreements: dict[str, Agreement],
    accuracies: dict[str, dict],
    reference_top1: float | None,
    min_agreement_pct: float | None = None,
    max_accuracy_drop_pts: float | None = None,
) -> GateResult:
    """Check every run against the gate's bounds.

    Args:
        agreements: {run label: Agreement with the reference}.
        accuracies: {run label: {"top1": %, "top5": %}}.
        reference_top1: the reference model's top-1 % on the same data (for the drop bound).
        min_agreement_pct: each run's top-1 agreement must be >= this; None: not checked.
        max_accuracy_drop_pts: each run's top-1 must be >= reference_top1 - this; None: not checked.

    Returns:
        GateResult; ``reasons`` name the run and by how much it missed.
    """
    reasons = []
    if min_agreement_pct is not None:
        if not agreements:
            raise FatqError("--min-agreement needs --reference (agreement is measured against the reference model).")
        for label, result in agreements.items():
            if result.top1_agreement_pct < min_agreement_pct:
                short = min_agreement_pct - result.top1_agreement_pct
                reasons.append(
                    f"{label}: top-1 agreement {result.top1_agreement_pct:.2f} % is below {min_agreement_pct:.2f} % "
                    f"(short by {short:.2f} points)"
                )
    if max_accuracy_drop_pts is not None:
        if reference_top1 is None or not accuracies:
            raise FatqError("--max-accuracy-drop needs --data-dir and --reference (the drop is against the reference).")
        for label, result in accuracies.items():
            drop = reference_top1 - result["top1"]
            if drop > max_accuracy_drop_pts:
                reasons.append(
                    f"{label}: top-1 {result['top1']:.2f} % is {drop:.2f} points below the reference's "
                    f"{reference_top1:.2f} % (allowed {max_accuracy_drop_pts:.2f})"
                )
    return GateResult(not reasons, reasons, min_agreement_pct, max_accuracy_drop_pts)
