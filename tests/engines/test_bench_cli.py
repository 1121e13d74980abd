"""fatq-bench end to end on tiny models: report schema, labels and ratios, outputs, and bad input (exit 2)."""

from __future__ import annotations

import json
import sys

import pytest
from engine_helpers import (
    OPENVINO_INT8_NOT_EXACT_HERE,
    export_float_onnx,
    make_qdq_conv,
    openvino_int8_exact_here,
    save_resnet_checkpoint,
    tiny_float_cnn,
)

from engines.cli import main

FAST = ["--warmup", "1", "--iterations", "3", "--rounds", "1", "--threads", "1", "--quiet"]
LATENCY_KEYS = {"min", "median", "p90", "p99", "max", "mean"}
NUMBER = (int, float)


@pytest.fixture(scope="module")
def resnet_pair(tmp_path_factory):
    """A 3-class FP32 resnet20 checkpoint and its ONNX (torch.onnx export, with normalization metadata)."""
    root = tmp_path_factory.mktemp("bench")
    model = save_resnet_checkpoint(root / "r20.pt", bits=32, num_classes=3)
    export_float_onnx(model, root / "r20.onnx", (3, 32, 32))
    return root / "r20.pt", root / "r20.onnx"


def _check_schema(report: dict) -> None:
    """The keys and types docs/bench_schema.md promises (schema_version 1)."""
    assert report["schema"] == "fatq-bench" and report["schema_version"] == 1
    for key in ("command", "fatq_version", "git_commit", "created_utc"):
        assert isinstance(report[key], str)
    assert set(report["host"]) == {"cpu", "python", "platform"}
    assert isinstance(report["settings"]["batch_sizes"], list)
    for model in report["models"]:
        assert set(model) == {"path", "kind", "precision", "sha256"} and len(model["sha256"]) == 64
    config_keys = {"label", "model", "model_kind", "engine", "engine_version", "precision", "device", "threads",
                   "options", "memory_bytes", "normalization", "fixed_batch", "batch_sizes", "eval_batch"}  # fmt: skip
    for config in report["configs"]:
        assert set(config) == config_keys
    run_keys = {"label", "model", "engine", "engine_version", "precision", "device", "threads", "batch_size",
                "latency_ms", "latency_source", "transfer_ms", "throughput_ips", "warmup", "iterations"}  # fmt: skip
    for run in report["runs"]:
        assert set(run) == run_keys
        assert set(run["latency_ms"]) == LATENCY_KEYS
        assert all(isinstance(v, NUMBER) and v > 0 for v in run["latency_ms"].values())
        lat = run["latency_ms"]
        assert lat["min"] <= lat["median"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert isinstance(run["throughput_ips"], float) and isinstance(run["batch_size"], int)
        assert isinstance(run["engine"], str) and isinstance(run["engine_version"], str)
        assert run["latency_source"] == "wall-clock" and run["transfer_ms"] is None
    for values in report["accuracy"].values():
        assert set(values) == {"top1", "top5", "samples"}
    for values in report["agreement"].values():
        assert set(values) == {"top1_agreement_pct", "max_abs_logit_diff", "mean_abs_logit_diff", "cosine",
                               "cosine_min", "samples"}  # fmt: skip
    assert set(report["gate"]) == {"passed", "reasons", "min_agreement_pct", "max_accuracy_drop_pts"}
    for ratio in report["ratios"]:
        assert set(ratio) == {"engine", "kind", "numerator", "denominator", "batch_size", "throughput_ratio"}
    assert isinstance(report["skipped"], list)


def test_report_schema_accuracy_and_agreement(resnet_pair, tiny_image_folder, tmp_path, capsys):
    ckpt, onnx_path = resnet_pair
    out = tmp_path / "bench.json"
    argv = [str(onnx_path), str(ckpt), "--engine", "ort", "--engine", "openvino", "--engine", "torch",
            "--batch-sizes", "1,4", "--data-dir", str(tiny_image_folder), "--reference", str(ckpt),
            "--min-agreement", "99", "--max-accuracy-drop", "1", "--json", str(out),
            "--markdown", str(tmp_path / "bench.md"), "--plot", str(tmp_path / "bench.png"), *FAST]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    _check_schema(report)
    assert [c["label"] for c in report["configs"]] == ["ort", "openvino", "torch"]  # one run per engine
    assert {(r["label"], r["batch_size"]) for r in report["runs"]} == {
        (e, b) for e in ("ort", "openvino", "torch") for b in (1, 4)
    }
    assert set(report["accuracy"]) == set(report["agreement"]) == {"ort", "openvino", "torch"}
    # The torch engine on the reference checkpoint is the reference itself.
    assert report["agreement"]["torch"]["max_abs_logit_diff"] == 0.0
    for label in ("ort", "openvino"):
        assert report["agreement"][label]["top1_agreement_pct"] == 100.0
        assert report["agreement"][label]["max_abs_logit_diff"] < 1e-3
        assert report["accuracy"][label]["samples"] == 12
    assert report["reference"]["top1"] == report["accuracy"]["torch"]["top1"]
    assert report["gate"]["passed"] and report["settings"]["eval_inputs"].startswith("cifar10 test split (12")
    assert report["skipped"] == [
        {"model": str(ckpt), "engine": e, "precision": "fp32",
         "reason": f"{e} runs {kinds}; r20.pt is a fatq checkpoint"}
        for e, kinds in (("ort", "ONNX files"), ("openvino", "ONNX files or OpenVINO IR (.xml + .bin)"))
    ] + [{"model": str(onnx_path), "engine": "torch", "precision": "fp32",
          "reason": "torch runs fatq checkpoints; r20.onnx is an ONNX file"}]  # fmt: skip
    assert report["command"].startswith("fatq-bench ") and "--engine openvino" in report["command"]
    markdown = (tmp_path / "bench.md").read_text()
    assert "| run" in markdown and "images/s" in markdown and report["command"] in markdown
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == ""  # --quiet


def test_int8_and_fp32_twins_are_labelled_and_compared(tmp_path, capsys):
    qdq = tmp_path / "tiny-int8.onnx"
    make_qdq_conv(qdq, classifier=True)
    fp32 = export_float_onnx(tiny_float_cnn(num_classes=4), tmp_path / "tiny-fp32.onnx", (3, 6, 6))
    out = tmp_path / "r.json"
    argv = [str(qdq), str(fp32), "--engine", "ort", "--engine", "openvino", "--precision", "int8",
            "--precision", "fp32", "--precision", "bf16", "--batch-sizes", "1,2", "--json", str(out),
            "--warmup", "1", "--iterations", "2", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    _check_schema(report)
    labels = [c["label"] for c in report["configs"]]
    assert labels == ["ort:int8", "ort:fp32", "openvino:int8", "openvino:fp32", "openvino:bf16"]
    kinds = {(r["engine"], r["kind"], r["batch_size"]) for r in report["ratios"]}
    assert kinds == {(e, k, b) for e, k in [("ort", "int8/fp32"), ("openvino", "int8/fp32"), ("openvino", "int8/bf16")]
                     for b in (1, 2)}  # fmt: skip
    for ratio in report["ratios"]:
        num = next(
            r for r in report["runs"] if r["label"] == ratio["numerator"] and r["batch_size"] == ratio["batch_size"]
        )
        den = next(
            r for r in report["runs"] if r["label"] == ratio["denominator"] and r["batch_size"] == ratio["batch_size"]
        )
        assert ratio["throughput_ratio"] == pytest.approx(num["throughput_ips"] / den["throughput_ips"])
    bf16 = next(c for c in report["configs"] if c["label"] == "openvino:bf16")
    assert bf16["options"]["inference_precision_hint"] == "bf16"
    assert report["settings"]["eval_inputs"].startswith("random")
    assert report["accuracy"] == {} and report["agreement"] == {}
    printed = capsys.readouterr().out
    assert "Throughput ratios" in printed and "openvino:bf16" in printed


def _exit2(argv, capsys, message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_input_exits_2_with_one_sentence(resnet_pair, tiny_image_folder, tmp_path, capsys, monkeypatch):
    ckpt, onnx_path = resnet_pair
    junk = tmp_path / "model.bin"
    junk.write_bytes(b"\x01\x02 definitely not a model")
    _exit2([str(junk), *FAST], capsys, "is neither an ONNX model, an OpenVINO IR")
    _exit2([str(onnx_path), "--engine", "tflite", *FAST], capsys, "invalid choice: 'tflite'")
    _exit2([str(onnx_path), "--batch-sizes", "1,x", *FAST], capsys, "batch sizes must be comma-separated integers")
    _exit2([str(onnx_path), "--min-agreement", "99", *FAST], capsys, "--min-agreement needs --reference")
    _exit2([str(onnx_path), "--json", str(tmp_path / "missing" / "r.json"), *FAST], capsys, "does not exist")
    _exit2([str(onnx_path), "--engine", "torch", *FAST], capsys, "no requested engine can run the given models")
    _exit2([str(onnx_path), "--precision", "int8", *FAST], capsys, "ort runs the fp32 model r20.onnx as fp32, not int8")

    small = export_float_onnx(tiny_float_cnn(num_classes=3), tmp_path / "small.onnx", (3, 8, 8))
    _exit2([str(small), "--data-dir", str(tiny_image_folder), *FAST], capsys,
           "the models expect inputs of shape (3, 8, 8), but the dataset's images are (3, 32, 32)")  # fmt: skip

    monkeypatch.setitem(sys.modules, "openvino", None)
    out = tmp_path / "never.json"
    _exit2([str(onnx_path), "--engine", "openvino", "--json", str(out), *FAST], capsys, "pip install 'fatq[openvino]'")
    assert not out.exists() and list(tmp_path.glob(".never*")) == []


def test_note_when_the_reference_is_not_the_model_the_int8_file_computes(tmp_path, capsys):
    from engines.export_cli import main as export_main
    from export.formats import REFERENCE, companion_path

    trained = tmp_path / "w4.pt"
    save_resnet_checkpoint(trained, bits=4, num_classes=3)
    # the onnx-ort file computes its .reference.pt (biases on the int32 grid), not the checkpoint as trained
    targeted = tmp_path / "w4-ort.onnx"
    assert export_main([str(trained), "--format", "onnx-ort", "-o", str(targeted), "--quiet"]) == 0
    base = [str(targeted), "--engine", "ort", "--batch-sizes", "2", "--limit", "8", *FAST]
    assert main([*base, "--reference", str(trained)]) == 0
    assert "note: w4-ort.onnx computes w4-ort.reference.pt" in capsys.readouterr().out  # information: stdout
    assert main([*base, "--reference", str(companion_path(targeted, REFERENCE))]) == 0
    assert "note:" not in capsys.readouterr().out
    # ONNX Runtime rounds the portable file's float biases to int32: eval mode of its reference is not what it
    # computes, deploy mode is
    portable = tmp_path / "w4.onnx"
    assert export_main([str(trained), "-o", str(portable), "--quiet"]) == 0
    capsys.readouterr()
    argv = [str(portable), "--engine", "ort", "--batch-sizes", "2", "--limit", "8", *FAST]
    assert main([*argv, "--reference", str(companion_path(portable, REFERENCE))]) == 0
    assert "note: ort computes w4.onnx with int32 biases" in capsys.readouterr().out
    assert main([*argv, "--reference", str(companion_path(portable, REFERENCE)), "--reference-mode", "deploy"]) == 0
    assert "note:" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fmt", "engine", "other", "max_logit_diff"),
    [("onnx-ort", "ort", "openvino", 1e-5), ("onnx-openvino", "openvino", "ort", 1e-5)],
)
def test_engine_specific_format_runs_on_its_engine_only_and_agrees_with_the_reference(
    fmt, engine, other, max_logit_diff, tmp_path
):
    if engine == "openvino" and not openvino_int8_exact_here():
        pytest.skip(OPENVINO_INT8_NOT_EXACT_HERE)
    if engine == "openvino":
        pytest.importorskip("openvino")
    from engines.export_cli import main as export_main

    trained = tmp_path / "w4.pt"
    save_resnet_checkpoint(trained, bits=4, num_classes=3)
    targeted = tmp_path / f"w4-{engine}.onnx"
    assert export_main([str(trained), "--format", fmt, "-o", str(targeted), "--quiet"]) == 0
    out, reference = tmp_path / "r.json", tmp_path / f"w4-{engine}.reference.pt"
    argv = [str(targeted), "--engine", "ort", "--engine", "openvino", "--batch-sizes", "2", "--limit", "8",
            "--reference", str(reference), "--min-agreement", "100", "--json", str(out), *FAST]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert [c["label"] for c in report["configs"]] == [engine] and report["configs"][0]["precision"] == "int8"
    assert report["agreement"][engine]["top1_agreement_pct"] == 100.0
    if max_logit_diff is not None:
        assert report["agreement"][engine]["max_abs_logit_diff"] <= max_logit_diff
    (skipped,) = report["skipped"]
    assert skipped["engine"] == other and f"only engine {engine} runs it" in skipped["reason"]
