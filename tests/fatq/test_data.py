"""Data pipeline: archive extraction, decoding, caching, sharding, augmentation, batch streams."""

from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from fatq.augment import batch_generator, random_crop_flip
from fatq.data import (
    TrainBatches,
    channel_statistics,
    epoch_order,
    eval_batches,
    load_split,
    normalize,
    shard_indices,
)
from fatq.errors import FatqError


def _decoded_reference(folder, split):
    """Independent decoding with Pillow/numpy: uint8 [N, H, W, 3] in sorted class/file order."""
    classes = sorted(p.name for p in (folder / split).iterdir())
    arrays, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((folder / split / name).iterdir()):
            arrays.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(index)
    return np.stack(arrays), np.array(labels)


def test_archive_is_extracted_and_decoded(tmp_path):
    folder = make_image_folder(tmp_path / "src" / "tiny", classes=2, per_class=3, size=8)
    archive_dir = tmp_path / "archived"
    archive_dir.mkdir()
    with tarfile.open(archive_dir / "tiny.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="tiny")
    expected, labels = _decoded_reference(folder, "test")
    for source in (archive_dir, archive_dir / "tiny.tar.gz"):  # directory holding it, or the file itself
        split = load_split(source, "test", dataset="imagefolder")
        assert split.images.dtype == torch.uint8 and split.images.shape == (6, 3, 8, 8)
        assert np.array_equal(split.images.permute(0, 2, 3, 1).numpy(), expected)
        assert split.labels.tolist() == labels.tolist() and split.class_names == ["class0", "class1"]


def test_grayscale_and_rgba_become_rgb(tmp_path):
    root = make_image_folder(tmp_path / "mixed", classes=1, per_class=1, size=4)
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    Image.fromarray(gray, mode="L").save(root / "train" / "class0" / "gray.png")
    rgba = np.full((4, 4, 4), 200, dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(root / "train" / "class0" / "rgba.png")
    split = load_split(root, "train", dataset="imagefolder")
    assert split.images.shape == (3, 3, 4, 4)
    names = sorted(p.name for p in (root / "train" / "class0").iterdir())
    gray_image = split.images[names.index("gray.png")]
    for channel in range(3):
        assert np.array_equal(gray_image[channel].numpy(), gray)
    assert (split.images[names.index("rgba.png")] == 200).all()


def test_decoded_split_is_cached(tmp_path):
    root = make_image_folder(tmp_path / "cached", classes=2, per_class=2, size=4)
    first = load_split(root, "train", dataset="imagefolder")
    # the cache, not the files, answers the second call: removing an image does not change it
    next((root / "train" / "class0").iterdir()).unlink()
    second = load_split(root, "train", dataset="imagefolder")
    assert torch.equal(first.images, second.images) and len(second) == 4


def test_resize_to_image_size(tmp_path):
    root = make_image_folder(tmp_path / "big", classes=1, per_class=2, size=12)
    split = load_split(root, "test", dataset="imagefolder", image_size=6)
    assert split.images.shape == (2, 3, 6, 6)


def test_missing_and_malformed_data_dirs_are_user_errors(tmp_path):
    with pytest.raises(FatqError, match="does not exist"):
        load_split(tmp_path / "nope", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FatqError, match="no image-folder dataset"):
        load_split(tmp_path / "empty", "train")


def test_channel_statistics_match_numpy():
    images = torch.randint(0, 256, (10, 3, 5, 7), dtype=torch.uint8)
    stats = channel_statistics(images, chunk=3)
    as_float = images.numpy().astype(np.float64) / 255.0
    assert np.allclose(stats["mean"], as_float.mean(axis=(0, 2, 3)))
    assert np.allclose(stats["std"], as_float.std(axis=(0, 2, 3)))


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a = epoch_order(100, seed=1, epoch=3)
    assert torch.equal(a, epoch_order(100, seed=1, epoch=3))
    assert sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, epoch_order(100, seed=1, epoch=4))
    assert not torch.equal(a, epoch_order(100, seed=2, epoch=3))


@pytest.mark.parametrize("n, world", [(10, 2), (11, 3), (5, 4)])
def test_shard_indices_match_distributed_sampler(n, world):
    from torch.utils.data import DistributedSampler

    order = torch.arange(n)
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False)
        assert shard_indices(order, rank, world).tolist() == list(sampler)


def test_eval_batches_cover_each_image_once_across_ranks():
    images = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1).expand(7, 3, 2, 2).contiguous()
    labels = torch.arange(7)
    seen = []
    for rank in range(3):
        for batch, target in eval_batches(images, labels, 2, {"mean": [0, 0, 0], "std": [1, 1, 1]}, rank, 3):
            assert torch.allclose(batch[:, 0, 0, 0] * 255, target.float())
            seen += target.tolist()
    assert sorted(seen) == list(range(7))


def _crop_candidates(image: np.ndarray, padding: int) -> list[np.ndarray]:
    """All crops (and their mirrors) of the zero-padded [C, H, W] image, with numpy."""
    _, h, w = image.shape
    padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)))
    crops = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            crops += [crop, crop[:, :, ::-1]]
    return crops


def test_random_crop_flip_produces_padded_crops_and_flips():
    images = torch.randint(1, 256, (64, 3, 6, 5), dtype=torch.uint8)  # no zeros: padding is recognisable
    out = random_crop_flip(images, padding=2, generator=batch_generator(7))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    flipped = 0
    for source, result in zip(images.numpy(), out.numpy(), strict=True):
        matches = [i for i, c in enumerate(_crop_candidates(source, 2)) if np.array_equal(c, result)]
        assert matches, "output is not a crop of the padded image"
        flipped += matches[0] % 2
    assert 10 < flipped < 54  # about half flipped


def test_random_crop_flip_is_deterministic_per_generator_and_identity_without_randomness():
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    a = random_crop_flip(images, 4, batch_generator(1, 2, 3))
    assert torch.equal(a, random_crop_flip(images, 4, batch_generator(1, 2, 3)))
    assert not torch.equal(a, random_crop_flip(images, 4, batch_generator(1, 2, 4)))
    assert torch.equal(random_crop_flip(images, 0, batch_generator(0), flip=False), images)


def test_train_batches_resume_and_prefetch_do_not_change_batches():
    images = torch.randint(0, 256, (23, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(23)
    norm = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    full = list(TrainBatches(images, labels, 5, seed=3, epoch=1, normalization=norm, padding=2))
    assert len(full) == 5 and [len(t) for _, t in full] == [5, 5, 5, 5, 3]
    assert sorted(torch.cat([t for _, t in full]).tolist()) == list(range(23))
    resumed = list(TrainBatches(images, labels, 5, seed=3, epoch=1, normalization=norm, padding=2, start=2))
    prefetched = list(TrainBatches(images, labels, 5, seed=3, epoch=1, normalization=norm, padding=2, workers=2))
    for (xa, ya), (xb, yb) in zip(full[2:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for (xa, ya), (xb, yb) in zip(full, prefetched, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # without crop and flip a batch is exactly the normalized images its labels point at
    plain = TrainBatches(images, labels, 5, seed=3, epoch=1, normalization=norm, padding=0, flip=False)
    for x, y in plain:
        assert x.dtype == torch.float32
        assert torch.equal(x, normalize(images[y], norm["mean"], norm["std"]))


def test_train_batches_shard_across_ranks_without_overlap():
    images = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    labels = torch.arange(10)
    norm = {"mean": [0, 0, 0], "std": [1, 1, 1]}
    per_rank = [
        torch.cat([t for _, t in TrainBatches(images, labels, 2, 0, 0, norm, rank=r, world_size=2)]) for r in range(2)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 5
    assert sorted(torch.cat(per_rank).tolist()) == list(range(10))


def test_an_all_grayscale_folder_stays_one_channel_and_mixed_sizes_can_be_resized(tmp_path):
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c in range(2):
            folder = tmp_path / "gray" / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    split = load_split(tmp_path / "gray", "train", dataset="imagefolder")
    expected = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "gray" / "train").glob("*/*.png"))])
    assert split.images.shape == (4, 1, 6, 6) and np.array_equal(split.images[:, 0].numpy(), expected)

    mixed = make_image_folder(tmp_path / "mixed", classes=1, per_class=2, size=8)
    Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).save(mixed / "train" / "class0" / "odd.png")
    with pytest.raises(FatqError, match="different sizes"):
        load_split(mixed, "train", dataset="imagefolder")
    resized = load_split(mixed, "train", dataset="imagefolder", mixed_sizes_to=4)
    assert resized.images.shape == (3, 3, 4, 4)
    assert load_split(make_image_folder(tmp_path / "same", 1, 2, 8), "train", "imagefolder").images.shape[-1] == 8


def test_a_failed_extraction_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FATQ_CACHE_DIR", str(tmp_path / "cache"))
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(os.urandom(4096))
    with pytest.raises(FatqError, match=r"^cannot extract .*broken\.tar\.gz: [^\n]+\.$"):
        load_split(archive, "test", dataset="imagefolder")
    assert [p.name for p in (tmp_path / "cache" / "extracted").iterdir()] == []
