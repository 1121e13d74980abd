"""--resume continues at the exact step: an interrupted run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image_folder

from fatq.cli_train import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _state(job) -> dict:
    return torch.load(job / "last.pt", weights_only=True)


def test_interrupted_and_resumed_run_matches_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", classes=3, per_class=6)  # 18 images, batch 4: 5 steps/epoch
    common = ["--arch", "resnet20", "--bits", "4", "--data-dir", str(data), "--epochs", "2", "--batch-size", "4"]
    common += ["--quiet", "--device", "cpu", "--seed", "5", "--milestones", "0.4,1.2"]

    assert main([*common, "--job-dir", "straight", "--max-steps", "7"]) == 0
    # stop mid-epoch (step 3 of 5), with an extra periodic save in between
    assert main([*common, "--job-dir", "split", "--max-steps", "3", "--save-every", "2"]) == 0
    assert _state(tmp_path / "split")["step"] == 3
    assert main(["--job-dir", "split", "--resume", "--max-steps", "7", "--data-dir", str(data), "--quiet"]) == 0

    straight, split = _state(tmp_path / "straight"), _state(tmp_path / "split")
    assert straight["step"] == split["step"] == 7
    for key, value in straight["state_dict"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, split["state_dict"][key]), key
        else:  # quantizer flags (extra state)
            assert value == split["state_dict"][key], key
    momentum = [s["momentum_buffer"] for s in straight["optimizer"]["state"].values()]
    resumed_momentum = [s["momentum_buffer"] for s in split["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, resumed_momentum, strict=True))
    # both invocations are recorded
    import json

    invocations = json.loads((tmp_path / "split" / "config.json").read_text())["invocations"]
    assert [i["resumed_from_step"] for i in invocations] == [None, 3]


def test_resume_refuses_changed_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    common = ["--arch", "resnet20", "--data-dir", str(data), "--batch-size", "4", "--quiet", "--job-dir", "job"]
    assert main([*common, "--epochs", "2", "--max-steps", "1"]) == 0
    assert main([*common, "--epochs", "3", "--resume"]) == 2
    assert "--epochs 3 differs from the run being resumed (2)" in capsys.readouterr().err
    # starting a new run in a job dir that holds one is refused as well
    assert main([*common, "--epochs", "2"]) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--lr", "--weight-decay"])
def test_resume_accepts_repeating_the_original_values(tmp_path, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    common = ["--arch", "resnet20", "--data-dir", str(data), "--batch-size", "4", "--quiet", "--job-dir", "job"]
    value = "0.04" if flag == "--lr" else "0.0005"
    assert main([*common, "--epochs", "2", "--max-steps", "1", flag, value]) == 0
    assert main([*common, "--epochs", "2", "--resume", flag, value, "--max-steps", "2"]) == 0
    assert _state(tmp_path / "job")["step"] == 2


def test_streaming_run_resumed_mid_epoch_matches_uninterrupted_run(tmp_path, monkeypatch):
    """The same guarantee through DataLoader workers, DistributedSampler and per-sample seeded v2 transforms."""
    from test_streaming import make_jpeg_folder

    monkeypatch.chdir(tmp_path)
    data = make_jpeg_folder(tmp_path / "data", classes=2, per_class=5)  # 10 JPEGs of 3 sizes, batch 4: 3 steps/epoch
    common = ["--arch", "resnet20", "--bits", "4", "--dataset", "imagefolder", "--data-dir", str(data)]
    common += ["--loader", "stream", "--image-size", "24", "--epochs", "2", "--batch-size", "4", "--quiet"]
    common += ["--device", "cpu", "--seed", "2", "--workers", "1"]

    assert main([*common, "--job-dir", "straight", "--max-steps", "5"]) == 0
    assert main([*common, "--job-dir", "split", "--max-steps", "2", "--workers", "0"]) == 0  # workers: no effect
    assert _state(tmp_path / "split")["step"] == 2
    assert main(["--job-dir", "split", "--resume", "--max-steps", "5", "--data-dir", str(data), "--quiet"]) == 0

    straight, split = _state(tmp_path / "straight"), _state(tmp_path / "split")
    assert straight["step"] == split["step"] == 5 and straight["train_config"]["loader"] == "stream"
    assert straight["input_size"] == [3, 24, 24]
    for key, value in straight["state_dict"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, split["state_dict"][key]), key
    momentum = [s["momentum_buffer"] for s in straight["optimizer"]["state"].values()]
    resumed_momentum = [s["momentum_buffer"] for s in split["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, resumed_momentum, strict=True))


def test_a_resumed_max_steps_run_stops_where_it_was_meant_to(tmp_path, monkeypatch):
    """--max-steps is part of the run: the README's resume command (no --max-steps) keeps it."""
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", classes=3, per_class=6)  # 18 images, batch 4: 5 steps/epoch
    common = ["--arch", "resnet20", "--bits", "4", "--data-dir", str(data), "--epochs", "2", "--batch-size", "4"]
    assert main([*common, "--quiet", "--device", "cpu", "--job-dir", "run", "--max-steps", "3"]) == 0
    assert main(["--job-dir", "run", "--resume", "--data-dir", str(data), "--quiet"]) == 0
    assert _state(tmp_path / "run")["step"] == 3
    assert main(["--job-dir", "run", "--resume", "--data-dir", str(data), "--quiet", "--max-steps", "4"]) == 0
    assert _state(tmp_path / "run")["step"] == 4
