"""The ONNX Runtime–targeted int8 writer (``--format onnx-ort``) against the deploy reference and the QDQ file."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from export_helpers import WRITER_CASES, compare_written, input_shape_for, lowered_case, trained_like

from engines.ort_runner import OrtRunner
from export.deploy_graph import DeployGraph, DeployNode, tensor_quant
from export.fold import fold
from export.lint_rules import lint
from export.lower import lower
from export.onnx_builder import read_metadata
from export.ort_writer import AddCheck, Uint8Tensor, inexact_adds, uint8_tensors, write_ort
from export.qdq_writer import write_qdq
from export.reference import DeployReference
from fatq.errors import FatqError

ort = pytest.importorskip("onnxruntime")


def _session(model: onnx.ModelProto):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("name", "bits", "options"), WRITER_CASES)
def test_every_integer_identical_to_the_reference(name, bits, options, tmp_path):
    model, graph = lowered_case(name, bits, json.dumps(options))
    report = compare_written(write_ort(graph), name, model, graph, tmp_path / "model.ort.onnx")

    assert report["int8_identical_pct"] and min(report["int8_identical_pct"].values()) == 100.0
    assert report["onnxruntime_vs_reference"]["top1_agreement_pct"] == 100.0


@pytest.mark.parametrize(("name", "bits", "options"), WRITER_CASES[:2])
def test_same_logits_as_the_portable_qdq_file(name, bits, options, tmp_path):
    _, graph = lowered_case(name, bits, json.dumps(options))
    x = torch.randn(5, *input_shape_for(name)).numpy()
    path = tmp_path / "portable.onnx"
    onnx.save(write_qdq(graph), str(path))
    with OrtRunner(path, threads=1) as runner:  # int8 kernels on AVX2-only CPUs (engines/host.py)
        portable = runner.infer({"input": x})["logits"]
    targeted = _session(write_ort(graph)).run(None, {"input": x})[0]
    # the same integers; the portable file's classifier is a float Gemm (float bias): float32 sums
    np.testing.assert_allclose(targeted, portable, rtol=0, atol=1e-5)


def test_graph_is_uint8_qoperator_without_float_chains():
    _, graph = lowered_case("resnet20", 4, "{}")
    onnx_model = write_ort(graph)
    ops = [n.op_type for n in onnx_model.graph.node]
    convs = [n for n in graph.nodes if n.op == "qconv" and n.attrs["out_quant"] is not None]
    shortcuts = [n for n in graph.nodes if n.op == "subsample_pad"]
    # each option-A shortcut's zero channels come from a 1x1 QLinearConv with 0/1 weights (embed_channels):
    # the only Pad left is the image's channel pad, outside ONNX Runtime's channels-last region
    assert ops.count("QLinearConv") == len(convs) + len(shortcuts) and len(shortcuts) == 2
    assert ops.count("Pad") == 1
    assert "Conv" not in ops
    # the only float tensors left: the image's quantizer, the final Add/ReLU/pooling and the logits, plus a
    # float Add (DQ, DQ, Add, Clip, Q) for each residual whose QLinearAdd the installed ORT rounds differently
    # on this CPU (write_ort measures it: none on the AVX-512 VNNI machine, one on the AVX2-only CI machine)
    float_adds = json.loads(read_metadata(onnx_model)["float_residual_adds"])
    int8_zero_points = {i.name for i in onnx_model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    assert not any(n.op_type == "QLinearConv" and n.input[2] in int8_zero_points for n in onnx_model.graph.node)
    # every conv is u8 x s8; the 8-bit stem conv (and its copy for the first shortcut quantizer) can leave int16
    # on CPUs without VNNI and is listed for ORT's session.x64quantprecision (tests/engines/test_ort_u8s8_conv.py)
    stems = [n.name for n in convs if n.attrs["source"] == "conv1"]
    assert sorted(json.loads(read_metadata(onnx_model)["x64quantprecision"])) == sorted(stems) and len(stems) == 2
    assert ops.count("QuantizeLinear") == 2 + len(float_adds)
    assert ops.count("DequantizeLinear") <= 6 + 2 * len(float_adds)
    domains = {n.domain for n in onnx_model.graph.node}
    assert domains == {"", "com.microsoft"}
    # every quantized tensor's zero point is recorded, and it is where the integer range starts
    recorded = uint8_tensors(onnx_model)
    for tensor in DeployReference(graph).quant:
        assert recorded[tensor]["zero_point"] == -tensor_quant(graph.quant_of(tensor))["qmin"], tensor
    # the portable rules (TensorRT's) flag it: uint8 by design
    assert any(f.rule == "no-uint8" for f in lint(onnx_model, "trt"))


def test_metadata_names_the_format_and_keeps_the_callers_entries():
    _, graph = lowered_case("resnet20", 4, "{}")
    read = read_metadata(write_ort(graph, metadata={"arch": "resnet20"}))
    assert read["arch"] == "resnet20"
    # residual quantizers whose QLinearAdd this CPU's ORT kernel rounds differently (measured at export time)
    quantizers = {n.name for n in graph.nodes if n.op == "quantize"}
    assert set(json.loads(read["float_residual_adds"])) <= quantizers
    assert set(json.loads(read["uint8_tensors"])) == set(DeployReference(graph).quant)


def _check(scale_a, scale_c, scale_out, qmin=0, qmax=127):
    a = Uint8Tensor("a", scale_a, 127, -127, 127)
    c = Uint8Tensor("c", scale_c, 0, 0, 127)
    return AddCheck("q", a, c, scale_out, -qmin, qmin, qmax)


def test_inexact_add_detection_against_a_float64_tie_analysis():
    """A QLinearAdd whose lattice has a near-tie the kernel rounds differently is caught, a clean one is not."""
    rng = np.random.default_rng(3)
    found_clean = found_tie = False
    for _ in range(40):
        s_a, s_c, s_out = (float(v) for v in np.float32(rng.uniform(0.02, 0.2, 3)))
        inexact = bool(inexact_adds([_check(s_a, s_c, s_out)]))
        a, c = np.meshgrid(np.arange(-127, 128), np.arange(0, 128))
        exact = (a * s_a + c * s_c) / s_out  # float64: how far each sum is from a rounding boundary
        gap = np.abs(exact - np.floor(exact) - 0.5).min()
        if not inexact:
            found_clean = True
        else:
            found_tie = True
            # the kernel only disagrees where float32 rounding can flip the result
            assert gap < 1e-4, gap
    assert found_clean and found_tie


def test_a_quantizer_with_an_inexact_add_keeps_a_float_add(monkeypatch):
    import export.ort_writer as ort_writer

    _, graph = lowered_case("resnet20", 4, "{}")
    monkeypatch.setattr(ort_writer, "inexact_adds", lambda checks: {checks[0].quantizer})
    onnx_model = ort_writer.write_ort(graph)
    assert len(json.loads(read_metadata(onnx_model)["float_residual_adds"])) == 1
    x = torch.randn(4, 3, 32, 32)
    out = _session(onnx_model).run(None, {"input": x.numpy()})[0]
    np.testing.assert_array_equal(out, DeployReference(graph)(x).numpy())


def _linear(name: str, source: str, output: str, fan_in: int, fan_out: int, rng) -> DeployNode:
    params = {
        "weight": rng.integers(-7, 8, (fan_out, fan_in)).astype(np.int8),
        "weight_scale": rng.uniform(0.01, 0.05, fan_out).astype(np.float32),
        "bias": rng.normal(0, 0.1, fan_out).astype(np.float32),
    }
    return DeployNode(name, "linear", [source], output, {"quantized": True}, params)


SIGNED_8BIT = {"bits": 8, "signed": True, "scale": 0.02, "qmin": -127, "qmax": 127}


def test_linear_layer_with_a_quantized_output():
    """No registry model has one (their classifiers are last); a two-layer MLP head does."""
    rng = np.random.default_rng(0)
    nodes = [
        DeployNode("flatten", "flatten", ["x"], "f", {}),
        DeployNode("q0", "quantize", ["f"], "q0", SIGNED_8BIT),
        _linear("fc1", "q0", "h", 48, 32, rng),
        DeployNode("relu", "relu", ["h"], "r", {}),
        DeployNode("q1", "quantize", ["r"], "q1", {"bits": 4, "signed": False, "scale": 0.05, "qmin": 0, "qmax": 15}),
        _linear("fc2", "q1", "logits", 32, 10, rng),
    ]
    graph = lower(DeployGraph(nodes=nodes, input_name="x", input_shape=[3, 4, 4], output_name="logits", meta={}))
    assert any(n.op == "qlinear" and n.attrs["out_quant"] is not None for n in graph.nodes)
    x = torch.randn(64, 3, 4, 4)
    out = _session(write_ort(graph)).run(None, {"input": x.numpy()})[0]
    np.testing.assert_array_equal(out, DeployReference(graph)(x).numpy())


def test_pointwise_conv_with_a_float_output_runs_on_integers(tmp_path):
    """MobileNetV2's last conv (1x1, 320 -> 1280, no quantizer after it): an int8 MatMulInteger whose float
    output is float32(acc + q_b) · float32(s_x · s_w,c) bit for bit, computed here in numpy from the
    reference's input integers; ONNX Runtime keeps no float conv."""
    _, graph = lowered_case("mobilenetv2", 4, "{}")
    node = next(n for n in graph.nodes if n.op == "qconv" and n.attrs["out_quant"] is None)
    onnx_model = write_ort(graph)
    conv_output = next(n.output[0] for n in onnx_model.graph.node if n.name.startswith(f"{node.name}/nchw"))
    onnx_model.graph.output.append(onnx.helper.make_tensor_value_info(conv_output, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized_ops = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    assert "MatMulInteger" in optimized_ops and not optimized_ops & {"Conv", "FusedConv", "ConvInteger"}

    x = torch.randn(4, *input_shape_for("mobilenetv2"))
    got = session.run([conv_output], {"input": x.numpy()})[0]
    _, integers = DeployReference(graph).run(x, capture=True)
    q_x = integers[node.inputs[0]].numpy().astype(np.int64)  # stored integers, [N, C_in, H, W]
    acc = np.einsum("kc,nchw->nkhw", node.params["weight"][:, :, 0, 0].astype(np.int64), q_x)
    step = np.float32(node.attrs["input_scale"]) * node.params["weight_scale"].astype(np.float32)
    expected = (acc + node.params["bias_int32"].reshape(1, -1, 1, 1)).astype(np.float32) * step.reshape(1, -1, 1, 1)
    np.testing.assert_array_equal(got, expected)


def test_channel_embedding_conv_copies_every_byte_and_adds_zero_point_channels():
    """embed_channels against numpy: x[:, :, ::2, ::2] with zero channels (the zero point) on each side, for a
    tensor whose zero point is not 0 and whose bytes span the whole uint8 range."""
    graph = DeployGraph(
        [DeployNode("sc", "subsample_pad", ["q"], "sc", {"pad": 3})],
        "q",
        [5, 6, 6],
        "sc",
        dialect="integer",
    )
    assert graph.channels() == {"q": 5, "sc": 11}
    from export.onnx_builder import OnnxBuilder
    from export.ort_writer import _OrtWriter

    b = OnnxBuilder(17)
    writer = _OrtWriter(graph, b)
    x = Uint8Tensor("q", 0.37, 9, -9, 246)
    writer.u8["q"] = x
    writer.integer_preserving(graph.nodes[0])
    bytes_in = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 6), dtype=np.uint8)
    inputs = [onnx.helper.make_tensor_value_info("q", onnx.TensorProto.UINT8, [2, 5, 6, 6])]
    outputs = [onnx.helper.make_tensor_value_info("sc", onnx.TensorProto.UINT8, None)]
    model = onnx.helper.make_model(
        onnx.helper.make_graph(b.nodes, "embed", inputs, outputs, b.initializers),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    assert [n.op_type for n in model.graph.node] == ["QLinearConv"]
    got = _session(model).run(None, {"q": bytes_in})[0]
    expected = np.full((2, 11, 3, 3), 9, np.uint8)
    expected[:, 3:8] = bytes_in[:, :, ::2, ::2]
    np.testing.assert_array_equal(got, expected)


def test_refuses_a_folded_graph():
    model = trained_like("resnet20", 4)
    with pytest.raises(FatqError, match="lowered"):
        write_ort(fold(model, [3, 32, 32]))
