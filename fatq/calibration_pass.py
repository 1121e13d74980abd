"""The calibration pass: give activation quantizers ranges from data.

All target quantizers are calibrated at once, from one pass over the batches, with every target
disabled (identity) while collecting: each one sees the float activation of the model as it
stands. That is the usual PTQ practice (TensorRT, ONNX Runtime and ModelOpt calibrate on the
float network) and costs a single pass; quantizers that are not targets keep acting as they
are, so calibrating only the first/last-layer inputs of a trained FAT model sees the activations
of its quantized body, which is what the deployed model feeds them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from fatq.calibrators import Calibrator, make_calibrator
from fatq.errors import FatqError
from fatq.io import progress
from fatq.quantizers import ActivationQuantizer


def activation_quantizers(model: nn.Module) -> dict[str, ActivationQuantizer]:
    """Every :class:`ActivationQuantizer` of ``model`` by module path, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ActivationQuantizer)}


def select_quantizers(model: nn.Module, paths: Iterable[str] | None) -> dict[str, ActivationQuantizer]:
    """The quantizers at ``paths``, or every disabled one (no learned range) when ``paths`` is None."""
    available = activation_quantizers(model)
    if paths is None:
        return {name: q for name, q in available.items() if not q.enabled}
    selected = {}
    for path in paths:
        if path not in available:
            raise FatqError(f"{path!r} is not an activation quantizer of this model.")
        selected[path] = available[path]
    return selected


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def collect_activations(
    model: nn.Module,
    batches: Iterable[Tensor],
    calibrators: dict[str, Calibrator],
    quiet: bool = False,
    all_reduce: bool = True,
) -> int:
    """Run ``batches`` through ``model`` (eval, no grad) feeding each quantizer's input to its calibrator.

    The quantizers named in ``calibrators`` are disabled while collecting (their flags are restored
    afterwards, also on error). With ``all_reduce`` and an initialised process group, statistics
    are merged across ranks at the end.

    Args:
        model: the model.
        batches: iterable of normalized float tensors [B, C, H, W].
        calibrators: {quantizer path: calibrator}.
        quiet: no progress bar.
        all_reduce: merge statistics across DDP ranks.

    Returns:
        Number of batches run.
    """
    modules = dict(model.named_modules())
    targets = {path: modules[path] for path in calibrators}
    saved_enabled = {path: q.enabled for path, q in targets.items()}
    was_training = model.training
    device = _model_device(model)
    handles = []
    count = 0
    try:
        for path, quantizer in targets.items():
            quantizer.enabled = False
            calibrator = calibrators[path]
            handles.append(quantizer.register_forward_pre_hook(lambda _m, args, c=calibrator: c.collect(args[0])))
        model.eval()
        total = len(batches) if hasattr(batches, "__len__") else None
        with torch.no_grad():
            for batch in progress(batches, total=total, desc="calibrating", quiet=quiet):
                model(batch.to(device))
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        for path, quantizer in targets.items():
            quantizer.enabled = saved_enabled[path]
        model.train(was_training)
    if count == 0:
        raise FatqError("calibration got no batches.")
    if all_reduce:
        reduce_device = device if device.type == "cuda" else torch.device("cpu")
        for calibrator in calibrators.values():
            calibrator.all_reduce(reduce_device)
    return count


def calibrate(
    model: nn.Module,
    batches: Iterable[Tensor],
    method: str = "minmax",
    quantizers: Iterable[str] | None = None,
    quiet: bool = False,
    **options,
) -> dict[str, float]:
    """Calibrate activation quantizers of ``model`` and write their ranges (which enables them).

    Args:
        model: a fatq model (any ``nn.Module`` holding :class:`ActivationQuantizer` s).
        batches: iterable of normalized float tensors [B, C, H, W] (moved to the model's device).
        method: a key of :data:`fatq.calibrators.CALIBRATORS`.
        quantizers: module paths of the quantizers to calibrate; default every disabled one.
        quiet: no progress bar.
        **options: calibrator options (``percentile=99.99``, ``num_bins=2048``).

    Returns:
        {quantizer path: alpha} as written by ``quantizer.set_range(alpha)``, where the scale is
        alpha / levels with the quantizer's own bits and signedness.
    """
    targets = select_quantizers(model, quantizers)
    if not targets:
        return {}
    calibrators = {path: make_calibrator(method, **options) for path in targets}
    collect_activations(model, batches, calibrators, quiet=quiet)
    silent = [path for path, c in calibrators.items() if c.empty]
    if silent:
        raise FatqError(f"quantizer(s) {silent[:3]} saw no data during calibration; the model never runs them.")
    alphas = {}
    for path, quantizer in targets.items():
        rng = calibrators[path].compute(quantizer.bits, quantizer.signed)
        quantizer.set_range(rng.alpha)
        alphas[path] = float(quantizer.alpha.detach())
    return alphas
