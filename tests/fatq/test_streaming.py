"""Streaming ImageFolder path: listing, channels, pure per-sample augmentation, sharding, resume, decode paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from fatq.errors import FatqError
from fatq.streaming import (
    EpochKeys,
    EvalKeys,
    ImageFileDataset,
    StreamBatches,
    eval_transform,
    sample_statistics,
    scan_split,
    train_transform,
)

IDENTITY = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


def make_jpeg_folder(root, classes=2, per_class=5, sizes=((50, 40), (37, 61), (64, 48)), gray=False, seed=0):
    """ImageFolder of smooth random JPEGs of varying sizes (train/ and val/)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w, h = sizes[(c + i) % len(sizes)]
                small = rng.integers(0, 256, size=(4, 4) if gray else (4, 4, 3), dtype=np.uint8)
                image = Image.fromarray(small, mode="L" if gray else "RGB").resize((w, h), Image.BILINEAR)
                image.save(folder / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture
def jpegs(tmp_path):
    return make_jpeg_folder(tmp_path / "jpegs")


def test_scan_lists_files_in_imagefolder_order_and_finds_channels(jpegs, tmp_path):
    split = scan_split(jpegs, "train")
    assert split.class_names == ["c0", "c1"] and split.channels == 3
    assert [p.split("/")[-2:] for p in split.files[:2]] == [["c0", "000.jpg"], ["c0", "001.jpg"]]
    assert split.labels.tolist() == [0] * 5 + [1] * 5
    assert scan_split(jpegs, "test").files[0].split("/")[-3] == "val"  # test finds val/
    gray = scan_split(make_jpeg_folder(tmp_path / "gray", gray=True), "train")
    assert gray.channels == 1
    with pytest.raises(FatqError, match="no class folders"):
        (tmp_path / "bare" / "train").mkdir(parents=True)
        (tmp_path / "bare" / "val").mkdir()
        scan_split(tmp_path / "bare", "train")


def test_augmentation_is_a_pure_function_of_seed_epoch_and_index(jpegs):
    split = scan_split(jpegs, "train")
    dataset = ImageFileDataset(split, train_transform(24), seed=3)
    first = dataset[(1, 4)][0]
    torch.manual_seed(123)  # the global generator's state does not matter ...
    torch.rand(7)
    again = dataset[(1, 4)][0]
    state = torch.get_rng_state()
    assert torch.equal(first, again) and first.shape == (3, 24, 24) and first.dtype == torch.uint8
    assert torch.equal(torch.get_rng_state(), state)  # ... and is left untouched
    others = [dataset[(2, 4)][0], ImageFileDataset(split, train_transform(24), seed=4)[(1, 4)][0]]
    assert all(not torch.equal(first, other) for other in others)  # another epoch or seed draws anew


def test_eval_transform_resizes_by_256_over_224_then_center_crops(jpegs):
    split = scan_split(jpegs, "train")
    image, _, _ = ImageFileDataset(split, eval_transform(28), seed=0)[(0, 0)]  # a 50 x 40 (w x h) JPEG
    from torchvision.io import decode_image
    from torchvision.transforms.v2 import functional as TF

    decoded = decode_image(split.files[0])
    short = round(28 * 256 / 224)  # 32: the short side (height 40) becomes 32, the width 40
    reference = TF.center_crop(TF.resize(decoded, [short, round(50 * short / 40)], antialias=True), [28, 28])
    assert torch.equal(image, reference)


def test_epoch_keys_follow_distributed_sampler_and_skip_whole_batches():
    full = list(torch.utils.data.DistributedSampler(range(11), num_replicas=2, rank=1, shuffle=True, seed=7))
    sampler = torch.utils.data.DistributedSampler(range(11), num_replicas=2, rank=1, shuffle=True, seed=7)
    sampler.set_epoch(3)
    epoch3 = list(sampler)
    keys = list(EpochKeys(11, seed=7, epoch=3, rank=1, world_size=2))
    assert keys == [(3, i) for i in epoch3] and len(epoch3) == 6 and epoch3 != full  # padded to 12, reshuffled
    assert list(EpochKeys(11, 7, 3, 1, 2, skip=4)) == keys[4:]
    shards = [list(EvalKeys(11, r, 3)) for r in range(3)]
    assert sorted(i for shard in shards for _, i in shard) == list(range(11))  # unpadded: each image once


def test_batches_do_not_depend_on_workers_and_resume_at_a_batch(jpegs):
    split = scan_split(jpegs, "train")
    common = dict(size=16, batch_size=3, normalization=IDENTITY, device=torch.device("cpu"), seed=1, epoch=2)
    serial = list(StreamBatches(split, **common))
    parallel = list(StreamBatches(split, **common, workers=2))
    resumed = StreamBatches(split, **common, start=2)
    assert len(serial) == 4 and len(resumed) == 4  # 10 images / 3: the length counts the whole epoch
    for (a, la), (b, lb) in zip(serial, parallel, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    for (a, la), (b, lb) in zip(serial[2:], resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert serial[0][0].dtype == torch.float32 and serial[0][0].min() >= 0.0 and serial[0][0].max() <= 1.0


def test_main_process_jpeg_decode_matches_worker_decode(jpegs):
    """The --gpu-decode code path (batched decode_jpeg in the main process), run on the CPU."""
    split = scan_split(jpegs, "train")
    common = dict(size=16, batch_size=4, normalization=IDENTITY, device=torch.device("cpu"), seed=5, epoch=1)
    for train in (True, False):
        workers = list(StreamBatches(split, **common, train=train))
        main = list(StreamBatches(split, **common, train=train, decode="cpu", workers=1))
        for (a, la), (b, lb) in zip(workers, main, strict=True):
            assert torch.equal(a, b) and torch.equal(la, lb)
    with pytest.raises(FatqError, match="decode must be one of"):
        StreamBatches(split, **common, decode="gpu")


def test_sample_statistics_match_numpy_on_the_center_crops(tmp_path):
    root = make_image_folder(tmp_path / "f", classes=2, per_class=3, size=32, splits=("train", "val"))
    split = scan_split(root, "train")
    stats = sample_statistics(split, 28, samples=100)  # resize to 28 * 256/224 = 32 (a no-op), crop 28
    crops = np.stack([np.asarray(Image.open(f).convert("RGB"))[2:30, 2:30] for f in split.files]) / 255.0
    assert stats["mean"] == pytest.approx(crops.mean(axis=(0, 1, 2)).tolist(), abs=1e-9)
    assert stats["std"] == pytest.approx(crops.std(axis=(0, 1, 2)).tolist(), abs=1e-6)


def test_undecodable_file_is_one_sentence(jpegs):
    (jpegs / "train" / "c0" / "000.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    split = scan_split(jpegs, "val")
    split.files[0] = str(jpegs / "train" / "c0" / "000.jpg")
    with pytest.raises(FatqError, match="cannot decode image"):
        ImageFileDataset(split, eval_transform(16), seed=0)[(0, 0)]
