"""The CI accuracy-parity gate of fatq-bench: every run's agreement and accuracy against bounds.

The numbers it judges come from :mod:`fatq.metrics` (:class:`~fatq.metrics.Agreement`, top-k
accuracy); the function is pure, so tests check it on hand-made values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fatq.errors import FatqError
from fatq.metrics import Agreement


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
