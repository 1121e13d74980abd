"""QDQ / float ONNX writers against ONNX Runtime (int8-exact vs the deploy reference) and OpenVINO."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from export_helpers import WRITER_CASES, compare_written, lowered_case, trained_like

from engines.ort_runner import OrtRunner
from export.float_writer import write_float
from export.fold import fold
from export.lint_rules import lint
from export.onnx_builder import DEFAULT_OPSET, read_metadata
from export.qdq_writer import write_qdq
from export.reference import DeployReference
from fatq.errors import FatqError

ort = pytest.importorskip("onnxruntime")


def _after_float_layers(graph) -> set[str]:
    """Quantized tensors computed from a float-output integer layer (through float ops)."""
    tainted: set[str] = set()
    for node in graph.nodes:
        if (node.op in ("qconv", "qlinear") and node.attrs["out_quant"] is None) or tainted & set(node.inputs):
            tainted.add(node.output)
    return {t for t in tainted if graph.quant_of(t) is not None}


def _optimized_ops(path, tmp_path, int8_allowed: bool = False) -> list[onnx.NodeProto]:
    """ORT's optimized graph; ``int8_allowed``: as OrtRunner sets it on AVX2 CPUs without VNNI (engines/host.py)."""
    options = ort.SessionOptions()
    if int8_allowed:
        options.add_session_config_entry("session.qdqisint8allowed", "1")
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return list(onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


@pytest.mark.parametrize(("name", "bits", "options"), WRITER_CASES)
def test_onnxruntime_int8_tensors_identical_to_reference(name, bits, options, tmp_path):
    model, graph = lowered_case(name, bits, json.dumps(options))
    onnx_model = write_qdq(graph)
    assert lint(onnx_model, "trt") == []
    path = tmp_path / "model.onnx"
    report = compare_written(onnx_model, name, model, graph, path)

    # ORT runs a conv whose output the model leaves float (MobileNetV2's last 1x1 conv) as a float
    # conv on dequantized inputs: its rounding, and so a few integers after it, may differ
    after_float = _after_float_layers(graph)
    for tensor, pct in report["int8_identical_pct"].items():
        assert pct >= (99.9 if tensor in after_float else 100.0), (tensor, pct)
    assert report["onnxruntime_vs_reference"]["top1_agreement_pct"] == 100.0
    assert report["onnxruntime_vs_reference"]["max_abs_logit_diff"] <= (1e-2 if after_float else 1e-5)

    # every conv whose output is quantized runs as ORT's fused integer kernel (it re-derives the int32 bias
    # from the float one), with ORT's default uint8 conversion and with the int8 kernels OrtRunner picks on AVX2
    for int8_allowed in (False, True):
        ops = _optimized_ops(path, tmp_path, int8_allowed)
        fused = sum(n.op_type == "QLinearConv" for n in ops)
        float_convs = [n.name for n in ops if n.op_type in ("Conv", "FusedConv")]
        int_out = [n for n in graph.nodes if n.op == "qconv" and n.attrs["out_quant"] is not None]
        float_out = [n for n in graph.nodes if n.op == "qconv" and n.attrs["out_quant"] is None]
        assert fused == len(int_out)
        # only a conv whose output the model itself leaves unquantized (MobileNetV2's last 1x1 conv
        # feeds the average pool in float) stays a float conv
        assert len(float_convs) == len(float_out)
        # the classifier's float bias (the TensorRT form) leaves ORT's Gemm float on dequantized inputs: no QGemm
        assert sum(n.op_type == "QGemm" for n in ops) == 0 and sum(n.op_type == "Gemm" for n in ops) == 1


def test_opset_ir_version_and_dynamic_batch(tmp_path):
    model, graph = lowered_case("resnet20", 4, "{}")
    onnx_model = write_qdq(graph)
    assert onnx_model.opset_import[0].version == DEFAULT_OPSET == 20
    assert onnx_model.ir_version == 9
    dims = onnx_model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    path = tmp_path / "model.onnx"
    onnx.save(onnx_model, str(path))
    with OrtRunner(path, threads=1) as runner:
        for batch in (1, 3):
            x = torch.randn(batch, 3, 32, 32)
            out = runner.infer({"input": x.numpy()})["logits"]
            # the classifier runs as a float Gemm in ORT (float bias): float32 sums, not bit-identical
            np.testing.assert_allclose(out, DeployReference(graph)(x).numpy(), rtol=0, atol=1e-5)
    old = write_qdq(graph, opset=13)
    assert old.opset_import[0].version == 13 and lint(old, "trt") == []
    ort.InferenceSession(old.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(FatqError, match="opset"):
        write_qdq(graph, opset=11)


def test_metadata_round_trips(tmp_path):
    _, graph = lowered_case("resnet20", 4, "{}")
    metadata = {"arch": "resnet20", "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    path = tmp_path / "m.onnx"
    onnx.save(write_qdq(graph, metadata=metadata), str(path))
    read = read_metadata(onnx.load(str(path)))
    assert read["arch"] == "resnet20"
    assert json.loads(read["normalization"]) == metadata["normalization"]


def test_int8_range_clip_variant_is_valid_and_close():
    # a benchmark-only variant (benchmarks/ort_openvino_int8_vs_fp32.py): TensorRT's Clip takes no int8, so the
    # TensorRT lint refuses it and the exporter never writes it; ONNX Runtime's rules accept it
    _, graph = lowered_case("resnet20", 4, "{}")
    onnx_model = write_qdq(graph, range_clip="int8")
    assert {f.rule for f in lint(onnx_model, "trt")} == {"trt-clip-float"}
    assert lint(onnx_model, "ort") == []
    int8_constants = {i.name for i in onnx_model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    assert any(n.op_type == "Clip" and n.input[1] in int8_constants for n in onnx_model.graph.node)
    x = torch.randn(4, 3, 32, 32)
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": x.numpy()})[0]
    expected = DeployReference(graph)(x).numpy()
    # ORT does not fuse this form on x86 (float convs on dequantized values): close, not identical
    np.testing.assert_allclose(out, expected, atol=0.05 * np.abs(expected).max())


def test_float_writer_matches_fp32_model():
    model = trained_like("resnet20", 32)
    onnx_model = write_float(fold(model))
    assert lint(onnx_model, "trt") == []
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx_model.graph.node)
    x = torch.randn(4, 3, 32, 32)
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, rtol=1e-4, atol=1e-4)


def test_openvino_runs_the_int8_file(tmp_path):
    pytest.importorskip("openvino")
    from engines.openvino_runner import openvino_core

    _, graph = lowered_case("resnet20", 4, "{}")
    path = tmp_path / "m.onnx"
    onnx.save(write_qdq(graph), str(path))
    compiled = openvino_core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": 2})
    x = torch.randn(16, 3, 32, 32)
    out = compiled(x.numpy())[compiled.output(0)]
    expected = DeployReference(graph)(x).numpy()
    # OpenVINO runs its own int8 kernels (and BF16 elsewhere on CPUs that have it): near, not exact
    assert (out.argmax(1) == expected.argmax(1)).mean() >= 0.9
    assert np.abs(out - expected).max() <= 0.1 * np.abs(expected).max()
