"""Bad input to fatq-bench and fatq-ptq: exit 2, one sentence on stderr, no traceback, no file left.

Output locations are checked before any work; the runners turn engine load errors (ONNX Runtime
1.32's exceptions derive from Exception only; OpenVINO's first line is a source location) into
one sentence with the reason.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import onnx
import pytest
import torch
from engine_helpers import NORMALIZATION, export_float_onnx, save_resnet_checkpoint, tiny_float_cnn
from onnx import TensorProto, helper

from calibration.cli_ptq import main as ptq_main
from engines.cli import main as bench_main
from fatq.checkpoint import CIFAR_NORMALIZATION, read_checkpoint_file, save_checkpoint
from fatq.models import create_model

FAST = ["--warmup", "1", "--iterations", "2", "--rounds", "1", "--threads", "1", "--quiet", "--batch-sizes", "2"]


def _refused(main, argv: list[str], capsys, message: str, outputs: list[Path]) -> None:
    """``main(argv)`` exits 2 with one line containing ``message`` and writes none of ``outputs``."""
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for out in outputs:
        assert not out.is_file(), out
        assert list(out.parent.glob(f".{out.name}.*")) == [], "temp files left"


@contextlib.contextmanager
def _immutable_dir(path: Path):
    """A directory nobody (root included) can create files in: ``chattr +i``; skips where not permitted."""
    path.mkdir()
    try:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(
            f"chattr +i is not permitted here ({exc}); root ignores chmod, so nothing else makes a read-only dir"
        )
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    return export_float_onnx(tiny_float_cnn(num_classes=3), root / "cnn.onnx", (3, 32, 32))


@pytest.mark.parametrize("flag", ["--json", "--markdown", "--plot"])
def test_bench_output_paths_are_checked_before_any_work(float_onnx, tmp_path, capsys, flag):
    suffix = {"--json": ".json", "--markdown": ".md", "--plot": ".png"}[flag]
    if flag == "--plot":
        pytest.importorskip("matplotlib")
    folder = tmp_path / f"report{suffix}"
    folder.mkdir()
    _refused(bench_main, [str(float_onnx), flag, str(folder), *FAST], capsys, "is a directory; give a file name", [])
    blocker = tmp_path / "plain"
    blocker.write_text("a file")
    out = blocker / f"r{suffix}"
    _refused(bench_main, [str(float_onnx), flag, str(out), *FAST], capsys, f"{blocker} is a file, not a directory", [])
    _refused(bench_main, [str(float_onnx), flag, str(float_onnx), *FAST], capsys, "would overwrite the input", [])
    assert onnx.load(str(float_onnx)).graph.node  # the model is untouched
    with _immutable_dir(tmp_path / "locked") as locked:
        out = locked / f"r{suffix}"
        _refused(bench_main, [str(float_onnx), flag, str(out), *FAST], capsys, "cannot write the", [out])


def _unknown_op_onnx(path: Path, domain: str = "") -> Path:
    """A one-node model whose op FooBar no engine knows; a standard-domain one fails onnx.checker first."""
    node = helper.make_node("FooBar", ["input"], ["logits"], domain=domain)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
    )
    imports = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=imports), str(path))
    return path


@pytest.mark.parametrize(
    ("engine", "domain", "reason"),
    [
        ("ort", "", "not a valid ONNX model: No Op registered for FooBar"),
        ("openvino", "", "not a valid ONNX model: No Op registered for FooBar"),
        ("ort", "com.example", "com.example:FooBar(-1) is not a registered function/op"),
        ("openvino", "com.example", "No conversion rule found for operations: com.example.FooBar"),
    ],
)
def test_unknown_op_is_one_sentence_with_the_op_name(tmp_path, capsys, engine, domain, reason):
    """A standard op onnx.checker does not know is refused before any engine; a custom-domain op, which the
    checker cannot judge, reaches the engine, whose load error is reported with its reason."""
    if engine == "openvino":
        pytest.importorskip("openvino")
    model, out = _unknown_op_onnx(tmp_path / "foo.onnx", domain), tmp_path / "r.json"
    _refused(bench_main, [str(model), "--engine", engine, "--json", str(out), *FAST], capsys, reason, [out])


def test_openvino_ir_load_errors_carry_the_reason(float_onnx, tmp_path, capsys):
    ov = pytest.importorskip("openvino")
    xml = tmp_path / "good.xml"
    ov.save_model(ov.convert_model(str(float_onnx)), str(xml))
    bad_layer = tmp_path / "layer.xml"
    bad_layer.write_text(xml.read_text().replace('type="Convolution"', 'type="Convolutionx"'))
    bad_layer.with_suffix(".bin").write_bytes(xml.with_suffix(".bin").read_bytes())
    truncated = tmp_path / "short.xml"
    truncated.write_text(xml.read_text())
    truncated.with_suffix(".bin").write_bytes(xml.with_suffix(".bin").read_bytes()[:64])
    lonely = tmp_path / "lonely.xml"
    lonely.write_text(xml.read_text())
    out = tmp_path / "r.json"
    cases = [
        (bad_layer, "doesn't contain the operation with type: Convolutionx"),
        (truncated, "Incorrect weights in bin file"),
        (lonely, "has no weights file lonely.bin beside it"),
    ]
    for path, reason in cases:
        _refused(bench_main, [str(path), "--json", str(out), *FAST], capsys, reason, [out])


def test_reference_of_another_architecture_is_refused(tmp_path, capsys):
    model = save_resnet_checkpoint(tmp_path / "r20.pt", num_classes=3)
    onnx_path = export_float_onnx(model, tmp_path / "r20.onnx", (3, 32, 32))
    proto = onnx.load(str(onnx_path))
    helper.set_model_props(
        proto, {"normalization": json.dumps(NORMALIZATION), "arch": "resnet20", "num_classes": "3"}
    )  # what fatq-export records
    onnx.save(proto, str(onnx_path))
    other = tmp_path / "r32.pt"
    save_checkpoint(other, create_model("resnet32", bits=32, num_classes=3), CIFAR_NORMALIZATION)
    out = tmp_path / "r.json"
    argv = [str(onnx_path), "--reference", str(other), "--json", str(out), *FAST]
    _refused(bench_main, argv, capsys, "--reference r32.pt is a resnet32, but r20.onnx was made from a resnet20", [out])
    argv = [str(tmp_path / "r20.pt"), "--reference", str(other), "--json", str(out), *FAST]
    _refused(bench_main, argv, capsys, "but r20.pt was made from a resnet20", [out])
    wider = tmp_path / "r20-10.pt"
    save_resnet_checkpoint(wider, num_classes=10)
    argv = [str(onnx_path), "--reference", str(wider), "--json", str(out), *FAST]
    _refused(bench_main, argv, capsys, "--reference r20-10.pt has 10 classes, r20.onnx has 3", [out])
    assert bench_main([str(onnx_path), "--reference", str(tmp_path / "r20.pt"), "--json", str(out), *FAST]) == 0


def test_data_whose_classes_are_not_the_models_is_refused(float_onnx, tmp_path, tiny_image_folder, capsys):
    proto = onnx.load(str(float_onnx))
    helper.set_model_props(
        proto, {"normalization": json.dumps(NORMALIZATION), "class_names": json.dumps(["cat", "dog", "bird"])}
    )
    labelled = tmp_path / "pets.onnx"
    onnx.save(proto, str(labelled))
    out = tmp_path / "r.json"
    argv = [str(labelled), "--data-dir", str(tiny_image_folder), "--json", str(out), *FAST]
    _refused(bench_main, argv, capsys, "pets.onnx was trained on the classes [cat, dog, bird], but the data's", [out])
    # the same classes pass (the tiny folder's classes are class0..class2)
    helper.set_model_props(
        proto, {"normalization": json.dumps(NORMALIZATION), "class_names": json.dumps(["class0", "class1", "class2"])}
    )
    onnx.save(proto, str(labelled))
    assert bench_main(argv) == 0 and out.is_file()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--min-agreement", "150", "--reference", "REF"], "expected a value in 0..100, got 150"),
        (["--min-agreement", "nan", "--reference", "REF"], "expected a value in 0..100, got nan"),
        (["--max-accuracy-drop", "inf"], "expected accuracy points in 0..100, got inf"),
        (["--max-accuracy-drop", "-1"], "expected accuracy points in 0..100, got -1"),
        (["--limit", "0"], "expected a positive integer, got 0"),
        (["--iterations", "-3"], "expected a positive integer, got -3"),
        (["--warmup", "-1"], "expected an integer 0 or more, got -1"),
        (["--threads", "0"], "expected a positive integer, got 0"),
        (["--batch-sizes", "0"], "batch sizes must be positive"),
        (["--trt-workspace-mib", "0"], "expected a positive integer, got 0"),
        (["--normalization", "cifar10", "--mean", "0.5,0.5,0.5", "--std", "1,1,1"], "either --normalization or"),
    ],
)
def test_bench_bad_values_are_refused(float_onnx, tmp_path, capsys, flags, message):
    reference = tmp_path / "ref.pt"
    save_resnet_checkpoint(reference, num_classes=3)
    flags = [str(reference) if f == "REF" else f for f in flags]
    out = tmp_path / "r.json"
    _refused(bench_main, [str(float_onnx), *flags, "--json", str(out), *FAST[:-2]], capsys, message, [out])


# ----------------------------------------------------------------------------- fatq-ptq
@pytest.fixture
def fp32_checkpoint(tmp_path) -> Path:
    path = tmp_path / "fp32.pt"
    model = create_model("resnet20", bits=32, num_classes=3)
    save_checkpoint(path, model, CIFAR_NORMALIZATION, ["class0", "class1", "class2"])
    return path


def _ptq(source: Path, data: Path, *extra: str) -> list[str]:
    return [str(source), "--bits", "8", "--data-dir", str(data), "--calib-batches", "1", "--batch-size", "4",
            "--quiet", *extra]  # fmt: skip


def test_ptq_output_paths_are_checked_before_any_work(fp32_checkpoint, tmp_path, tiny_image_folder, capsys):
    folder = tmp_path / "out.pt"
    folder.mkdir()
    _refused(ptq_main, _ptq(fp32_checkpoint, tiny_image_folder, "-o", str(folder)), capsys, "is a directory", [])
    blocker = tmp_path / "plain"
    blocker.write_text("a file")
    out, report = blocker / "ptq.pt", tmp_path / "ptq.json"
    argv = _ptq(fp32_checkpoint, tiny_image_folder, "-o", str(out), "--json", str(report))
    _refused(ptq_main, argv, capsys, f"{blocker} is a file, not a directory", [report])
    argv = _ptq(fp32_checkpoint, tiny_image_folder, "-o", str(fp32_checkpoint))
    _refused(ptq_main, argv, capsys, f"-o {fp32_checkpoint} would overwrite the input", [])
    assert read_checkpoint_file(fp32_checkpoint)["spec"]["weight_bits"] == 32  # the source is untouched
    good = tmp_path / "ptq.pt"
    with _immutable_dir(tmp_path / "locked") as locked:
        argv = _ptq(fp32_checkpoint, tiny_image_folder, "-o", str(good), "--json", str(locked / "ptq.json"))
        _refused(ptq_main, argv, capsys, "cannot write the JSON report (--json)", [good])


def test_ptq_malformed_checkpoints_and_values(fp32_checkpoint, tmp_path, tiny_image_folder, capsys):
    out = tmp_path / "never.pt"
    tensor_state = tmp_path / "tensor.pt"
    torch.save({"state_dict": torch.zeros(3)}, tensor_state)
    no_spec = tmp_path / "nospec.pt"
    data = read_checkpoint_file(fp32_checkpoint)
    del data["spec"]
    torch.save(data, no_spec)
    renamed = tmp_path / "pets.pt"
    save_checkpoint(
        renamed, create_model("resnet20", bits=32, num_classes=3), CIFAR_NORMALIZATION, ["cat", "dog", "bird"]
    )
    cases = [
        (_ptq(tensor_state, tiny_image_folder, "--arch", "resnet20"), "state_dict is a Tensor, not a dict of tensors"),
        (_ptq(no_spec, tiny_image_folder), "is a fatq checkpoint without its spec field"),
        (_ptq(renamed, tiny_image_folder), "was trained on the classes ['cat', 'dog', 'bird'], but"),
        (_ptq(fp32_checkpoint, tiny_image_folder, "--percentile", "nan", "--calib-method", "percentile"), "nan"),
        (_ptq(fp32_checkpoint, tiny_image_folder, "--seed", str(2**70)), "--seed must be in 0..2^63-1"),
        (_ptq(fp32_checkpoint, tiny_image_folder, "--batch-size", "-4"), "must be at least 1"),
        (_ptq(tmp_path, tiny_image_folder), "is a directory; give the FP32 checkpoint file"),
    ]
    for argv, message in cases:
        _refused(ptq_main, [*argv, "-o", str(out)], capsys, message, [out])


def test_bench_malformed_checkpoints_as_model_or_reference(float_onnx, tmp_path, capsys):
    good = tmp_path / "r20.pt"
    save_resnet_checkpoint(good, num_classes=3)
    tensor_state, no_spec = tmp_path / "tensor.pt", tmp_path / "nospec.pt"
    data = read_checkpoint_file(good)
    torch.save({**data, "state_dict": torch.zeros(3)}, tensor_state)
    del data["spec"]
    torch.save(data, no_spec)
    out = tmp_path / "r.json"
    for path, message in ((tensor_state, "state_dict is a Tensor, not a dict"), (no_spec, "without its spec field")):
        _refused(bench_main, [str(path), "--json", str(out), *FAST], capsys, message, [out])
        argv = [str(float_onnx), "--reference", str(path), "--json", str(out), *FAST]
        _refused(bench_main, argv, capsys, message, [out])
