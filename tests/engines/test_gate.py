"""The accuracy-parity gate: metrics against closed forms, and fatq-bench's exit status on a broken model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from engine_helpers import export_float_onnx, export_qdq_onnx, save_resnet_checkpoint, scale_initializer

from engines.cli import main
from engines.gate import evaluate_gate
from fatq.errors import FatqError
from fatq.metrics import Agreement, agreement, topk_accuracy


def test_topk_accuracy_closed_form():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    labels = np.array([1, 2, 2, 1])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(50.0)  # rows 0 and 2
    assert topk_accuracy(logits, labels, 2) == pytest.approx(75.0)  # row 3's label is second; row 1's third
    assert topk_accuracy(logits, labels, 5) == pytest.approx(100.0)  # k capped at the 3 classes


def test_agreement_closed_form():
    reference = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    engine = np.array([[1.0, 0.5], [1.0, 0.0], [3.0, 4.0]])
    result = agreement(engine, reference)
    assert result.top1_agreement_pct == pytest.approx(200 / 3)  # row 1 flips
    assert result.max_abs_logit_diff == pytest.approx(2.0)
    assert result.mean_abs_logit_diff == pytest.approx((0.5 + 1.0 + 2.0) / 6)
    cosines = [1 / np.sqrt(1.25), 0.0, 1.0]
    assert result.cosine == pytest.approx(np.mean(cosines)) and result.cosine_min == pytest.approx(0.0)
    same = agreement(reference, reference)
    assert (same.top1_agreement_pct, same.max_abs_logit_diff, same.cosine) == (100.0, 0.0, pytest.approx(1.0))


def _agreement(pct: float) -> Agreement:
    return Agreement(pct, 0.1, 0.01, 0.99, 0.9, 100)


def test_gate_names_the_run_and_the_shortfall():
    gate = evaluate_gate(
        {"ort": _agreement(99.95), "openvino": _agreement(98.5)},
        {"ort": {"top1": 91.0}, "openvino": {"top1": 89.0}},
        reference_top1=91.2,
        min_agreement_pct=99.9,
        max_accuracy_drop_pts=1.0,
    )
    assert not gate.passed
    assert len(gate.reasons) == 2
    assert gate.reasons[0].startswith("openvino: top-1 agreement 98.50 %") and "short by 1.40 points" in gate.reasons[0]
    assert gate.reasons[1].startswith("openvino: top-1 89.00 % is 2.20 points below")
    assert evaluate_gate({"ort": _agreement(100.0)}, {}, None, min_agreement_pct=99.9).passed
    assert evaluate_gate({}, {}, None).passed  # no bounds, nothing to fail
    with pytest.raises(FatqError, match="--reference"):
        evaluate_gate({}, {}, None, min_agreement_pct=99.0)


@pytest.fixture(scope="module")
def fp32_pair(tmp_path_factory):
    """An FP32 resnet20 checkpoint and its ONNX export (torch.onnx, independent of fatq's exporter)."""
    root = tmp_path_factory.mktemp("gate")
    model = save_resnet_checkpoint(root / "fp32.pt", bits=32)
    export_float_onnx(model, root / "fp32.onnx", (3, 32, 32))
    return root / "fp32.pt", root / "fp32.onnx"


GATE_ARGS = ["--batch-sizes", "8", "--warmup", "0", "--iterations", "1", "--rounds", "1", "--threads", "1", "--quiet"]


def test_gate_passes_on_the_right_model_and_fails_on_a_broken_one(fp32_pair, tmp_path, capsys):
    ckpt, good = fp32_pair
    gate = ["--reference", str(ckpt), "--min-agreement", "99.9", "--limit", "64"]
    assert main([str(good), "--engine", "ort", *gate, *GATE_ARGS]) == 0
    assert capsys.readouterr().err == ""

    # The classifier's weights negated: argmax becomes argmin on every input.
    broken = scale_initializer(good, tmp_path / "broken.onnx", "linear.weight", -1.0)
    assert main([str(broken), "--engine", "ort", "--engine", "openvino", *gate, *GATE_ARGS]) == 1
    err = capsys.readouterr().err
    assert "gate failed: ort: top-1 agreement" in err and "gate failed: openvino: top-1 agreement" in err
    assert "short by" in err


def test_qdq_gate_passes_on_the_export_and_fails_with_one_scale_changed(tmp_path, capsys):
    ckpt = tmp_path / "w8.pt"
    # Seed 0's classifier margins on random images exceed 1.5 logits, ten times the engines'
    # deviation from the fake-quant model (about 0.1 at 8 bits): the right file must agree 100 %.
    model = save_resnet_checkpoint(ckpt, bits=8, seed=0)
    good = export_qdq_onnx(model, tmp_path / "w8.onnx")
    report = tmp_path / "good.json"
    gate = ["--reference", str(ckpt), "--min-agreement", "99.9", "--limit", "64", "--json", str(report)]
    assert main([str(good), "--engine", "ort", "--engine", "openvino", *gate, *GATE_ARGS]) == 0
    predicted = json.loads(report.read_text())
    assert all(a["top1_agreement_pct"] == 100.0 for a in predicted["agreement"].values())

    # The classifier's (per-tensor) weight scale with its sign flipped: the winning logit drops below others.
    broken = scale_initializer(good, tmp_path / "broken.onnx", "linear.weight_scale", -1.0)
    assert main([str(broken), "--engine", "ort", "--engine", "openvino", *gate, *GATE_ARGS]) == 1
    err = capsys.readouterr().err
    assert "gate failed: ort: top-1 agreement" in err and "gate failed: openvino: top-1 agreement" in err
