"""Streaming ImageFolder path: files decoded per batch by DataLoader workers (datasets too big for memory).

The in-memory path (:mod:`fatq.data`) decodes a split once into one uint8 tensor; ImageNet
(1.28 M images, ~190 GB at 224²) cannot be held that way. Here a split is a list of files, and
PyTorch's own machinery does the rest: a map-style ``Dataset`` that reads and decodes one file
with ``torchvision.io`` and augments it with ``torchvision.transforms.v2``, a ``DataLoader`` with
worker processes and pinned memory, and ``DistributedSampler`` under torchrun.

Training transform: ``RandomResizedCrop(size)`` + ``RandomHorizontalFlip()``; evaluation:
``Resize(size * 256 / 224)`` + ``CenterCrop(size)`` (the ImageNet convention, 256 -> 224,
scaled to other sizes). Workers return uint8; normalization runs on the training device.

Determinism (exact mid-epoch resume, as the in-memory path): the sampler yields ``(epoch,
index)`` keys, the epoch's order is ``DistributedSampler``'s (a function of seed and epoch),
and the transform of a sample runs under a global RNG seeded from (seed, epoch, index) alone
(v2 transforms draw from torch's global CPU generator; :func:`seeded` forks it, so nothing
else sees the draws). Batches therefore do not depend on the number of workers, on which
worker served them, or on where a run was resumed.

GPU JPEG decoding (``decode="cuda"``, ``fatq-train --gpu-decode``): workers only read the file
bytes; the main process decodes each batch with ``torchvision.io.decode_jpeg(..., device="cuda")``
(nvJPEG) and runs the same seeded transforms on the GPU tensors. It ran on an H200 (100 steps,
same top-1 as worker decoding, 3.9x slower on 32x32 JPEGs: docs/data-pipeline.md); the tests run
the path with ``decode="cpu"`` (the same batched call in the main process, on the CPU). nvJPEG's
pixels may differ from libjpeg-turbo's by rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fatq.augment import mixed_seed
from fatq.data import list_image_files, normalize, resolve_image_folder, shard_indices, split_dir
from fatq.errors import FatqError

# Evaluation resizes the short side to size * 256/224 before the center crop (the ImageNet convention).
EVAL_RESIZE_RATIO = 256 / 224
# Images probed to tell a grayscale dataset from a colour one (evenly spaced over the split).
CHANNEL_PROBES = 32
DECODE_MODES = ("workers", "cpu", "cuda")  # workers decode; or the main process decodes batches on a device
JPEG_MAGIC = b"\xff\xd8"


@dataclass
class FileSplit:
    """One split as files (streaming path).

    Attributes:
        files: image paths, in ImageFolder order (sorted classes, sorted files), as strings.
        labels: int64 [N], class index = position in ``class_names``.
        class_names: sorted class-folder names.
        channels: 1 when every probed image is grayscale, else 3 (images are decoded to this).
    """

    files: list[str]
    labels: Tensor
    class_names: list[str]
    channels: int

    def __len__(self) -> int:
        return len(self.files)


def _read_mode(channels: int):
    from torchvision.io import ImageReadMode

    return ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB


def _probe_channels(files: list[str]) -> int:
    """1 if the probed files are all single-channel (grayscale), else 3."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    step = max(1, len(files) // CHANNEL_PROBES)
    for path in files[::step][:CHANNEL_PROBES]:
        try:
            if decode_image(read_file(path), mode=ImageReadMode.UNCHANGED).shape[0] not in (1, 2):  # gray(+alpha)
                return 3
        except RuntimeError as exc:
            raise FatqError(f"cannot decode image {path}: {str(exc).splitlines()[0]}.") from None
    return 1


def scan_split(data_dir: str | Path, split: str) -> FileSplit:
    """List one split of an ImageFolder tree (or ``.tar.gz``, see :func:`fatq.data.resolve_image_folder`)."""
    directory = split_dir(resolve_image_folder(data_dir), split)
    files, labels, class_names = list_image_files(directory)
    files = [str(f) for f in files]
    return FileSplit(files, torch.tensor(labels, dtype=torch.int64), class_names, _probe_channels(files))


def train_transform(size: int):
    """v2 transform of one uint8 [C, H, W] image: random resized crop to ``size``², random flip."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])


def eval_transform(size: int):
    """v2 transform: resize the short side to ``size * 256/224``, center crop ``size``²."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(round(size * EVAL_RESIZE_RATIO), antialias=True), v2.CenterCrop(size)])


def seeded(transform, image: Tensor, seed: int) -> Tensor:
    """``transform(image)`` with torch's global CPU generator seeded to ``seed`` and restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


class ImageFileDataset(torch.utils.data.Dataset):
    """Map-style dataset of one split, indexed by ``(epoch, index)`` keys.

    Args:
        split: the files.
        transform: v2 transform of a uint8 [C, H, W] image (see :func:`train_transform`).
        seed: run seed; a sample's transform draws are seeded by (seed, epoch, index).
        decode: False returns raw JPEG bytes instead (GPU decoding in the main process); other
            formats are decoded here anyway.

    Item: (uint8 [C, S, S] image, or the JPEG file's ``bytes`` when not decoding; int label;
    (epoch, index) key).
    """

    def __init__(self, split: FileSplit, transform, seed: int, decode: bool = True):
        self.files, self.labels = split.files, split.labels.tolist()
        self.channels = split.channels
        self.transform, self.seed, self.decode = transform, seed, decode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]):
        from torchvision.io import decode_image, read_file

        epoch, index = key
        path = self.files[index]
        data = read_file(path)
        if not self.decode and bytes(data[:2].tolist()) == JPEG_MAGIC:
            # as bytes: read_file's tensor storage cannot be passed between processes by file descriptor
            return data.numpy().tobytes(), self.labels[index], key
        try:
            image = decode_image(data, mode=_read_mode(self.channels))
        except RuntimeError as exc:
            raise FatqError(f"cannot decode image {path}: {str(exc).splitlines()[0]}.") from None
        return seeded(self.transform, image, mixed_seed(self.seed, epoch, index)), self.labels[index], key


class EpochKeys(torch.utils.data.Sampler):
    """This rank's ``(epoch, index)`` keys of one epoch, as ``DistributedSampler`` orders and shards them.

    Args:
        num_items: size of the split.
        seed, epoch: the epoch's shuffle (``DistributedSampler(seed=seed).set_epoch(epoch)``).
        rank, world_size: the shard (padded by repeating the head, so ranks step together).
        skip: leading items to leave out (mid-epoch resume: batches already trained on).
    """

    def __init__(self, num_items: int, seed: int, epoch: int, rank: int, world_size: int, skip: int = 0):
        sampler = torch.utils.data.DistributedSampler(
            range(num_items), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        sampler.set_epoch(epoch)
        self.indices = list(sampler)
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return len(self.indices) - self.skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in self.indices[self.skip :])


class EvalKeys(torch.utils.data.Sampler):
    """This rank's evaluation keys, unpadded (every image counted by exactly one rank)."""

    def __init__(self, num_items: int, rank: int, world_size: int):
        self.indices = shard_indices(torch.arange(num_items), rank, world_size, pad=False).tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((0, i) for i in self.indices)


def _collate(items: list) -> tuple[list, Tensor, list]:
    """(images or JPEG bytes as a list, labels int64 [B], keys): stacking waits for the decode."""
    images, labels, keys = zip(*items, strict=True)
    return list(images), torch.tensor(labels, dtype=torch.int64), list(keys)


def _stack_collate(items: list) -> tuple[Tensor, Tensor, list]:
    images, labels, keys = _collate(items)
    return torch.stack(images), labels, keys


class StreamBatches:
    """Normalized batches of one split from a ``DataLoader`` (training: one epoch of one rank).

    Args:
        split: the files.
        size: side of the square crops.
        batch_size: images per batch on this rank (the last one may be smaller).
        normalization: {"mean", "std"}, applied on ``device``.
        device: where the batches go (pinned memory and non-blocking copies on CUDA).
        train: training transform and the epoch's shuffle, or evaluation transform and order.
        seed, epoch, rank, world_size: the shuffle and the augmentation draws (see :class:`EpochKeys`).
        start: first batch to produce (mid-epoch resume); ``len()`` still counts the whole epoch.
        workers: DataLoader worker processes (0: decode in the calling process).
        decode: "workers" (the DataLoader workers decode), or a device the main process decodes JPEG
            batches on: "cuda" (nvJPEG, see the module) or "cpu" (that path without a GPU).

    Yields:
        (float32 [B, C, size, size] on ``device``, int64 [B] on ``device``).
    """

    def __init__(
        self,
        split: FileSplit,
        size: int,
        batch_size: int,
        normalization: dict,
        device: torch.device,
        train: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        workers: int = 0,
        decode: str = "workers",
    ):
        if decode not in DECODE_MODES:
            raise FatqError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}.")
        self.transform = train_transform(size) if train else eval_transform(size)
        self.batch_size, self.normalization, self.device = batch_size, normalization, device
        self.decode, self.seed, self.channels = decode, seed, split.channels
        if train:
            keys = EpochKeys(len(split), seed, epoch, rank, world_size, skip=start * batch_size)
            self.total = math.ceil(len(keys.indices) / batch_size)
        else:
            keys = EvalKeys(len(split), rank, world_size)
            self.total = math.ceil(len(keys) / batch_size)
        dataset = ImageFileDataset(split, self.transform, seed, decode=decode == "workers")
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=keys,
            num_workers=workers,
            collate_fn=_stack_collate if decode == "workers" else _collate,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )

    def __len__(self) -> int:
        return self.total

    def _decode_batch(self, images: list, keys: list) -> Tensor:
        """JPEG bytes -> transformed uint8 [B, C, S, S] on the decode device, same seeds as the workers use."""
        from torchvision.io import decode_jpeg

        device = torch.device(self.decode)
        jpeg = [i for i, item in enumerate(images) if isinstance(item, bytes)]
        encoded = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in jpeg]
        decoded = decode_jpeg(encoded, mode=_read_mode(self.channels), device=device)
        out = list(images)
        for i, image in zip(jpeg, decoded, strict=True):
            epoch, index = keys[i]
            out[i] = seeded(self.transform, image, mixed_seed(self.seed, epoch, index))
        return torch.stack([image.to(device) for image in out])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels, keys in self.loader:
            if self.decode != "workers":
                images = self._decode_batch(images, keys)
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            yield normalize(images, self.normalization["mean"], self.normalization["std"]), labels


def sample_statistics(split: FileSplit, size: int, samples: int = 1024) -> dict:
    """Per-channel mean/std on [0, 1] of up to ``samples`` evenly spaced images (evaluation transform).

    For datasets without known constants; a full pass over a streamed dataset would take an epoch.

    Returns:
        {"mean": [C floats], "std": [C floats]}.
    """
    from fatq.data import channel_statistics

    dataset = ImageFileDataset(split, eval_transform(size), seed=0)
    step = max(1, len(split) // samples)
    images = torch.stack([dataset[(0, i)][0] for i in range(0, len(split), step)][:samples])
    return channel_statistics(images)


def estimated_decoded_bytes(num_images: int, channels: int, size: int) -> int:
    """Bytes a split of ``num_images`` would take decoded to uint8 [N, C, size, size] (memory-path cost)."""
    return num_images * channels * size * size
