"""The classes of bad input `tools/bad_input_sweep.py` found failing, one test each, in every CLI they apply to.

Each case: exit 2, one sentence on stderr (no traceback), and no output file left — checked before any
work where the problem is visible from the arguments, and cleaned up where it shows only later (a
``--check`` whose data is unusable removes the export it just wrote).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from export_helpers import trained_like
from test_bad_input_bench_ptq import _immutable_dir, _refused

from engines.cli import main as bench_main
from engines.export_cli import main as export_main
from fatq.checkpoint import CIFAR_NORMALIZATION, save_checkpoint
from fatq.cli_import import main as import_main
from fatq.cli_train import main as train_main

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
EXPORT_SET = (".onnx", ".deploy.npz", ".reference.pt")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "r20.pt"
    save_checkpoint(path, trained_like("resnet20", 4), CIFAR_NORMALIZATION, CIFAR_CLASSES, epoch=1)
    return path


def _export_set(out: Path) -> list[Path]:
    return [out.with_name(out.stem + suffix) for suffix in EXPORT_SET]


# ----------------------------------------------------------------------------- output locations
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "existing_dir").mkdir() or ["--json", str(d / "existing_dir")], "is a directory"),
        (lambda d: (d / "somefile").touch() or ["--json", str(d / "somefile" / "r.json")], "is a file, not a dir"),
        (lambda d: ["--json", str(d / "nodir" / "r.json")], "does not exist"),
        (lambda d: ["--json", str(d / "out.onnx")], "would overwrite"),
        (lambda d: ["--check", "--data-dir", str(d / "nope")], "does not exist"),
        (lambda d: ["--check-images", "0", "--check"], "--check-images must be at least 1"),
        (lambda d: ["--calib-method", "bogus"], "invalid choice"),
        (lambda d: ["--calib-batches", "0"], "--calib-batches must be at least 1"),
        (lambda d: ["--min-agreement", "150", "--check"], "between 0 and 100"),
    ],
)
def test_export_refuses_before_writing_anything(checkpoint, tmp_path, capsys, make, message):
    out = tmp_path / "out.onnx"
    argv = [str(checkpoint), "-o", str(out), "--quiet", *make(tmp_path)]
    _refused(export_main, argv, capsys, message, _export_set(out))


def test_export_into_a_directory_nobody_can_write(checkpoint, tmp_path, capsys):
    with _immutable_dir(tmp_path / "ro") as ro:
        out = ro / "x.onnx"
        _refused(export_main, [str(checkpoint), "-o", str(out), "--quiet"], capsys, "cannot write", _export_set(out))


def test_a_check_whose_data_has_other_classes_removes_the_export(checkpoint, tmp_path, tiny_image_folder, capsys):
    """The data is readable, so the export is written first; the check then refuses it and removes the set."""
    out = tmp_path / "out.onnx"
    argv = [str(checkpoint), "-o", str(out), "--check", "--data-dir", str(tiny_image_folder), "--quiet"]
    _refused(export_main, argv, capsys, "classes", _export_set(out))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "somefile").touch() or ["--job-dir", str(d / "somefile")], "is a file, not a directory"),
        (lambda d: (d / "somefile").touch() or ["--job-dir", str(d / "somefile" / "job")], "is a file"),
        (lambda d: (d / "existing_dir").mkdir() or ["--json", str(d / "existing_dir")], "is a directory"),
        (lambda d: ["--json", "PRETRAINED"], "would overwrite"),
        (lambda d: ["--seed", str(2**70)], "invalid seed"),
        (lambda d: ["--seed", "-1"], "invalid seed"),
    ],
)
def test_train_refuses_before_any_work(checkpoint, tmp_path, tiny_image_folder, capsys, make, message):
    flags = [str(checkpoint) if f == "PRETRAINED" else f for f in make(tmp_path)]
    argv = ["--arch", "resnet20", "--bits", "4", "--pretrained", str(checkpoint), "--dataset", "imagefolder"]
    argv += ["--data-dir", str(tiny_image_folder), "--max-steps", "1", "--device", "cpu", "--quiet", *flags]
    if "--job-dir" not in flags:
        argv += ["--job-dir", str(tmp_path / "job")]
    before = checkpoint.read_bytes()
    _refused(train_main, argv, capsys, message, [tmp_path / "job" / "last.pt"])
    assert checkpoint.read_bytes() == before  # an input is never overwritten


def test_eval_only_json_never_overwrites_the_checkpoint(checkpoint, tmp_path, tiny_image_folder, capsys):
    copy = tmp_path / "model.pt"
    copy.write_bytes(checkpoint.read_bytes())
    argv = ["--eval-only", str(copy), "--data-dir", str(tiny_image_folder), "--dataset", "imagefolder"]
    _refused(train_main, [*argv, "--json", str(copy), "--quiet"], capsys, "would overwrite", [])
    assert copy.read_bytes() == checkpoint.read_bytes()


def test_import_output_locations(tmp_path, capsys):
    (tmp_path / "existing_dir").mkdir()
    source = tmp_path / "ref.pth.tar"
    source.write_bytes(b"unused: the output is checked first")
    argv = [str(source), "--arch", "resnet20", "--bits", "4", "-o", str(tmp_path / "existing_dir")]
    _refused(import_main, argv, capsys, "is a directory", [])


# ----------------------------------------------------------------------------- malformed inputs
def _text_file(d: Path, checkpoint: Path) -> Path:
    (d / "text.pt").write_text("not a checkpoint\n")
    return d / "text.pt"


def _tensor_state_dict(d: Path, checkpoint: Path) -> Path:
    torch.save({"state_dict": torch.zeros(3)}, d / "tensor.pt")
    return d / "tensor.pt"


def _no_spec(d: Path, checkpoint: Path) -> Path:
    data = torch.load(checkpoint, weights_only=True)
    del data["spec"]
    torch.save(data, d / "nospec.pt")
    return d / "nospec.pt"


def _directory(d: Path, checkpoint: Path) -> Path:
    (d / "a_dir").mkdir()
    return d / "a_dir"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_text_file, "not a readable checkpoint"),
        (_tensor_state_dict, "not a dict of tensors"),
        (_no_spec, "without its spec"),
        (_directory, "is a directory"),
    ],
)
def test_malformed_checkpoints_in_every_cli(checkpoint, tmp_path, tiny_image_folder, capsys, make, message):
    bad = make(tmp_path, checkpoint)
    data = ["--data-dir", str(tiny_image_folder), "--dataset", "imagefolder", "--device", "cpu", "--quiet"]
    _refused(export_main, [str(bad), "-o", str(tmp_path / "o.onnx"), "--quiet"], capsys, message, [])
    _refused(train_main, ["--eval-only", str(bad), *data], capsys, message, [])
    pretrained = ["--arch", "resnet20", "--bits", "4", "--pretrained", str(bad), "--max-steps", "1"]
    _refused(train_main, [*pretrained, "--job-dir", str(tmp_path / "job"), *data], capsys, message, [])
    assert not (tmp_path / "job" / "last.pt").exists()


def _malformed_onnx(tmp_path: Path, checkpoint: Path, kind: str) -> Path:
    out = tmp_path / "good.onnx"
    assert export_main([str(checkpoint), "-o", str(out), "--quiet"]) == 0
    model = onnx.load(str(out))
    if kind == "node without inputs":
        conv = next(n for n in model.graph.node if n.op_type == "Conv")
        del conv.input[:]
    else:  # initializer bytes that do not fit its dims
        init = next(i for i in model.graph.initializer if len(i.dims) == 4)
        init.raw_data = init.raw_data[: len(init.raw_data) // 2]
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    return bad


@pytest.mark.parametrize("kind", ["node without inputs", "initializer bytes"])
def test_malformed_onnx_is_one_sentence_in_lint_and_every_engine(checkpoint, tmp_path, capsys, kind):
    bad = _malformed_onnx(tmp_path, checkpoint, kind)
    capsys.readouterr()
    _refused(export_main, ["--lint", str(bad)], capsys, "not a valid ONNX model", [])
    for engine in ("ort", "openvino"):  # OpenVINO 2026.4 crashed (SIGSEGV) on a Conv without inputs
        argv = [str(bad), "--engine", engine, "--iterations", "1", "--warmup", "0", "--batch-sizes", "1", "--quiet"]
        _refused(bench_main, argv, capsys, "not a valid ONNX model", [])


def test_an_unreadable_archive_message_is_a_whole_sentence(tmp_path, capsys):
    archive = tmp_path / "random.tar.gz"
    archive.write_bytes(bytes(range(256)) * 64)
    argv = ["--arch", "resnet20", "--bits", "4", "--data-dir", str(archive), "--max-steps", "1", "--device", "cpu"]
    _refused(train_main, [*argv, "--job-dir", str(tmp_path / "job"), "--quiet"], capsys, "not a readable tar", [])
