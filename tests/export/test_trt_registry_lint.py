"""The TensorRT lint over the TensorRT file (``--format onnx``) of every registry model: zero findings.

Ten architectures x W2A2, W4A4, W8A8 x both ``edge_inputs`` modes, random-init models (the file's form
does not depend on training). Models that keep their edge inputs float get 8-bit ranges from random
batches through the exporter's own calibration pass (what ``--calib-data`` runs on real images).
Written as the exporter writes it (fold, lower, :func:`export.qdq_writer.write_qdq`) without the
engine-exact moves, which change values, not the graph's form.
"""

from __future__ import annotations

import pytest
import torch
from export_helpers import input_shape_for

from export.lint_rules import lint
from export.pipeline import deploy_graph
from export.qdq_writer import write_qdq
from fatq.calibration_pass import activation_quantizers, calibrate
from fatq.models import create_model, list_models
from fatq.qconfig import QuantSpec

CASES = [(name, bits, edge) for name in list_models() for bits in (2, 4, 8) for edge in ("int8", "float")]


def _model(name: str, bits: int, edge: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name, spec=QuantSpec(bits, bits, edge_inputs=edge)).eval()
    disabled = [n for n, q in activation_quantizers(model).items() if not q.enabled]
    if disabled:
        batches = [torch.randn(4, *input_shape_for(name)) for _ in range(2)]
        calibrate(model, batches, method="minmax", quantizers=disabled, quiet=True)
    return model


@pytest.mark.parametrize(("name", "bits", "edge"), CASES, ids=[f"{n}-w{b}a{b}-{e}" for n, b, e in CASES])
def test_tensorrt_file_of_every_registry_model_is_lint_clean(name, bits, edge):
    onnx_model = write_qdq(deploy_graph(_model(name, bits, edge), input_shape_for(name)))
    assert onnx_model.opset_import[0].version == 20
    findings = lint(onnx_model, "trt")
    assert findings == [], [f"[{f.rule}] {f}" for f in findings[:5]]
