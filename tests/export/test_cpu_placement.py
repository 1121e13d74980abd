"""The CPU engines' quantizer placement (QuantSpec target "cpu"): one quantizer per residual-block input.

A block's input is quantized once, by its first conv's input quantizer; an identity or option-A
shortcut reads those integers, and signed 8-bit quantizers use all of int8. ONNX Runtime then runs a
block as QLinearConv, QLinearConv, QLinearAdd (no 8-bit Clip), OpenVINO as two int8 convs with the Add
fused into the second, and the stem conv runs once. The engines run every file here (ONNX Runtime,
OpenVINO), against the deploy reference.
"""

from __future__ import annotations

import collections
import functools
import json

import pytest
import torch
from engine_helpers import OPENVINO_INT8_NOT_EXACT_HERE, openvino_int8_exact_here
from export_helpers import compare_written, input_shape_for, trained_like
from torch import nn

from export.engine_exact import make_engine_exact
from export.formats import FORMATS
from export.lint_rules import lint
from export.onnx_builder import read_metadata
from export.pipeline import deploy_graph
from fatq.models import create_model
from fatq.qconfig import QuantSpec
from fatq.quantizers import ActivationQuantizer


def _cpu(bits: int, **options) -> dict:
    return {"spec": QuantSpec.from_bits(bits, target="cpu"), **options}


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "branch_quantizer")]


@functools.cache
def _exported(shortcut: str):
    """(model, engine-exact lowered graph) of a trained-like W4A4 ResNet-20 under target "cpu"."""
    model = trained_like("resnet20", None, **_cpu(4, shortcut=shortcut))
    graph, _ = make_engine_exact(model, lambda m: deploy_graph(m, input_shape_for("resnet20")))
    return model, graph


def test_identity_shortcuts_read_the_block_input_quantizer_and_signed_8bit_is_full_range():
    model = create_model("resnet20", **_cpu(4))
    for block in _blocks(model):
        assert block.shares_input and isinstance(block.shortcut_quantizer, nn.Identity)
        assert block.branch_quantizer.int_range == (-128, 127)
    assert model.conv1.input_quantizer.int_range == (-128, 127)  # the image
    assert model.linear.input_quantizer.int_range == (0, 127)  # unsigned 8-bit keeps the portable range
    # option B: a conv shortcut is signed and keeps its own quantizer
    option_b = [b for b in _blocks(create_model("resnet20", **_cpu(4, shortcut="B"))) if not b.shares_input]
    assert len(option_b) == 2
    assert all(isinstance(b.shortcut_quantizer, ActivationQuantizer) for b in option_b)
    portable = _blocks(create_model("resnet20", bits=4))
    assert not any(b.shares_input for b in portable)
    assert all(b.branch_quantizer.int_range == (-127, 127) for b in portable)


def test_the_shortcut_adds_the_integers_conv1_reads():
    """In the model: the identity added is conv1's quantized input, value for value."""
    model = trained_like("resnet20", None, **_cpu(4)).eval()
    block = model.layer1[1]
    seen = {}
    block.conv1.input_quantizer.register_forward_hook(lambda m, args, out: seen.setdefault("quantized", out))
    block.branch_quantizer.register_forward_hook(lambda m, args, out: seen.setdefault("branch", out))
    x = torch.randn(2, *input_shape_for("resnet20"))
    with torch.no_grad():
        block_input = model.layer1[0](model.relu(model.bn1(model.conv1(x))))
        out = block(block_input)
    assert torch.equal(out, torch.relu(seen["branch"] + seen["quantized"]))


def test_one_quantizer_per_block_input_in_the_deploy_graph():
    _, graph = _exported("A")
    ops = collections.Counter(n.op for n in graph.nodes)
    assert ops["qconv"] == 19  # the stem once (the portable placement has a second copy for its shortcut)
    consumers = graph.consumers()
    shared = [n for n in graph.nodes if n.op == "quantize" and n.name.endswith(".conv1.input_quantizer")]
    shared += [n for n in graph.nodes if n.op == "qconv" and n.attrs["quantizer"] == "layer1.0.conv1.input_quantizer"]
    assert len(shared) == 9  # every block's input, the first one fused into the stem conv
    for node in shared:
        readers = {r.op for r in consumers[node.output]}
        assert "qconv" in readers and readers & {"add", "subsample_pad"}, (node.name, readers)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_onnx_runtime_files_are_exact_and_the_ort_file_has_no_8bit_clips_and_no_widening_muls(shortcut, tmp_path):
    model, graph = _exported(shortcut)
    portable = FORMATS["onnx"].write(graph, 20, {})
    assert lint(portable, "trt") == []  # still a TensorRT file: [-128, 127] is int8's own saturation
    ort_file = FORMATS["onnx-ort"].write(graph, 20, {})
    ops = collections.Counter(n.op_type for n in ort_file.graph.node)
    blocks = len(_blocks(model))
    # option B's shortcuts are 1x1 convs; option A's every-other-pixel zero-padded copies are 1x1 QLinearConvs
    # with 0/1 weights (export.ort_writer's embed_channels), so no channel Pad runs in ORT's channels-last region
    assert ops["QLinearConv"] == 19 + 2
    assert ops["Pad"] == 1  # the image's 3 -> 4 channels
    # option B: the sum before each downsampling block is read twice (its conv1's and its conv shortcut's quantizer)
    assert ops["QLinearAdd"] + ops["Add"] == blocks + (2 if shortcut == "B" else 0)
    # a Clip only for the b-bit quantizers and the unsigned 8-bit ones: none at a full-range 8-bit tensor
    full_range = {n.output for n in graph.nodes if (n.attrs.get("out_quant") or {}).get("qmin") == -128}
    assert full_range
    clip_inputs = {n.input[0] for n in ort_file.graph.node if n.op_type == "Clip"}
    assert not clip_inputs & full_range
    # no widened activations under target "cpu" (export.lower): no uint8 Mul pass after any conv
    assert all(n.attrs["out_quant"].get("expand", 1) == 1 for n in graph.nodes if n.attrs.get("out_quant"))
    assert ops["Mul"] == 0
    # ONNX Runtime's own file is exact; on the TensorRT file ORT rounds the trained float biases to int32 itself,
    # whose rare dense 8-bit near-ties the moves for the float-bias engines do not clear (docs/parity.md)
    for onnx_model, path, bound in ((ort_file, "m.ort.onnx", 100.0), (portable, "m.onnx", 99.99)):
        report = compare_written(onnx_model, "resnet20", model, graph, tmp_path / path)
        assert report["onnxruntime_vs_reference"]["top1_agreement_pct"] == 100.0
        assert min(report["int8_identical_pct"].values()) >= bound


@pytest.mark.skipif(not openvino_int8_exact_here(), reason=OPENVINO_INT8_NOT_EXACT_HERE)
def test_openvino_file_is_exact_with_each_add_fused_into_its_branch_conv(tmp_path):
    from engines.openvino_runner import openvino_core

    model, graph = _exported("A")
    onnx_model = FORMATS["onnx-openvino"].write(graph, 20, {})
    path = tmp_path / "m.ov.onnx"
    # every quantizer observed, the branch quantizers too (their FakeQuantize outputs), with nothing unobserved
    report = compare_written(onnx_model, "resnet20", model, graph, path, frozenset(), spread=3.0)
    assert report["openvino_vs_reference"]["top1_agreement_pct"] == 100.0
    assert min(report["int8_identical_pct"].values()) == 100.0
    assert not report["unobserved_int8_tensors"]
    assert report["debug_copy_logits_identical"]
    read = openvino_core().read_model(str(path))
    read.reshape({"input": [2, *input_shape_for("resnet20")]})
    compiled = openvino_core().compile_model(read, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    layers = [op.get_rt_info() for op in compiled.get_runtime_model().get_ordered_ops()]
    names = [(info["layerType"].astype(str), info["originalLayersNames"].astype(str)) for info in layers]
    convs = [n for t, n in names if t == "Convolution"]
    assert len(convs) == 19  # the stem once
    # each branch conv runs its Relu, shifted branch FakeQuantize, the residual Add and (but for the last block,
    # whose float sum goes to the pooling) the next block's 16-level FakeQuantize in its epilogue: no Add pass
    fused = [n for n in convs if "branch_quantizer/branch/Relu" in n and "Add" in n]
    assert len(fused) == 9
    assert sum("Add" in n and "FakeQuantize" in n.split("Add")[-1] for n in fused) == 8
    assert not [n for t, n in names if t != "Convolution" and "Add" in n]


# QuantSpec.full_range_8bit (what `fatq-train --target cpu` trains now): every 8-bit quantizer uses all 256 values


def _full_range(bits: int, **options) -> dict:
    return {"spec": QuantSpec.from_bits(bits, target="cpu", full_range_8bit=True), **options}


@functools.cache
def _exported_full_range(bits: int):
    """(model, engine-exact lowered graph) of a trained-like ResNet-20 under target "cpu" with full_range_8bit."""
    model = trained_like("resnet20", None, **_full_range(bits))
    graph, _ = make_engine_exact(model, lambda m: deploy_graph(m, input_shape_for("resnet20")))
    return model, graph


def test_full_range_8bit_makes_unsigned_8bit_quantizers_uint8():
    w8 = create_model("resnet20", **_full_range(8))
    assert w8.linear.input_quantizer.int_range == (0, 255)
    assert w8.layer1[0].conv1.input_quantizer.int_range == (0, 255)  # A8 body quantizers too
    assert w8.conv1.input_quantizer.int_range == (-128, 127)
    w4 = create_model("resnet20", **_full_range(4))
    assert w4.layer1[0].conv1.input_quantizer.int_range == (0, 15)  # only 8-bit quantizers change
    assert w4.linear.input_quantizer.int_range == (0, 255)
    # checkpoints trained before the field (target "cpu" without it) keep their int8 ranges
    assert create_model("resnet20", **_cpu(8)).linear.input_quantizer.int_range == (0, 127)
    with pytest.raises(Exception, match="target 'cpu' only"):
        QuantSpec.from_bits(8, full_range_8bit=True)


def test_the_tensorrt_file_refuses_uint8_ranges_in_one_sentence():
    _, graph = _exported_full_range(8)
    with pytest.raises(Exception, match=r"uses the 256 uint8 levels \[0, 255\].*--format onnx-ort"):
        FORMATS["onnx"].write(graph, 20, {})


def test_uint8_quantizers_need_no_clip_in_the_ort_file_and_are_exact(tmp_path):
    model, graph = _exported_full_range(8)
    uint8 = {n.output for n in graph.nodes if (n.attrs.get("out_quant") or {}).get("qmax") == 255}
    assert uint8
    ort_file = FORMATS["onnx-ort"].write(graph, 20, {})
    clip_inputs = {n.input[0] for n in ort_file.graph.node if n.op_type == "Clip"}
    clip_outputs = {n.output[0] for n in ort_file.graph.node if n.op_type == "Clip"}
    assert not (clip_inputs | clip_outputs) & uint8
    report = compare_written(ort_file, "resnet20", model, graph, tmp_path / "m.ort.onnx")
    assert report["onnxruntime_vs_reference"]["top1_agreement_pct"] == 100.0
    assert min(report["int8_identical_pct"].values()) == 100.0


@pytest.mark.skipif(not openvino_int8_exact_here(), reason=OPENVINO_INT8_NOT_EXACT_HERE)
def test_uint8_quantizers_are_256_level_fake_quantizes_in_the_openvino_file(tmp_path):
    model, graph = _exported_full_range(8)
    onnx_model = FORMATS["onnx-openvino"].write(graph, 20, {})
    fake = [n for n in onnx_model.graph.node if n.op_type == "FakeQuantize"]
    assert fake and all(next(a.i for a in n.attribute if a.name == "levels") == 256 for n in fake)
    # a W8A8 model's branch quantizers keep Q → DQ → Clip (their convs read 8-bit activations; see
    # export/openvino_writer.py), which the check cannot observe without changing OpenVINO's fusions
    unobserved = frozenset(
        n.output for n in graph.nodes if (n.attrs.get("quantizer") or "").endswith("branch_quantizer")
    )
    assert unobserved and not unobserved & {n.output[0] for n in fake}
    report = compare_written(onnx_model, "resnet20", model, graph, tmp_path / "m.ov.onnx", unobserved)
    assert report["openvino_vs_reference"]["top1_agreement_pct"] == 100.0
    assert min(report["int8_identical_pct"].values()) == 100.0


def test_mobilenetv2_residual_blocks_read_their_expansion_conv_input_and_every_conv_runs_once(tmp_path):
    """MobileNetV2 under target "cpu": a residual block's shortcut adds the integers its expansion conv reads, so
    the conv that writes a block input runs once (the portable placement has a copy per quantizer) and ONNX
    Runtime computes the deploy reference exactly."""
    model = trained_like("mobilenetv2", None, **_full_range(4))
    blocks = _blocks(model)
    assert blocks and all(b.shares_input and isinstance(b.shortcut_quantizer, nn.Identity) for b in blocks)
    # the shared signed 4-bit quantizer uses all 16 integers (one FakeQuantize in OpenVINO's file)
    assert all(b.conv[0][0].input_quantizer.int_range == (-8, 7) for b in blocks)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    shape = input_shape_for("mobilenetv2")
    graph, _ = make_engine_exact(model, lambda m: deploy_graph(m, shape))
    assert collections.Counter(n.op for n in graph.nodes)["qconv"] == convs
    portable = deploy_graph(trained_like("mobilenetv2", 4), shape)
    assert collections.Counter(n.op for n in portable.nodes)["qconv"] > convs  # the old cost: duplicated convs
    openvino_file = FORMATS["onnx-openvino"].write(graph, 20, {})
    fake = json.loads(read_metadata(openvino_file)["fake_quantized_tensors"])
    shared = {n.output for n in graph.nodes if (n.attrs.get("out_quant") or {}).get("qmin") == -8}
    assert shared and shared <= set(fake)
    report = compare_written(FORMATS["onnx-ort"].write(graph, 20, {}), "mobilenetv2", model, graph, tmp_path / "m.onnx")
    assert report["onnxruntime_vs_reference"]["top1_agreement_pct"] == 100.0
    assert min(report["int8_identical_pct"].values()) == 100.0
