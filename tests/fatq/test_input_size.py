"""The input size of a model is the size it was trained on: checkpoint ``input_size`` and first-conv channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from fatq.checkpoint import model_from_checkpoint
from fatq.cli_train import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _gray_folder(root, size: int):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(2):
            folder = root / split / f"digit{c}"
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    return root


CASES = {  # name: (image side, grayscale, extra flags, expected input_size)
    "24x24": (24, False, ["--dataset", "imagefolder"], [3, 24, 24]),
    "28x28 grayscale": (28, True, ["--dataset", "imagefolder"], [1, 28, 28]),
    "32x32 cifar10": (32, False, ["--dataset", "cifar10"], [3, 32, 32]),  # CIFAR-10 as an image folder
    "64x64": (64, False, ["--dataset", "imagefolder"], [3, 64, 64]),
}


@pytest.mark.parametrize("arch", ["resnet20", "mobilenetv2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoint_records_the_trained_input_size(tmp_path, monkeypatch, arch, case):
    monkeypatch.chdir(tmp_path)
    side, gray, flags, expected = CASES[case]
    data = _gray_folder(tmp_path / "data", side) if gray else make_image_folder(tmp_path / "data", 2, 2, side)
    argv = ["--arch", arch, "--bits", "4", "--data-dir", str(data), *flags, "--batch-size", "4", "--max-steps", "1"]
    assert main([*argv, "--quiet", "--device", "cpu", "--job-dir", "job"]) == 0
    last = torch.load(tmp_path / "job" / "last.pt", weights_only=True)
    assert last["input_size"] == expected
    model = model_from_checkpoint(last)  # rebuilt for the recorded channels
    assert model.in_channels == expected[0]
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == expected[0]
    model.eval()
    assert model(torch.zeros(2, *expected)).shape == (2, 2)
    # --eval-only evaluates at the recorded size without being told it
    assert main(["--eval-only", "job/last.pt", "--data-dir", str(data), *flags, "--quiet", "--json", "e.json"]) == 0
