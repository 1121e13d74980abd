"""Fit stem/classifier weights of imported reference models into int8 before export, and say so.

The FAT reference code scales its first conv and last linear by the *signed* max(W) without a
clamp (METHOD.md §3), so where min(W) < −max(W) their integers fall below −127 and no int8 engine
holds them. Export must not change the model silently: :func:`fit_edge_weights_to_int8` switches
exactly those layers to fatq's max|W| rule (scale max|W| / 127, integers in [−127, 127]) and returns
one record per changed layer, which fatq-export stores in the file's metadata
(``edge_weight_requantization``) and its JSON report. Layers whose integers fit keep the
reference's integers bit for bit.

:func:`refuse_wide_activations` stops the export of 8-bit imported models, whose activations have the
reference's 255 levels (2^8 − 1) where int8 with zero point 0 holds 127, with one sentence.
"""

from __future__ import annotations

import torch
from torch import nn

from fatq.errors import FatqError
from fatq.layers import QUANTIZED_LAYERS
from fatq.quantizers import SignedMaxWeightQuantizer, TopClampActivationQuantizer

INT8_MIN = -127


def fit_edge_weights_to_int8(model: nn.Module) -> list[dict]:
    """Re-quantize every signed-max layer whose integers leave [−127, 127] with max|W|; in place.

    Returns:
        One dict per re-quantized layer: ``layer``, ``old_rule`` / ``new_rule``, ``old_integer_range`` /
        ``new_integer_range`` ([min, max]), ``old_scale`` / ``new_scale`` and ``relative_weight_change``
        (‖W_new − W_old‖₂ / ‖W_old‖₂ of the dequantized weights). Empty when nothing had to change.
    """
    records = []
    for name, layer in model.named_modules():
        if not isinstance(layer, QUANTIZED_LAYERS):
            continue
        quantizer = layer.weight_quantizer
        if not isinstance(quantizer, SignedMaxWeightQuantizer) or quantizer.int8_fallback:
            continue
        old_q, old_scale = layer.weight_integers()
        if int(old_q.min()) >= INT8_MIN:
            continue
        quantizer.int8_fallback = True
        new_q, new_scale = layer.weight_integers()
        old_w, new_w = old_q * old_scale, new_q * new_scale
        records.append(
            {
                "layer": name,
                "old_rule": "signed max(W), no clamp (reference)",
                "new_rule": "max|W| (fatq, METHOD.md §3)",
                "old_integer_range": [int(old_q.min()), int(old_q.max())],
                "new_integer_range": [int(new_q.min()), int(new_q.max())],
                "old_scale": float(old_scale),
                "new_scale": float(new_scale),
                "relative_weight_change": float(
                    torch.linalg.vector_norm(new_w - old_w) / torch.linalg.vector_norm(old_w)
                ),
            }
        )
    return records


def describe(records: list[dict]) -> str:
    """One line per re-quantized layer, for the export log."""
    return "\n".join(
        f"re-quantized {r['layer']} for int8: integers {r['old_integer_range']} ({r['old_rule']}) -> "
        f"{r['new_integer_range']} ({r['new_rule']}), weights moved by {100 * r['relative_weight_change']:.2f} % (L2)"
        for r in records
    )


def refuse_wide_activations(model: nn.Module) -> None:
    """FatqError if a reference-semantics activation quantizer has more than 127 levels (8-bit imports)."""
    wide = [n for n, q in model.named_modules() if isinstance(q, TopClampActivationQuantizer) and q.levels > 127]
    if wide:
        raise FatqError(
            f"{wide[0]} ({len(wide)} in all) has the reference's {2**8 - 1} activation levels (8 bits), beyond int8's "
            "127 with zero point 0; this imported model cannot be exported to an int8 engine."
        )
