"""fatq-export end to end: files, metadata, --check report, calibration, --lint, and bad inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_image_folder
from export_helpers import trained_like

from engines.export_cli import main
from export.deploy_graph import DeployGraph
from export.formats import DEPLOY_GRAPH, REFERENCE, companion_path
from export.onnx_builder import read_metadata
from fatq.checkpoint import CIFAR_NORMALIZATION, load_fatq_checkpoint, save_checkpoint
from fatq.models import create_model
from fatq.qconfig import QuantSpec

CLASSES = [f"class{i}" for i in range(10)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "r20.pt"
    save_checkpoint(path, trained_like("resnet20", 4), CIFAR_NORMALIZATION, CLASSES, epoch=1)
    return path


def _error(capsys) -> str:
    return capsys.readouterr().err.strip()


def test_export_writes_onnx_deploy_graph_and_metadata(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main([str(checkpoint), "--format", "onnx", "-o", str(out), "--quiet"]) == 0
    model = onnx.load(str(out))
    meta = read_metadata(model)
    assert meta["arch"] == "resnet20" and meta["bits"] == "w4a4" and meta["format"] == "qdq-int8"
    assert json.loads(meta["normalization"]) == CIFAR_NORMALIZATION
    assert json.loads(meta["input_shape"]) == ["batch", 3, 32, 32]
    assert json.loads(meta["class_names"]) == CLASSES
    assert meta["source_checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert meta["calibration"] == "none" and "fatq-export" in meta["export_command"]
    assert {"fatq_version", "git_commit", "opset"} <= set(meta)
    graph = DeployGraph.load(companion_path(out, DEPLOY_GRAPH))
    assert graph.dialect == "integer" and graph.meta["arch"] == "resnet20"


def test_reference_checkpoint_keeps_the_trained_input_size(tmp_path):
    """A model trained at another size than its architecture's registered one (MobileNetV2 on 32x32 CIFAR
    images, registered at 224) keeps that size in its .reference.pt, which fatq-bench checks against the file."""
    source = tmp_path / "r20-48.pt"
    save_checkpoint(source, trained_like("resnet20", 4), CIFAR_NORMALIZATION, CLASSES, [3, 48, 48])
    out = tmp_path / "m.onnx"
    assert main([str(source), "--format", "onnx-ort", "-o", str(out), "--quiet"]) == 0
    assert load_fatq_checkpoint(companion_path(out, REFERENCE))["input_size"] == [3, 48, 48]
    assert json.loads(read_metadata(onnx.load(str(out)))["input_shape"]) == ["batch", 3, 48, 48]


def test_check_report_and_exit_status(checkpoint, tmp_path, capsys):
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    args = [str(checkpoint), "-o", str(out), "--check", "--check-images", "12", "--json", str(report), "--quiet"]
    assert main(args) == 0
    check = json.loads(report.read_text())["check"]
    for key in ("images", "top1_agreement_pct", "max_abs_logit_diff", "mean_abs_logit_diff", "int8_identical_pct_min"):
        assert key in check
    assert check["images"] == 12 and check["passed"] is True
    assert check["int8_identical_pct_min"] == 100.0 and len(check["int8_identical_pct"]) == check["int8_tensors"]
    assert check["local_differences"]["values"] == 0
    # ONNX Runtime rounds the TensorRT file's float biases to int32: compared with that model, and with the file's
    accuracy = {"onnxruntime", "reference", "checkpoint", "checkpoint_as_trained", "file_reference"}
    assert set(check["accuracy"]) == accuracy and check["reference_arithmetic"] == "int32"
    assert check["onnxruntime_vs_reference"]["top1_agreement_pct"] == 100.0
    assert "top1_agreement_pct" in check["onnxruntime_vs_as_trained"]
    assert "int32 biases" in check["compared_model"] and "top1_agreement_pct" in check["onnxruntime_vs_file_reference"]
    assert main([*args, "--min-agreement", "100.1"]) == 2  # not a percentage: refused before any work


def test_openvino_check_of_the_tensorrt_file_compares_with_the_model_as_trained(checkpoint, tmp_path):
    pytest.importorskip("openvino")
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    args = [str(checkpoint), "-o", str(out), "--check", "--check-engine", "openvino", "--check-images", "16"]
    assert main([*args, "--json", str(report), "--quiet"]) == 0
    check = json.loads(report.read_text())["check"]
    assert check["engine"] == "openvino" and check["reference_arithmetic"] == "float"
    assert check["openvino_vs_as_trained"]["top1_agreement_pct"] == 100.0 and check["int8_identical_pct_min"] == 100.0
    assert main([*args[:-2], "--format", "onnx-ort", "--check-engine", "openvino", "--quiet"]) == 2  # ORT-only file


def _moved_tensors(reference: Path, checkpoint: Path) -> list[str]:
    saved, original = (load_fatq_checkpoint(p)["state_dict"] for p in (reference, checkpoint))
    return [k for k, v in saved.items() if isinstance(v, torch.Tensor) and not torch.equal(v, original[k])]


def test_reference_checkpoint_is_the_model_the_file_computes(checkpoint, tmp_path):
    # int32-bias file (ONNX Runtime): biases moved onto the int32 grid, BN scales off rounding ties
    out = tmp_path / "m.ort.onnx"
    assert main([str(checkpoint), "--format", "onnx-ort", "-o", str(out), "--quiet"]) == 0
    saved = load_fatq_checkpoint(companion_path(out, REFERENCE))
    assert saved["derived_from"]["source_checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert 0 < saved["bias_projection"]["max_shift_levels"] < 0.5
    moved = _moved_tensors(companion_path(out, REFERENCE), checkpoint)
    moved_bn = [k for k in moved if not k.endswith("quantizer.alpha")]  # alphas: residual-sum ranges off near-ties
    # BatchNorm: β onto the grid, γ off ties, and what the residual-sum moves scale with a range (γ, β, mean)
    bn_keys = (".bias", ".weight", ".running_mean")
    assert moved_bn and all(k.endswith(bn_keys) and "bn" in k or k == "linear.bias" for k in moved_bn)
    meta = json.loads(read_metadata(onnx.load(str(out)))["bias_projection"])
    assert meta["reference_checkpoint"] == "m.ort.reference.pt" and meta["bias_arithmetic"] == "int32"
    # float-bias file (TensorRT, OpenVINO): the trained biases, moved off near-ties only (no int32 grid, no γ)
    portable = tmp_path / "m.onnx"
    assert main([str(checkpoint), "-o", str(portable), "--quiet"]) == 0
    moved = _moved_tensors(companion_path(portable, REFERENCE), checkpoint)
    assert moved and all(k.endswith(("quantizer.alpha", ".bias")) or "bn" in k and k.endswith(bn_keys) for k in moved)
    meta = read_metadata(onnx.load(str(portable)))
    assert meta["bias_arithmetic"] == "float" and json.loads(meta["bias_projection"])["sum_ties"]["unresolved"] == []
    kept = tmp_path / "kept.onnx"
    assert main([str(checkpoint), "-o", str(kept), "--as-trained", "--quiet"]) == 0
    assert not companion_path(kept, REFERENCE).exists()
    kept_meta = read_metadata(onnx.load(str(kept)))
    assert "bias_projection" not in kept_meta and json.loads(kept_meta["residual_near_ties"])["of"] > 0


def test_onnx_runtime_format_computes_the_same_model(checkpoint, tmp_path, capsys):
    report = tmp_path / "r.json"
    args = [str(checkpoint), "--format", "onnx-ort", "--check", "--check-images", "8", "--json", str(report)]
    assert main([*args, "--quiet"]) == 0
    written = checkpoint.with_name("r20.ort.onnx")
    meta = read_metadata(onnx.load(str(written)))
    assert meta["format"] == "ort-uint8" and "uint8_tensors" in meta
    assert companion_path(written, REFERENCE).exists() and companion_path(written, DEPLOY_GRAPH).exists()
    check = json.loads(report.read_text())["check"]
    assert check["passed"] and check["int8_identical_pct_min"] == 100.0
    assert check["onnxruntime_vs_reference"]["max_abs_logit_diff"] <= 1e-5
    capsys.readouterr()
    assert main(["--lint", str(written)]) == 1  # uint8 and zero points: not for TensorRT, and lint says why
    assert "onnx-ort" in capsys.readouterr().err


def test_openvino_format_is_checked_in_openvino(checkpoint, tmp_path, capsys):
    pytest.importorskip("openvino")
    report = tmp_path / "r.json"
    args = [str(checkpoint), "--format", "onnx-openvino", "--check", "--check-images", "8", "--json", str(report)]
    status = main([*args, "--quiet"])
    written = checkpoint.with_name("r20.ov.onnx")
    meta = read_metadata(onnx.load(str(written)))
    assert meta["format"] == "openvino-fq" and json.loads(meta["fake_quantized_tensors"])
    check = json.loads(report.read_text())["check"]
    assert check["engine"] == "openvino" and "openvino_version" in check
    assert set(check["accuracy"]) == {"openvino", "reference", "checkpoint", "checkpoint_as_trained"}
    assert check["openvino_vs_reference"]["top1_agreement_pct"] == 100.0 and check["reference_arithmetic"] == "float"
    assert status == (0 if check["passed"] else 1) and "unobserved" in capsys.readouterr().out
    assert main(["--lint", str(written)]) == 1  # OpenVINO's own op: not for TensorRT, and lint says why
    assert "onnx-openvino" in capsys.readouterr().err


def test_fp32_format_and_fp32_checkpoint(checkpoint, tmp_path):
    assert main([str(checkpoint), "--format", "onnx-fp32", "--check", "--check-images", "8", "--quiet"]) == 0
    written = checkpoint.with_name("r20.fp32.onnx")
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(written)).graph.node)
    fp32 = tmp_path / "fp32.pt"
    save_checkpoint(fp32, create_model("resnet20", bits=32), CIFAR_NORMALIZATION, CLASSES)
    assert main([str(fp32), "--format", "onnx-fp32", "--quiet"]) == 0
    assert main([str(fp32), "--format", "onnx", "--quiet"]) == 2


def test_calibration_of_float_edge_inputs(tmp_path, capsys):
    spec = QuantSpec(weight_bits=4, act_bits=4, edge_inputs="float", residual_inputs="float")
    model = create_model("resnet20", spec=spec).eval()
    path = tmp_path / "float_edges.pt"
    save_checkpoint(path, model, CIFAR_NORMALIZATION, CLASSES)
    assert main([str(path), "--quiet"]) == 2
    err = _error(capsys)
    assert "conv1.input_quantizer" in err and "--calib-data" in err
    data = make_image_folder(tmp_path / "data", classes=10, per_class=1)  # the checkpoint's classes
    out = tmp_path / "cal.onnx"
    args = [str(path), "-o", str(out), "--calib-data", str(data), "--calib-batches", "1", "--calib-method", "minmax"]
    report = tmp_path / "r.json"
    main([*args, "--check", "--data-dir", str(data), "--check-images", "8", "--json", str(report), "--quiet"])
    calibration = json.loads(read_metadata(onnx.load(str(out)))["calibration"])
    assert calibration["method"] == "minmax" and "conv1.input_quantizer" in calibration["quantizers"]
    assert "layer1.0.branch_quantizer" in calibration["quantizers"]
    check = json.loads(report.read_text())["check"]
    assert check["images"] == 8 and check["int8_identical_pct_min"] == 100.0
    assert check["accuracy"]["checkpoint_uncalibrated"] is not None


def test_lint(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main([str(checkpoint), "-o", str(out), "--quiet"]) == 0
    assert main(["--lint", str(out)]) == 0
    model = onnx.load(str(out))
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.INT8 and not init.dims:
            init.CopyFrom(onnx.numpy_helper.from_array(np.int8(2), init.name))
            break
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    capsys.readouterr()
    assert main(["--lint", str(broken)]) == 1
    assert "zero-point" in capsys.readouterr().out
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    assert main(["--lint", str(tmp_path / "junk.onnx")]) == 2


def _junk(tmp_path, checkpoint):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x00garbage" * 10)
    return path, "not a readable checkpoint"


def _truncated(tmp_path, checkpoint):
    path = tmp_path / "truncated.pt"
    path.write_bytes(checkpoint.read_bytes()[:3000])
    return path, "not a readable checkpoint"


def _public(tmp_path, checkpoint):
    path = tmp_path / "public.th"
    torch.save({"best_prec1": 90.0, "state_dict": create_model("resnet20").state_dict()}, path)
    return path, "not a fatq checkpoint"


def _edited(tmp_path, checkpoint, edit):
    data = torch.load(checkpoint, weights_only=True)
    edit(data)
    path = tmp_path / "edited.pt"
    torch.save(data, path)
    return path


def _nan(tmp_path, checkpoint):
    path = _edited(
        tmp_path, checkpoint, lambda d: d["state_dict"]["layer2.1.conv1.weight"].view(-1).__setitem__(0, float("nan"))
    )
    return path, "layer2.1.conv1.weight"


def _unknown_arch(tmp_path, checkpoint):
    return _edited(tmp_path, checkpoint, lambda d: d.__setitem__("arch", "resnet21")), "resnet21"


BAD_CHECKPOINTS = {
    "missing": lambda tmp_path, checkpoint: (tmp_path / "nope.pt", "does not exist"),
    "junk": _junk,
    "truncated": _truncated,
    "public": _public,
    "nan": _nan,
    "unknown_arch": _unknown_arch,
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoints_exit_2_with_one_sentence(case, checkpoint, tmp_path, capsys):
    path, message = BAD_CHECKPOINTS[case](tmp_path, checkpoint)
    out = tmp_path / "out.onnx"
    assert main([str(path), "-o", str(out), "--quiet"]) == 2
    err = _error(capsys)
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("out.*")) and not list(tmp_path.glob(".out.*"))


def test_bad_arguments_exit_2(checkpoint, tmp_path, capsys):
    assert main([str(checkpoint), "-o", str(tmp_path / "no_dir" / "m.onnx"), "--quiet"]) == 2
    assert "does not exist" in _error(capsys)
    assert main([str(checkpoint), "--format", "trt", "-o", str(tmp_path / "m.onnx")]) == 2
    assert "-o must end in .plan or .engine" in _error(capsys)
    try:
        import tensorrt  # noqa: F401
    except ImportError:  # without TensorRT: one sentence, before anything is written
        assert main([str(checkpoint), "--format", "trt", "-o", str(tmp_path / "m.plan"), "--quiet"]) == 2
        assert "tensorrt is not installed" in _error(capsys)
        assert not list(tmp_path.glob("m.*"))
    assert main([str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--opset", "9"]) == 2
    assert "opset" in _error(capsys)
    assert main([]) == 2
    assert not list(tmp_path.glob("*.onnx"))


def test_pipeline_is_a_keyword_call_whose_files_match_its_result(checkpoint, tmp_path):
    from export.pipeline import export_checkpoint

    result = export_checkpoint(checkpoint, "onnx-ort", output=tmp_path / "k.onnx", quiet=True)
    assert result.output.is_file() and result.format.name == "onnx-ort"
    assert result.reference_path == tmp_path / "k.reference.pt" and result.reference_path.is_file()
    saved = DeployGraph.load(result.deploy_graph_path)
    assert [n.name for n in saved.nodes] == [n.name for n in result.graph.nodes]
    assert onnx.load(str(result.output)).SerializeToString() == result.onnx_model.SerializeToString()
    meta = read_metadata(result.onnx_model)
    assert meta["export_command"].startswith("fatq-export ") and "--format onnx-ort" in meta["export_command"]
    assert result.report()["deploy_graph"] == str(result.deploy_graph_path)


def test_openvino_check_reads_every_exposed_tensor_of_mobilenetv2_w8a8_cpu(tmp_path):
    """In this file OpenVINO merges a per-reader DequantizeLinear with an identical one, and the merged output
    carries both names; the check still finds each exposed tensor by its own name (it stopped with a KeyError)."""
    pytest.importorskip("openvino")
    path = tmp_path / "mbv2.pt"
    model = trained_like("mobilenetv2", 8, spec=QuantSpec(weight_bits=8, act_bits=8, target="cpu"))
    save_checkpoint(path, model, CIFAR_NORMALIZATION, input_size=[3, 32, 32])
    report = tmp_path / "r.json"
    args = [str(path), "--format", "onnx-openvino", "--check", "--check-images", "4", "--json", str(report), "--quiet"]
    assert main(args) in (0, 1)  # a result either way (an untrained 8-bit model may part on a rounding tie)
    check = json.loads(report.read_text())["check"]
    assert check["openvino_vs_reference"]["top1_agreement_pct"] >= 75.0 and check["int8_tensors"] > 40
