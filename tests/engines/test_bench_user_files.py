"""fatq-bench on the files users have: OpenVINO IR, foreign ONNX without normalization, fixed-batch files.

Every case runs real engines (ONNX Runtime, OpenVINO); expected numbers come from the PyTorch
model or the numpy QDQ reference, not from the code under test.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import NORMALIZATION, export_float_onnx, make_qdq_conv, qdq_reference, tiny_float_cnn

from engines.cli import main
from fatq.data import load_split, normalize
from fatq.errors import FatqError

FAST = ["--warmup", "1", "--iterations", "2", "--rounds", "1", "--threads", "1", "--quiet"]
OTHER = {"mean": [0.5, 0.45, 0.4], "std": [0.25, 0.2, 0.3]}  # not what any file records


def _to_ir(onnx_path: Path, xml: Path) -> Path:
    """The OpenVINO IR a user makes from an ONNX file (OpenVINO's documented two calls)."""
    ov = pytest.importorskip("openvino")
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml))
    return xml


def _torch_top1(model: torch.nn.Module, data_dir: Path, normalization: dict) -> float:
    """Top-1 (%) of the PyTorch model on the test split, computed here without fatq-bench."""
    split = load_split(data_dir, "test")
    with torch.no_grad():
        logits = model(normalize(split.images, normalization["mean"], normalization["std"]))
    return float((logits.argmax(1) == split.labels).double().mean() * 100)


def _bench(argv: list[str], tmp_path: Path) -> dict:
    out = tmp_path / "report.json"
    assert main([*argv, "--json", str(out), *FAST]) == 0
    return json.loads(out.read_text())


def _exit2(argv: list[str], capsys, message: str) -> None:
    capsys.readouterr()
    assert main([*argv, *FAST]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_openvino_ir_runs_with_the_normalization_it_kept(tmp_path, tiny_image_folder):
    model = tiny_float_cnn(num_classes=3)
    onnx_path = export_float_onnx(model, tmp_path / "cnn.onnx", (3, 32, 32))
    xml = _to_ir(onnx_path, tmp_path / "cnn.xml")
    report = _bench([str(xml), "--data-dir", str(tiny_image_folder), "--batch-sizes", "1,4"], tmp_path)
    assert report["models"][0]["kind"] == "openvino-ir" and report["models"][0]["precision"] == "fp32"
    (config,) = report["configs"]
    assert config["engine"] == "openvino"  # the default engine of an IR
    assert config["normalization"] == NORMALIZATION  # kept by OpenVINO from the ONNX metadata_props
    assert {r["batch_size"] for r in report["runs"]} == {1, 4}
    # IR weights are stored in fp16 by save_model: same predictions as PyTorch on 12 images
    assert report["accuracy"]["openvino"]["top1"] == pytest.approx(_torch_top1(model, tiny_image_folder, NORMALIZATION))
    assert report["accuracy"]["openvino"]["samples"] == 12


def test_int8_ir_matches_the_numpy_integer_reference(tmp_path):
    from engines.openvino_runner import OpenVinoRunner

    params = make_qdq_conv(tmp_path / "q.onnx")
    xml = _to_ir(tmp_path / "q.onnx", tmp_path / "q.xml")  # QDQ pairs become FakeQuantize layers
    x = np.random.default_rng(1).uniform(-7.0, 7.0, size=(4, 3, 6, 6)).astype(np.float32)
    _, q_expected = qdq_reference(x, params)
    with OpenVinoRunner(xml, threads=1) as runner:
        assert runner.info().precision == "int8"
        (out,) = runner.infer({"input": x}).values()
    q_out = np.rint(out / params["y_scale"])
    assert np.abs(q_out - q_expected).max() <= 1 and np.mean(q_out == q_expected) >= 0.99  # float32 ties


def test_foreign_onnx_and_ir_need_mean_and_std_and_then_run(tmp_path, tiny_image_folder, capsys):
    model = tiny_float_cnn(num_classes=3)
    foreign = export_float_onnx(model, tmp_path / "theirs.onnx", (3, 32, 32), normalization=None)
    xml = _to_ir(foreign, tmp_path / "theirs_ir.xml")
    data = ["--data-dir", str(tiny_image_folder)]
    for path in (foreign, xml):
        _exit2([str(path), *data], capsys, "record no input normalization; pass the mean and std")
    mean, std = (",".join(str(v) for v in OTHER[k]) for k in ("mean", "std"))
    report = _bench([str(foreign), str(xml), *data, "--mean", mean, "--std", std, "--engine", "ort",
                     "--engine", "openvino", "--batch-sizes", "4"], tmp_path)  # fmt: skip
    expected = _torch_top1(model, tiny_image_folder, OTHER)
    runs = {(Path(c["model"]).name, c["engine"]): c["normalization"] for c in report["configs"]}
    assert runs == {
        ("theirs.onnx", "ort"): OTHER,
        ("theirs.onnx", "openvino"): OTHER,
        ("theirs_ir.xml", "openvino"): OTHER,
    }
    assert [a["top1"] for a in report["accuracy"].values()] == pytest.approx([expected] * 3)
    assert any("runs ONNX files; theirs_ir.xml is an OpenVINO IR" in s["reason"] for s in report["skipped"])
    # a named normalization, and a file that records its own keeps it
    ours = export_float_onnx(model, tmp_path / "ours.onnx", (3, 32, 32))
    report = _bench([str(ours), str(foreign), *data, "--normalization", "imagenet", "--batch-sizes", "4"], tmp_path)
    normalizations = {Path(c["model"]).name: c["normalization"] for c in report["configs"]}
    assert normalizations["ours.onnx"] == NORMALIZATION and normalizations["theirs.onnx"]["std"][0] == 0.229
    _exit2([str(foreign), *data, "--mean", "0.5,0.5", "--std", "0.2,0.2"], capsys, "give 2 values, the models take 3")
    _exit2([str(foreign), *data, "--mean", mean], capsys, "--mean and --std go together")
    _exit2([str(foreign), *data, "--mean", mean, "--std", "0.2,0,0.2"], capsys, "--std values must be positive")
    _exit2([str(foreign), *data, "--mean", "nan,0,0", "--std", std], capsys, "finite numbers")


def _fixed_batch_onnx(model: torch.nn.Module, path: Path, batch: int) -> Path:
    """torch.onnx.export without dynamic axes: the file's batch axis is ``batch``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(batch, 3, 32, 32), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], opset_version=17)  # fmt: skip
    return path


def test_fixed_batch_file_runs_at_its_batch_and_says_so(tmp_path, tiny_image_folder, capsys):
    model = tiny_float_cnn(num_classes=3)
    fixed = _fixed_batch_onnx(model, tmp_path / "fixed.onnx", batch=5)  # 12 test images: a padded last batch
    dynamic = export_float_onnx(model, tmp_path / "dynamic.onnx", (3, 32, 32), normalization=None)
    out = tmp_path / "r.json"
    argv = [str(fixed), str(dynamic), "--data-dir", str(tiny_image_folder), "--normalization", "cifar10",
            "--batch-sizes", "1,2", "--json", str(out), *FAST[:-1]]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    timed = {(Path(r["model"]).name, r["batch_size"]) for r in report["runs"]}
    assert timed == {("fixed.onnx", 5), ("dynamic.onnx", 1), ("dynamic.onnx", 2)}
    assert report["settings"]["batch_sizes"] == [1, 2, 5]
    configs = {Path(c["model"]).name: c for c in report["configs"]}
    assert configs["fixed.onnx"]["fixed_batch"] == 5 and configs["fixed.onnx"]["eval_batch"] == 5
    assert configs["dynamic.onnx"]["fixed_batch"] is None and configs["dynamic.onnx"]["batch_sizes"] == [1, 2]
    reasons = [s["reason"] for s in report["skipped"] if Path(s["model"]).name == "fixed.onnx"]
    assert reasons == [f"batch {b}: fixed.onnx has a fixed batch of 5; it runs at batch 5 only" for b in (1, 2)]
    assert "fixed batch 5 (runs at that batch only)" in printed and "batch 1: fixed.onnx has a fixed batch" in printed
    expected = _torch_top1(model, tiny_image_folder, NORMALIZATION)
    assert [a["top1"] for a in report["accuracy"].values()] == pytest.approx([expected, expected])


def test_ir_detection_reads_the_bytes(tmp_path):
    from engines.model_files import OPENVINO_IR, detect_model_kind, inspect_model

    onnx_path = export_float_onnx(tiny_float_cnn(num_classes=3), tmp_path / "cnn.onnx", (3, 8, 8), normalization=None)
    xml = _to_ir(onnx_path, tmp_path / "cnn.xml")
    renamed = tmp_path / "cnn.model"  # the root element decides, not the suffix
    renamed.write_bytes(xml.read_bytes())
    renamed.with_suffix(".bin").write_bytes(xml.with_suffix(".bin").read_bytes())
    assert detect_model_kind(xml) == detect_model_kind(renamed) == OPENVINO_IR
    info = inspect_model(xml)
    assert info.precision == "fp32" and info.normalization is None and info.metadata == {}
    other = tmp_path / "page.xml"
    other.write_text("<?xml version='1.0'?><html><body>no model</body></html>")
    with pytest.raises(FatqError, match="is neither an ONNX model, an OpenVINO IR"):
        detect_model_kind(other)
