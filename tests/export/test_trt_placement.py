"""TensorRT's quantizer placement (QuantSpec target "trt"): the conv branch of a residual Add stays float.

NVIDIA's placement (and ModelOpt's ONNX quantizer) puts Q/DQ on op inputs and, on a residual Add, on
the identity input only, so TensorRT fuses Conv+BN+Add+ReLU with an int8 residual input. The model
trains in that placement and the TensorRT file writes exactly it. TensorRT itself is not run here.
"""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import compare_written, input_shape_for, trained_like
from torch import nn

from export.lint_rules import lint
from export.qdq_writer import write_qdq
from fatq.checkpoint import build_checkpoint, init_from_pretrained
from fatq.models import create_model
from fatq.qconfig import QuantSpec
from fatq.quantizers import ActivationQuantizer

CASES = [("resnet20", 4, {}), ("resnet20", 4, {"shortcut": "B"}), ("mobilenetv2", 4, {})]


def _trt(bits: int, **options) -> dict:
    return {"spec": QuantSpec.from_bits(bits, target="trt"), **options}


def _residual_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "branch_quantizer")]


@pytest.mark.parametrize(("name", "bits", "options"), CASES)
def test_only_the_shortcut_input_of_each_residual_add_is_quantized(name, bits, options):
    blocks = _residual_blocks(create_model(name, **_trt(bits, **options)))
    assert blocks
    for block in blocks:
        assert isinstance(block.branch_quantizer, nn.Identity)
        assert isinstance(block.shortcut_quantizer, ActivationQuantizer) and block.shortcut_quantizer.enabled
    portable = _residual_blocks(create_model(name, bits=bits, **options))
    assert all(isinstance(b.branch_quantizer, ActivationQuantizer) for b in portable)


@pytest.mark.parametrize(("name", "bits", "options"), CASES)
def test_the_tensorrt_file_feeds_each_branch_conv_straight_into_its_add(name, bits, options, tmp_path):
    model, graph = _lowered_trt(name, bits, json.dumps(options))
    onnx_model = write_qdq(graph)
    assert lint(onnx_model, "trt") == []
    producers = {output: node for node in onnx_model.graph.node for output in node.output}
    adds = [n for n in onnx_model.graph.node if n.op_type == "Add"]
    assert len(adds) == len(_residual_blocks(model))
    for add in adds:
        branch, shortcut = sorted((producers[i] for i in add.input), key=lambda n: n.op_type != "Conv")
        assert branch.op_type == "Conv", add.name
        # the shortcut is dequantized int8; a ReLU range right after a fused conv (the stem feeding the
        # first block) is its float Clip of that DQ
        if shortcut.op_type == "Clip":
            shortcut = producers[shortcut.input[0]]
        assert shortcut.op_type == "DequantizeLinear", (add.name, shortcut.op_type)

    # ONNX Runtime and OpenVINO run those convs in float on dequantized inputs (no Q after them to fuse
    # into an integer kernel); TensorRT's fused int8 kernel sums exactly, which the reference replays
    # run them in float on dequantized inputs, a value within float error of a rounding boundary of the
    # next quantizer can round the other way, and one changed integer spreads to the layers after it
    report = compare_written(onnx_model, name, model, graph, tmp_path / "model.onnx")
    assert report["onnxruntime_vs_reference"]["top1_agreement_pct"] == 100.0
    identical = list(report["int8_identical_pct"].values())
    assert min(identical[: len(identical) // 2]) >= 99.9, report["int8_identical_pct"]


def _lowered_trt(name: str, bits: int, options: str):
    from export.pipeline import deploy_graph

    model = trained_like(name, None, **_trt(bits, **json.loads(options)))
    return model, deploy_graph(model, input_shape_for(name))


def test_a_portable_checkpoint_initialises_a_trt_placement_model(tmp_path):
    portable = trained_like("resnet20", 4)
    path = tmp_path / "portable.pt"
    torch.save(build_checkpoint(portable, {"mean": [0.0] * 3, "std": [1.0] * 3}, None), path)
    trt = create_model("resnet20", **_trt(4))
    init_from_pretrained(trt, path)  # the branch quantizers' parameters are dropped
    own = trt.state_dict()
    for key, value in portable.state_dict().items():
        if key in own and isinstance(value, torch.Tensor):
            assert torch.equal(own[key], value), key
    assert any("branch_quantizer" in k for k in portable.state_dict())
    assert not any("branch_quantizer" in k for k in own)


def test_check_uses_the_float_branch_bound_and_onnx_runtime_is_exact_on_the_tensorrt_file(tmp_path, capsys):
    from engines.export_cli import FLOAT_BRANCH_BOUNDS
    from engines.export_cli import main as export_main
    from fatq.checkpoint import CIFAR_NORMALIZATION, save_checkpoint

    path = tmp_path / "trt.pt"
    save_checkpoint(path, trained_like("resnet20", None, **_trt(4)), CIFAR_NORMALIZATION, [f"c{i}" for i in range(10)])
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    args = [str(path), "-o", str(out), "--check", "--check-images", "16", "--json", str(report), "--quiet"]
    export_main(args)
    check = json.loads(report.read_text())["check"]
    assert "placement trt" in capsys.readouterr().out
    assert (check["min_agreement"], check["min_int8_identical"]) == FLOAT_BRANCH_BOUNDS
    # ONNX Runtime runs the float-output branch convs with the file's float biases, as the int32-mode deploy
    # reference does for float-output layers: every integer identical on these inputs, even at an exact bound
    assert check["int8_identical_pct_min"] == 100.0
    assert export_main([*args, "--min-int8-identical", "100"]) == 0
