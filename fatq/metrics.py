"""Accuracy and agreement: the numbers every fatq stage reports about logits.

Used by training (:mod:`fatq.train`), PTQ (:mod:`calibration.ptq`), the deploy check
(:mod:`engines.deploy_check`) and fatq-bench (:mod:`engines.bench`, :mod:`engines.gate`).
Logits are [N, num_classes], labels integer [N]. The numpy functions are pure, so tests check
them against closed forms; :func:`topk_correct` stays in torch (it runs on the training device
and its counts are summed across DDP ranks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fatq.errors import FatqError


def topk_correct(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    """Number of samples whose label is among the top-``k`` logits (0-dim int64)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()


def top1_correct(logits, labels) -> int:
    """Number of samples whose largest logit is the label (numpy arrays or torch tensors on one device)."""
    return int((logits.argmax(1) == labels).sum())


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


def model_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 250) -> float:
    """Top-1 accuracy (%) of ``model`` (eval mode, no gradients) on normalized ``images`` [N, C, H, W]."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
            correct += top1_correct(model(x), y)
    return 100.0 * correct / len(labels)


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


class RunningAgreement:
    """Top-1 agreement and logit differences of two logit streams, batch by batch (no logits kept)."""

    def __init__(self):
        self.agree = self.count = 0
        self.max_diff = 0.0
        self.sum_diff = 0.0
        self.elements = 0

    def update(self, a: np.ndarray, b: np.ndarray) -> None:
        """Add one batch: ``a`` and ``b`` [B, C]."""
        self.agree += top1_correct(a, b.argmax(1))
        self.count += a.shape[0]
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        self.max_diff = max(self.max_diff, float(diff.max(initial=0)))
        self.sum_diff += float(diff.sum())
        self.elements += diff.size

    def result(self) -> dict:
        """{"top1_agreement_pct", "max_abs_logit_diff", "mean_abs_logit_diff"} so far."""
        return {
            "top1_agreement_pct": 100.0 * self.agree / max(self.count, 1),
            "max_abs_logit_diff": self.max_diff,
            "mean_abs_logit_diff": self.sum_diff / max(self.elements, 1),
        }
