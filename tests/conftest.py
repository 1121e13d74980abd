"""Shared fixtures: real data and pretrained weights from the environment, small synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """CIFAR-10 (JPEG) directory from FATQ_DATA_DIR; skips the test without it."""
    value = os.environ.get("FATQ_DATA_DIR")
    if not value or not Path(value).exists():
        pytest.skip("FATQ_DATA_DIR is not set (point it at ../shared/datasets to run real-data tests)")
    return Path(value)


@pytest.fixture(scope="session")
def pretrained_dir() -> Path:
    """Public FP32 checkpoints from FATQ_PRETRAINED_DIR; skips the test without it."""
    value = os.environ.get("FATQ_PRETRAINED_DIR")
    if not value or not Path(value).exists():
        pytest.skip("FATQ_PRETRAINED_DIR is not set (point it at ../shared/pretrained)")
    return Path(value)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep decoded-data caches of synthetic datasets out of the user's cache, per session."""
    if "FATQ_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("FATQ_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fatq-cache"))


def make_image_folder(
    root: Path, classes: int = 3, per_class: int = 4, size: int = 32, splits=("train", "test"), seed: int = 0
) -> Path:
    """Write a tiny ImageFolder dataset of random PNGs; returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture
def tiny_image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "tiny")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and far faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
