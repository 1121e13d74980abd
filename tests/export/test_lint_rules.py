"""Deployment linter: every rule has a minimal ONNX graph that breaks it and one that passes.

The graphs are built with ``onnx.helper``: input -> Clip -> Q -> DQ -> Conv(DQ(W), b) -> Relu, each
part switchable to a broken (or an alternative accepted) form. The rule table itself is checked too:
every rule has a violation case here, a source and a known target.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
from export_helpers import lowered_case, trained_like
from onnx import TensorProto, helper, numpy_helper

from export.fold import fold
from export.lint_rules import (
    DEFAULT_TRT_VERSION,
    RULES,
    RULES_BY_ID,
    TARGETS,
    assert_clean,
    lint,
    main_lint,
    rules_for,
    trt_version_info,
)
from export.lower import lower
from export.qdq_writer import write_qdq
from fatq.errors import FatqError

C = 4
ZERO = np.int8(0)
X_SCALE = np.float32(0.05)
W_SCALE = np.full(C, 0.02, np.float32)


def _graph(
    x_zp=ZERO,
    q_has_zp=True,
    x_scale=X_SCALE,
    x_scale_const=True,
    w_dtype=np.int8,
    w_scale=W_SCALE,
    w_zp=None,
    w_axis=0,
    weight_from_dq=True,
    bias="float",
    clip="float",
    op="Conv",
    gemm_beta=1.0,
    gemm_trans_b=1,
    input_dtype=TensorProto.FLOAT,
    q_input="clip",
    extra_nodes=(),
    extra_inits=(),
    opset=20,
) -> onnx.ModelProto:
    """A one-layer QDQ graph; each argument switches one part to another form (defaults: TensorRT-clean).

    Conv: input [1, C, 8, 8] -> Clip -> Q -> DQ -> Conv(DQ(W [C, C, 3, 3]), bias) -> Relu -> output.
    Gemm (``op="Gemm"``): input [1, C] -> ... -> Gemm(DQ(W [C, C]), bias) -> Relu -> output.
    """
    shape = [1, C, 8, 8] if op == "Conv" else [1, C]
    w_shape = (C, C, 3, 3) if op == "Conv" else (C, C)
    w_zp = np.zeros(np.size(w_scale), np.int8) if w_zp is None else w_zp
    inits = [
        numpy_helper.from_array(np.asarray(x_zp), "x_zp"),
        numpy_helper.from_array(np.ones(w_shape, w_dtype), "w"),
        numpy_helper.from_array(np.asarray(w_scale), "w_scale"),
        numpy_helper.from_array(np.asarray(w_zp), "w_zp"),
        numpy_helper.from_array(np.ones(w_shape, np.float32), "w_float"),
    ]
    nodes = []
    if x_scale_const:
        inits.append(numpy_helper.from_array(np.asarray(x_scale), "x_scale"))
    else:
        inits.append(numpy_helper.from_array(np.asarray(x_scale), "x_scale_src"))
        nodes.append(helper.make_node("Abs", ["x_scale_src"], ["x_scale"], name="abs"))
    if clip == "tensor":  # a bound computed at run time
        inits += [numpy_helper.from_array(np.float32(1.0), "hi"), numpy_helper.from_array(np.float32(1.0), "one")]
        nodes.append(helper.make_node("Neg", ["one"], ["lo"], name="neg"))
    else:
        bound = np.int8 if clip == "int8" else np.float32
        inits += [numpy_helper.from_array(bound(-1), "lo"), numpy_helper.from_array(bound(1), "hi")]
    source = "input"
    if q_input == "int32":
        nodes.append(helper.make_node("Cast", ["input"], ["input_i32"], name="cast", to=TensorProto.INT32))
        source = "input_i32"
    nodes.append(helper.make_node("Clip", [source, "lo", "hi"], ["clipped"], name="clip"))
    q_inputs = ["clipped", "x_scale", "x_zp"] if q_has_zp else ["clipped", "x_scale"]
    nodes += [
        helper.make_node("QuantizeLinear", q_inputs, ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", *q_inputs[1:]], ["xd"], name="dq"),
    ]
    w_attrs = {} if w_axis is None else {"axis": w_axis}
    nodes.append(helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wd"], name="dq_w", **w_attrs))
    b_scale = (np.float32(0.05) * np.asarray(w_scale, np.float32)).astype(np.float32)
    if bias == "float":
        inits.append(numpy_helper.from_array(np.zeros(C, np.float32), "b"))
    elif bias == "float64":
        inits.append(numpy_helper.from_array(np.zeros(C, np.float64), "b"))
    elif bias == "tensor":
        inits.append(numpy_helper.from_array(np.zeros(C, np.float32), "b_src"))
        nodes.append(helper.make_node("Abs", ["b_src"], ["b"], name="abs_b"))
    elif bias in ("int32", "int32-wrong-scale"):
        scale = b_scale if bias == "int32" else b_scale * 2
        inits += [
            numpy_helper.from_array(np.arange(C, dtype=np.int32), "b_q"),
            numpy_helper.from_array(scale, "b_scale"),
            numpy_helper.from_array(np.zeros(C, np.int32), "b_zp"),
        ]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b"], name="dq_b", axis=0))
    weighted = ["xd", "wd" if weight_from_dq else "w_float", "b"]
    if op == "Conv":
        nodes.append(helper.make_node("Conv", weighted, ["y"], name="conv", pads=[1, 1, 1, 1]))
    else:
        nodes.append(helper.make_node("Gemm", weighted, ["y"], name="gemm", transB=gemm_trans_b, beta=gemm_beta))
    nodes.append(helper.make_node("Relu", ["y"], ["output"], name="relu"))
    opsets = [helper.make_opsetid("", opset)]
    nodes += extra_nodes
    inits += [numpy_helper.from_array(value, name) for name, value in extra_inits]
    opsets += [helper.make_opsetid(domain, 1) for domain in sorted({n.domain for n in extra_nodes} - {""})]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", input_dtype, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def _found(model, target, rule, **kwargs) -> set[str]:
    """Nodes (or tensors) ``rule`` reports on ``model`` for ``target``."""
    return {f.node for f in lint(model, target, **kwargs) if f.rule == rule}


def test_well_formed_graph_is_clean_for_every_target():
    for target in TARGETS:
        assert lint(_graph(), target) == [], target
        assert lint(_graph(op="Gemm"), target) == [], target


# (graph arguments, target, rule, node or tensor it names)
VIOLATIONS = [
    ({"bias": "int32"}, "trt", "trt-dq-input-int8", "dq_b"),
    ({"w_dtype": np.int16, "w_zp": np.zeros(C, np.int16)}, "ort", "dq-input-int8", "dq_w"),
    ({"w_dtype": np.int16, "w_zp": np.zeros(C, np.int16)}, "openvino", "dq-input-int8", "dq_w"),
    ({"q_input": "int32", "clip": "int32"}, "trt", "trt-q-input-float", "q"),
    ({"q_has_zp": False}, "trt", "zero-point-int8", "q"),
    ({"x_zp": np.int32(0)}, "ort", "zero-point-int8", "q"),
    ({"w_zp": np.zeros(C, np.int32)}, "openvino", "zero-point-int8", "dq_w"),
    ({"x_zp": np.int8(3)}, "trt", "zero-point-zero", "q"),
    ({"w_zp": np.array([0, 0, 1, 0], np.int8)}, "ort", "zero-point-zero", "dq_w"),
    ({"w_zp": np.zeros(C - 1, np.int8)}, "trt", "zero-point-count", "dq_w"),
    ({"x_zp": np.zeros(2, np.int8)}, "openvino", "zero-point-count", "q"),
    ({"x_scale_const": False}, "trt", "scale-constant", "q"),
    ({"x_scale": np.float64(0.05)}, "trt", "scale-float32", "q"),
    ({"w_scale": np.full(C, 0.02, np.float16)}, "ort", "scale-float32", "dq_w"),
    ({"w_scale": np.array([0.02, -0.02, 0.02, 0.02], np.float32)}, "trt", "scale-positive", "dq_w"),
    ({"x_scale": np.float32(0.0)}, "openvino", "scale-positive", "q"),
    ({"w_axis": 1}, "trt", "per-channel-axis", "dq_w"),
    ({"w_axis": None}, "trt", "per-channel-axis", "dq_w"),  # TensorRT's default axis depends on its release
    ({"w_axis": None}, "ort", "per-channel-axis", "dq_w"),  # ONNX default 1 is not a Conv weight's axis
    (
        {"w_scale": np.full(C - 1, 0.02, np.float32), "w_zp": np.zeros(C - 1, np.int8)},
        "trt",
        "per-channel-axis",
        "dq_w",
    ),
    ({"x_scale": np.full(C, 0.05, np.float32), "x_zp": np.zeros(C, np.int8)}, "ort", "per-channel-axis", "q"),
    ({"op": "Gemm", "gemm_trans_b": 0, "w_axis": 0}, "trt", "per-channel-axis", "dq_w"),
    ({"weight_from_dq": False}, "trt", "weighted-inputs-dequantized", "conv"),
    ({"weight_from_dq": False}, "ort", "weighted-inputs-dequantized", "conv"),
    ({"bias": "int32"}, "trt", "trt-bias-float", "conv"),
    ({"bias": "float64"}, "trt", "trt-bias-float", "conv"),
    ({"bias": "tensor"}, "trt", "trt-bias-float", "conv"),
    ({"bias": "int32-wrong-scale"}, "ort", "bias-form", "conv"),
    ({"bias": "float64"}, "openvino", "bias-form", "conv"),
    ({"bias": "tensor"}, "ort", "bias-form", "conv"),
    ({"clip": "tensor"}, "trt", "clip-constant", "clip"),
    ({"clip": "tensor"}, "openvino", "clip-constant", "clip"),
    ({"clip": "int8"}, "trt", "trt-clip-float", "clip"),
    ({"q_input": "int32", "clip": "int32"}, "trt", "trt-clip-float", "clip"),
    ({"input_dtype": TensorProto.UINT8}, "trt", "no-uint8", "input"),
    ({"x_zp": np.uint8(0)}, "ort", "no-uint8", "x_zp"),
    ({"q_has_zp": False}, "openvino", "no-uint8", "q"),  # ONNX's default Q output type is uint8
    ({"opset": 21}, "trt", "trt-opset", "opset_import"),
    ({"extra_nodes": [helper.make_node("Sigmoid", ["output"], ["s"], name="sig")]}, "trt", "trt-op-supported", "sig"),
    (
        {"extra_nodes": [helper.make_node("QLinearAdd", ["output"], ["s"], name="qadd", domain="com.microsoft")]},
        "trt",
        "trt-op-supported",
        "qadd",
    ),
    (
        {
            "extra_nodes": [
                helper.make_node("MaxPool", ["output"], ["s"], name="pool", kernel_shape=[2, 2], dilations=[2, 2])
            ]
        },
        "trt",
        "trt-op-supported",
        "pool",
    ),
    (
        {
            "extra_nodes": [
                helper.make_node("Shape", ["output"], ["rank_axes"], name="shape", start=1, end=2),
                helper.make_node("Slice", ["output", "starts", "ends", "rank_axes"], ["s"], name="slice"),
            ],
            "extra_inits": [("starts", np.array([0], np.int64)), ("ends", np.array([2], np.int64))],
        },
        "trt",
        "trt-op-supported",
        "slice",
    ),
    ({"op": "Gemm", "gemm_beta": 0.5}, "ort", "ort-gemm-beta", "gemm"),
]


@pytest.mark.parametrize(("broken", "target", "rule", "node"), VIOLATIONS)
def test_each_rule_reports_the_node_that_breaks_it(broken, target, rule, node):
    assert node in _found(_graph(**broken), target, rule), lint(_graph(**broken), target)
    assert not _found(_graph(), target, rule)  # the same rule passes the well-formed graph


def test_every_rule_has_a_violation_case_a_source_and_known_targets():
    assert {rule for _, _, rule, _ in VIOLATIONS} == {rule.id for rule in RULES}
    assert len({rule.id for rule in RULES}) == len(RULES)
    for rule in RULES:
        assert rule.targets and rule.targets <= set(TARGETS), rule.id
        assert rule.source and rule.description and rule.severity in ("error", "warning"), rule.id
    assert all(target in RULES_BY_ID[rule].targets for _, target, rule, _ in VIOLATIONS)
    assert not any(rule.id.startswith("trt-") for rule in rules_for("ort") + rules_for("openvino"))


# Forms a rule accepts that differ from the default graph: (graph arguments, target, rule)
ACCEPTED = [
    ({"bias": "int32"}, "ort", "bias-form"),  # ORT fuses an int32 bias DQ of scale s_x * s_w
    ({"bias": "int32"}, "openvino", "dq-input-int8"),
    ({"bias": "int32"}, "ort", "zero-point-int8"),  # an int32 bias DQ has an int32 zero point
    ({"op": "Gemm", "gemm_trans_b": 0, "w_axis": 1}, "trt", "per-channel-axis"),  # Gemm B [K, N]: axis 1
    ({"w_scale": np.full(C, 0.02, np.float32), "w_axis": -4}, "trt", "per-channel-axis"),  # negative axis
    ({"opset": 24}, "trt", "trt-opset"),  # checked against 10.15 below
]


@pytest.mark.parametrize(("form", "target", "rule"), ACCEPTED)
def test_accepted_alternative_forms(form, target, rule):
    version = "10.15" if rule == "trt-opset" else DEFAULT_TRT_VERSION
    assert not _found(_graph(**form), target, rule, trt_version=version)


def test_int8_clip_between_q_and_dq_is_a_trt_finding_only():
    # Brevitas-style QCDQ: Q -> Clip(int8) -> DQ; TensorRT's Clip importer takes no int8 tensor.
    model = _graph()
    nodes = list(model.graph.node)
    q = next(n for n in nodes if n.name == "q")
    dq = next(n for n in nodes if n.name == "dq")
    model.graph.initializer.extend(
        [numpy_helper.from_array(np.int8(0), "q_lo"), numpy_helper.from_array(np.int8(15), "q_hi")]
    )
    clip = helper.make_node("Clip", ["xq", "q_lo", "q_hi"], ["xq_clipped"], name="int_clip")
    dq.input[0] = "xq_clipped"
    model.graph.node.insert(nodes.index(q) + 1, clip)
    assert "int_clip" in _found(model, "trt", "trt-clip-float")
    assert not any(f.node == "int_clip" for f in lint(model, "ort"))


def test_opset_ranges_by_tensorrt_version():
    assert trt_version_info("10.1").opsets == (9, 20)
    assert trt_version_info("10.15.1.29").opsets == (9, 24)
    assert trt_version_info("11.4.0").opsets == (9, 25)
    with pytest.raises(FatqError, match="no documented ONNX opset range for TensorRT 10.8"):
        trt_version_info("10.8.0")
    assert _found(_graph(opset=21), "trt", "trt-opset")
    assert not _found(_graph(opset=21), "trt", "trt-opset", trt_version="10.15")
    assert not _found(_graph(opset=25), "trt", "trt-opset", trt_version="11")
    (finding,) = lint(_graph(opset=25), "trt", trt_version="10.15")
    assert "outside TensorRT 10.15's documented 9-24 (inside 11.x)" in finding.message
    assert next(r for r in RULES if r.id == "trt-opset").severity == "warning"


def _with_int32_biases(model: onnx.ModelProto, graph) -> onnx.ModelProto:
    """The file as fatq wrote it before the float-bias change: each float32 bias constant of a Conv/Gemm
    replaced by a DequantizeLinear of its int32 q at scale s_x * s_w (ONNX Runtime's int32 form)."""
    from export.qdq_writer import bias_step

    model = copy.deepcopy(model)
    layers = {f"{n.name}.bias": n for n in graph.nodes if n.op in ("qconv", "qlinear")}
    kept = [init for init in model.graph.initializer if init.name not in layers]
    dqs = []
    for init in model.graph.initializer:
        node = layers.get(init.name)
        if node is None:
            continue
        step = bias_step(node)
        kept += [
            numpy_helper.from_array(node.params["bias_int32"].astype(np.int32), f"{init.name}.q"),
            numpy_helper.from_array(step, f"{init.name}.scale"),
            numpy_helper.from_array(np.zeros_like(step, np.int32), f"{init.name}.zero"),
        ]
        names = [f"{init.name}.q", f"{init.name}.scale", f"{init.name}.zero"]
        dqs.append(helper.make_node("DequantizeLinear", names, [init.name], name=f"{init.name}/dq", axis=0))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = dqs + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _bias_inputs(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    inits = {i.name: i for i in model.graph.initializer}
    return [inits.get(n.input[2]) for n in model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2]


def test_the_tensorrt_file_is_clean_and_the_int32_bias_form_is_a_trt_finding():
    graph = lower(fold(trained_like("resnet20", 4)))
    written = write_qdq(graph)
    biases = _bias_inputs(written)
    assert len(biases) == 21 and all(b is not None and b.data_type == TensorProto.FLOAT for b in biases)
    assert written.opset_import[0].version == 20
    for target in TARGETS:
        assert lint(written, target) == [], target
    before = _with_int32_biases(written, graph)
    findings = lint(before, "trt")
    bias_dqs = [f for f in findings if f.rule == "trt-dq-input-int8"]
    assert len(bias_dqs) == 21  # 20 convs and the classifier
    assert all("bias" in f.node and "INT32" in f.message for f in bias_dqs)
    assert {f.rule for f in findings} == {"trt-dq-input-int8", "trt-bias-float"}
    assert lint(before, "ort") == [] and lint(before, "openvino") == []


@pytest.mark.parametrize(
    ("name", "bits", "options"), [("resnet20", 2, {"shortcut": "B"}), ("vgg_small", 3, {}), ("mobilenetv2", 4, {})]
)
def test_other_architectures_tensorrt_files_are_clean(name, bits, options):
    # no false positives on option-B shortcuts, max-pool, depthwise convs
    _, graph = lowered_case(name, bits, json.dumps(options))
    written = write_qdq(graph)
    assert all(b is not None and b.data_type == TensorProto.FLOAT for b in _bias_inputs(written))
    for target in TARGETS:
        assert lint(written, target) == [], target
    assert {f.rule for f in lint(_with_int32_biases(written, graph), "trt")} == {"trt-dq-input-int8", "trt-bias-float"}


def test_uint8_casts_and_per_channel_activations_are_findings():
    # moved from the retired export/graph_check.py tests
    model = _graph()
    model.graph.initializer.append(numpy_helper.from_array(np.full(C, 0.05, np.float32), "vec_scale"))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(C, np.int8), "vec_zp"))
    model.graph.node.append(
        helper.make_node("QuantizeLinear", ["output", "vec_scale", "vec_zp"], ["oq"], name="q_out", axis=1)
    )
    model.graph.node.append(helper.make_node("Cast", ["output"], ["as_u8"], name="cast", to=TensorProto.UINT8))
    for target in TARGETS:
        assert "q_out" in _found(model, target, "per-channel-axis")
        assert "cast" in _found(model, target, "no-uint8")


def test_the_exporter_refuses_a_graph_that_breaks_a_rule():
    # moved from the retired export/graph_check.py tests: the float file is clean, a broken zero point refused
    from export.float_writer import write_float
    from export.fold import dequantized

    model = trained_like("resnet20", 4)
    folded = fold(model)
    assert lint(write_float(dequantized(folded)), "trt") == []
    qdq = write_qdq(lower(folded))
    zero_points = [init for init in qdq.graph.initializer if init.data_type == TensorProto.INT8 and not init.dims]
    zero_points[0].CopyFrom(numpy_helper.from_array(np.int8(1), zero_points[0].name))
    with pytest.raises(FatqError, match="zero-point-zero"):
        assert_clean(qdq, "trt")


def test_main_lint_groups_findings_by_rule_and_names_the_source(tmp_path, capsys):
    path = tmp_path / "bias.onnx"
    onnx.save(_graph(bias="int32", opset=21), str(path))
    assert main_lint(path, "trt") == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    heading = lines.index(next(line for line in lines if line.startswith("[trt-dq-input-int8] error, 1 finding(s)")))
    assert "QuantDequantLinearHelper" in lines[heading + 1] and lines[heading + 1].startswith("  source: ")
    assert lines[heading + 2].startswith("  node ") and "'dq_b'" in lines[heading + 2]
    assert any(line.startswith("[trt-opset] warning") for line in lines)
    assert "3 finding(s) against the TensorRT rules (TensorRT 10.0-10.1)" in err
    assert main_lint(path, "ort") == 0
    out, err = capsys.readouterr()
    assert out == "" and "clean (ONNX Runtime rules)" in err


def test_main_lint_bad_input_is_one_sentence(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model")
    with pytest.raises(FatqError, match="ONNX"):
        main_lint(junk, "trt")
    with pytest.raises(FatqError, match="does-not-exist"):
        main_lint(tmp_path / "does-not-exist.onnx", "trt")
    good = tmp_path / "good.onnx"
    onnx.save(_graph(), str(good))
    with pytest.raises(FatqError, match="lint target must be one of trt, ort, openvino"):
        main_lint(good, "coreml")
    with pytest.raises(FatqError, match="TensorRT 9.0"):
        main_lint(good, "trt", trt_version="9.0")


def test_docs_table_lists_every_rule_with_its_targets_and_source():
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "tensorrt-rules.md").read_text()
    for rule in RULES:
        targets = ", ".join(t for t in TARGETS if t in rule.targets)
        assert f"| `{rule.id}` | {targets} | {rule.severity} | {rule.description} | {rule.source} |" in text, rule.id


def test_assert_clean_refuses_errors_and_returns_warnings():
    with pytest.raises(FatqError, match=r"refusing a graph that breaks the TensorRT rules: \[trt-dq-input-int8\] node"):
        assert_clean(_graph(bias="int32"), "trt")
    (warning,) = assert_clean(_graph(opset=21), "trt")
    assert warning.rule == "trt-opset"
    assert assert_clean(_graph(bias="int32"), "ort") == []


def test_fatq_export_lint_flags_target_and_trt_version(tmp_path, capsys):
    from engines.export_cli import main

    old = tmp_path / "int32-bias.onnx"
    onnx.save(_graph(bias="int32"), str(old))
    assert main(["--lint", str(old)]) == 1  # default target trt
    assert "[trt-dq-input-int8] error" in capsys.readouterr().out
    assert main(["--lint", str(old), "--target", "ort"]) == 0
    assert "clean (ONNX Runtime rules)" in capsys.readouterr().err
    good = tmp_path / "good.onnx"
    onnx.save(_graph(opset=24), str(good))
    assert main(["--lint", str(good), "--target", "trt", "--trt-version", "10.15"]) == 0
    assert main(["--lint", str(good), "--target", "trt"]) == 1  # opset 24 is outside 10.0's 9-20: a warning
    capsys.readouterr()
    assert main(["--lint", str(good), "--trt-version", "9.0"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT 9.0" in err and "Traceback" not in err
