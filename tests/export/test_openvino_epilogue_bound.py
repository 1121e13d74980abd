"""benchmarks/openvino_epilogue_bound.py's probes: 16-level FakeQuantizes become 256-level ones of the same step."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from export_helpers import benchmark_script, input_shape_for, trained_like
from onnx import numpy_helper

from export.engine_exact import make_engine_exact
from export.openvino_writer import write_openvino
from export.pipeline import deploy_graph


def _fake_quantizes(model) -> list[tuple[str, int, list[np.ndarray]]]:
    """[(node name, levels, [input low, input high, output low, output high])] in node order."""
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [
        (n.name, next(a.i for a in n.attribute if a.name == "levels"), [constants[x] for x in n.input[1:5]])
        for n in model.graph.node
        if n.op_type == "FakeQuantize"
    ]


@pytest.fixture(scope="module")
def written():
    model = trained_like("resnet20", 4)
    graph, _ = make_engine_exact(model, lambda m: deploy_graph(m, input_shape_for("resnet20")))
    return write_openvino(graph)


def test_every_narrow_quantizer_widened_with_its_step_and_low_bounds(written):
    script = benchmark_script("openvino_epilogue_bound")
    snapshot = written.SerializeToString()
    probe, count = script.widened(written, None)
    before, after = _fake_quantizes(written), _fake_quantizes(probe)
    narrow = [i for i, (_, levels, _) in enumerate(before) if levels < 256]
    assert count == len(narrow) > 0
    onnx.checker.check_model(probe)  # e.g. unique initializer names where two bounds shared one constant
    metadata = {p.key: p.value for p in probe.metadata_props}
    assert "not the model" in metadata[script.PROBE_KEY]
    assert {p.key for p in written.metadata_props} < set(metadata)  # the file's own entries kept
    assert all(levels == 256 for _, levels, _ in after)
    for i in narrow:
        levels, (il, ih, ol, oh) = before[i][1], before[i][2]
        _, _, (wil, wih, wol, woh) = after[i]
        np.testing.assert_array_equal(wil, il)
        np.testing.assert_array_equal(wol, ol)
        np.testing.assert_allclose((wih - wil) / 255, (ih - il) / (levels - 1), rtol=1e-6)
        np.testing.assert_allclose((woh - wol) / 255, (oh - ol) / (levels - 1), rtol=1e-6)
    assert written.SerializeToString() == snapshot  # the written model is left as it was


def test_conv_and_add_probes_split_the_quantizers_by_what_they_read(written):
    script = benchmark_script("openvino_epilogue_bound")
    producer = {out: n.op_type for n in written.graph.node for out in n.output}
    reads = [producer.get(n.input[0]) for n in written.graph.node if n.op_type == "FakeQuantize"]
    levels = [lv for _, lv, _ in _fake_quantizes(written)]
    for label, kind in (("conv", "Conv"), ("add", "Add")):
        _, count = script.widened(written, script.PROBES[label])
        assert count == sum(1 for r, lv in zip(reads, levels, strict=True) if r == kind and lv < 256)
    assert script.widened(written, script.PROBES["conv"])[1] > 0
