"""Datasets as decoded uint8 tensors: CIFAR-10 (torchvision format or an ImageFolder/JPEG tree)
and any ImageFolder dataset with train/ and val/ (or test/).

Small datasets are decoded once and cached as uint8 tensors ([N, C, H, W]) under the cache
directory (``FATQ_CACHE_DIR``, default ``~/.cache/fatq``), so later runs start in a second.
A ``.tar.gz`` of an ImageFolder tree (e.g. ``cifar10-jpeg.tar.gz``) is extracted into the cache
on first use. Normalization constants are not chosen here: they belong to the checkpoint.
Images are RGB (C = 3), except in a folder whose images are all grayscale (C = 1). Datasets too
big to decode into memory take the streaming path of :mod:`fatq.streaming` instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fatq.augment import batch_generator, random_crop_flip
from fatq.errors import FatqError
from fatq.io import cache_dir, progress

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}
EVAL_SPLIT_NAMES = ("test", "val")


@dataclass
class ImageSplit:
    """One split decoded to memory.

    Attributes:
        images: uint8 [N, C, H, W]: C = 1 when every image is grayscale, else 3 (grayscale and
            RGBA images among colour ones converted to RGB explicitly).
        labels: int64 [N], class index = position in ``class_names``.
        class_names: sorted class-folder names (ImageFolder convention).
    """

    images: Tensor
    labels: Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return int(self.labels.numel())


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _extract_archive(archive: Path) -> Path:
    """Extract a .tar.gz once into the cache; returns the extraction directory."""
    target = cache_dir() / "extracted" / f"{archive.name.split('.')[0]}-{_fingerprint(archive)}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # no partial extraction left in the cache
        if isinstance(exc, (tarfile.TarError, OSError, EOFError)):
            # tarfile's messages can span lines ("file could not be opened successfully:\n- method gz: ..."):
            # keep the first line's words, or the kind of error when that line only introduces a list
            first = str(exc).splitlines()[0].strip().rstrip(".:") if str(exc) else ""
            if isinstance(exc, tarfile.ReadError):
                first = "not a readable tar archive (corrupt, truncated, or another format)"
            raise FatqError(f"cannot extract {archive}: {first or type(exc).__name__}.") from None
        raise
    (tmp / ".complete").touch()
    if target.exists():  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return target


def _is_image_folder_root(path: Path) -> bool:
    return (path / "train").is_dir() and any((path / s).is_dir() for s in EVAL_SPLIT_NAMES)


def resolve_image_folder(data_dir: str | Path) -> Path:
    """Find an ImageFolder root (with train/ and test/ or val/) at or inside ``data_dir``.

    ``data_dir`` may be the root itself, a directory holding one such root or a ``.tar.gz`` of it,
    or the archive file itself.
    """
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise FatqError(f"data directory {path} does not exist.")
    if path.is_file():
        if not path.name.endswith((".tar.gz", ".tgz", ".tar")):
            raise FatqError(f"{path} is a file but not a .tar.gz archive of an image-folder dataset.")
        path = _extract_archive(path)
    if _is_image_folder_root(path):
        return path
    candidates = [p for p in sorted(path.iterdir()) if p.is_dir() and _is_image_folder_root(p)]
    if not candidates:
        archives = sorted(p for p in path.iterdir() if p.name.endswith((".tar.gz", ".tgz")))
        for archive in archives:
            extracted = _extract_archive(archive)
            candidates += [
                p for p in [extracted, *sorted(extracted.iterdir())] if p.is_dir() and _is_image_folder_root(p)
            ]
    if not candidates:
        raise FatqError(
            f"no image-folder dataset in {path}: expected train/ and test/ (or val/) class folders, "
            "or a .tar.gz of them."
        )
    return candidates[0]


def split_dir(root: Path, split: str) -> Path:
    """The directory of ``split`` under an ImageFolder root ("test" and "val" both find test/ or val/)."""
    names = (split,) if split == "train" else EVAL_SPLIT_NAMES
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise FatqError(f"{root} has no {'/'.join(names)} split.")


def list_image_files(directory: Path) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names) of one split: sorted class folders, sorted image files in each.

    The one listing both the in-memory and the streaming path use, so labels agree between them.
    """
    class_names = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if not class_names:
        raise FatqError(f"{directory} has no class folders.")
    files, labels = [], []
    for index, name in enumerate(class_names):
        found = sorted(p for p in (directory / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [index] * len(found)
    if not files:
        raise FatqError(f"{directory} contains no images.")
    return files, labels, class_names


GRAYSCALE_MODES = ("1", "L")


def _first_image_is_grayscale(directory: Path) -> bool:
    from PIL import Image

    files, _, _ = list_image_files(directory)
    try:
        with Image.open(files[0]) as img:
            return img.mode in GRAYSCALE_MODES
    except OSError as exc:
        raise FatqError(f"cannot decode image {files[0]}: {exc}.") from None


def _decode_image_folder(
    split_dir: Path, image_size: int | None, quiet: bool = False, mixed_sizes_to: int | None = None
) -> ImageSplit:
    from PIL import Image

    files, labels, class_names = list_image_files(split_dir)
    arrays, grayscale = [], True
    for path in progress(files, desc=f"decoding {split_dir.name}", quiet=quiet, unit="img"):
        try:
            with Image.open(path) as img:
                grayscale = grayscale and img.mode in GRAYSCALE_MODES
                img = img.convert("RGB")  # grayscale / palette / RGBA -> RGB, explicitly
                if image_size is not None and img.size != (image_size, image_size):
                    img = img.resize((image_size, image_size), Image.BILINEAR)
                arrays.append(np.asarray(img, dtype=np.uint8))
        except OSError as exc:
            raise FatqError(f"cannot decode image {path}: {exc}.") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 and image_size is None and mixed_sizes_to is not None:
        return _decode_image_folder(split_dir, mixed_sizes_to, quiet)
    if len(shapes) != 1:
        raise FatqError(f"images in {split_dir} have different sizes {sorted(shapes)[:3]}; pass an image size.")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if grayscale:  # an all-grayscale dataset stays one channel (the model is built for 1 channel)
        images = images[:, :1]
    return ImageSplit(images.contiguous(), torch.tensor(labels, dtype=torch.int64), class_names)


def _load_torchvision_cifar10(path: Path, split: str) -> ImageSplit:
    from torchvision.datasets import CIFAR10

    dataset = CIFAR10(str(path), train=split == "train", download=False)
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return ImageSplit(images, torch.tensor(dataset.targets, dtype=torch.int64), list(dataset.classes))


def download_cifar10(root: str | Path, quiet: bool = False) -> Path:
    """Download and extract CIFAR-10 (torchvision's python version) into ``root`` unless it is there.

    Uses torchvision's ``CIFAR10(download=True)``: the archive's md5 is checked against
    ``CIFAR10.tgz_md5`` before extraction, and every batch file's md5 against
    ``CIFAR10.train_list``/``test_list`` before it is unpickled (the md5s are what make loading
    those pickles safe). The archive comes from ``CIFAR10.url``. torchvision's own progress bar
    and messages show only on a terminal and without ``quiet``.

    Returns:
        ``root`` (holding ``cifar-10-batches-py``).
    """
    import contextlib
    import sys
    import urllib.error

    from torchvision.datasets import CIFAR10

    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise FatqError(f"--download needs a directory to download into; {root} is a file.")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FatqError(f"cannot create {root} for the download: {exc.strerror}.") from None
    archive = root / CIFAR10.filename
    had_archive = archive.exists()
    show = not quiet and sys.stderr.isatty()
    try:
        with contextlib.ExitStack() as stack:
            if not show:
                devnull = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(devnull))
                stack.enter_context(contextlib.redirect_stderr(devnull))
            CIFAR10(str(root), train=False, download=True)  # checks (and fetches) both splits' files
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise FatqError(f"cannot download CIFAR-10 from {CIFAR10.url}: {reason}.") from None
    except RuntimeError:  # torchvision's "File not found or corrupted." / "Dataset not found or corrupted."
        if not had_archive:
            archive.unlink(missing_ok=True)  # leave no corrupt archive behind for the next attempt to trust
        raise FatqError(
            f"the CIFAR-10 download from {CIFAR10.url} failed its md5 check (corrupt or different file)."
        ) from None
    return root


def load_split(
    data_dir: str | Path,
    split: str = "test",
    dataset: str = "cifar10",
    image_size: int | None = None,
    quiet: bool = False,
    mixed_sizes_to: int | None = None,
) -> ImageSplit:
    """Load one split as uint8 tensors, decoding once and caching the result.

    Args:
        data_dir: CIFAR-10 in torchvision's format (``cifar-10-batches-py`` inside), or an
            image-folder tree / archive (see :func:`resolve_image_folder`).
        split: "train" or "test" ("val" is accepted for image folders).
        dataset: "cifar10" or "imagefolder".
        image_size: resize every image to this square size (image folders only); None keeps the
            images' own size when they all share one.
        mixed_sizes_to: with ``image_size`` None, the square size images of different sizes are
            resized to (None: such a folder is an error).
        quiet: no progress bar while decoding (it shows only on a terminal anyway).
    """
    if split not in ("train", "test", "val"):
        raise FatqError(f"split must be train, test or val, got {split!r}.")
    path = Path(data_dir).expanduser()
    if dataset == "cifar10" and (path / "cifar-10-batches-py").is_dir():
        return _load_torchvision_cifar10(path, split)
    if dataset not in ("cifar10", "imagefolder"):
        raise FatqError(f"unknown dataset {dataset!r}; use cifar10 or imagefolder.")
    root = resolve_image_folder(path)
    directory = split_dir(root, split)
    # Caches written before grayscale folders stayed 1-channel hold RGB: a grayscale-looking folder
    # gets a new key (colour folders keep theirs, so existing caches stay valid).
    gray = "|gray" if _first_image_is_grayscale(directory) else ""
    mixed = f"|mixed->{mixed_sizes_to}" if image_size is None and mixed_sizes_to is not None else ""
    key = hashlib.sha1(f"{directory.resolve()}|{image_size}{gray}{mixed}".encode()).hexdigest()[:16]
    cached = cache_dir() / "decoded" / f"{directory.parent.name}-{directory.name}-{key}.pt"
    if cached.exists():
        data = torch.load(cached, weights_only=True)
        return ImageSplit(data["images"], data["labels"], data["class_names"])
    result = _decode_image_folder(directory, image_size, quiet, mixed_sizes_to)
    cached.parent.mkdir(parents=True, exist_ok=True)
    from fatq.checkpoint import atomic_save

    atomic_save({"images": result.images, "labels": result.labels, "class_names": result.class_names}, cached)
    return result


def normalize(images: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """uint8 [N, C, H, W] -> float32 [N, C, H, W], (x/255 - mean) / std per channel (C = len(mean))."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


def channel_statistics(images: Tensor, chunk: int = 4096) -> dict:
    """Per-channel mean and std on [0, 1] of uint8 images [N, C, H, W] (for unknown datasets).

    Accumulates in float64 over chunks, so memory stays at one chunk of floats.

    Returns:
        {"mean": [C floats], "std": [C floats]}.
    """
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].to(torch.float64) / 255.0
        total += block.sum(dim=(0, 2, 3))
        total_sq += block.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return {"mean": mean.tolist(), "std": std.tolist()}


def epoch_order(num_items: int, seed: int, epoch: int) -> Tensor:
    """The shuffle of one epoch: a pure function of (seed, epoch), int64 [num_items].

    Being a function of its arguments only (no hidden generator state) is what lets a resumed
    run skip exactly the batches it already trained on.
    """
    return torch.randperm(num_items, generator=batch_generator(seed, epoch, 0x5EED))


def shard_indices(indices: Tensor, rank: int, world_size: int, pad: bool = True) -> Tensor:
    """The part of ``indices`` one rank owns, as ``torch.utils.data.DistributedSampler`` splits it.

    With ``pad`` (training) the list is first extended by repeating its head to a multiple of
    ``world_size``, so every rank gets the same number of items (and of optimizer steps);
    without it (evaluation) every item is owned by exactly one rank and counts add up exactly.
    Rank r takes items r, r + world_size, r + 2 * world_size, ...
    """
    if pad and world_size > 1 and len(indices) % world_size:
        extra = world_size - len(indices) % world_size
        indices = torch.cat([indices, indices.repeat(extra // max(len(indices), 1) + 1)[:extra]])
    return indices[rank::world_size]


class TrainBatches:
    """One epoch of augmented, normalized training batches for one rank.

    Batch ``i`` is a pure function of (seed, epoch, i, rank): the epoch's shuffle comes from
    :func:`epoch_order` and each batch's crop/flip draws from its own generator. ``start``
    skips the first batches (mid-epoch resume). With ``workers`` > 0 a thread pool prepares that
    many batches ahead (useful on CPU; on CUDA the work is asynchronous GPU kernels anyway);
    the batches and their order do not depend on it.

    Args:
        images: uint8 [N, C, H, W] on the device the batches should be on.
        labels: int64 [N] on the same device.
        batch_size: images per batch on this rank (the last batch may be smaller).
        seed, epoch: define the shuffle and the augmentation draws.
        normalization: {"mean", "std"} applied after augmentation.
        padding: crop padding in pixels (0 disables the crop); ``flip`` the horizontal flip.
        rank, world_size: the shard this process trains on (:func:`shard_indices`).
        start: index of the first batch to produce.
        workers: batches prepared ahead by background threads (0: in the caller's thread).

    Yields:
        (images float32 [B, C, H, W], labels int64 [B]).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        seed: int,
        epoch: int,
        normalization: dict,
        padding: int = 4,
        flip: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        workers: int = 0,
    ):
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.seed, self.epoch = seed, epoch
        self.normalization = normalization
        self.padding, self.flip = padding, flip
        self.rank = rank
        self.order = shard_indices(epoch_order(len(labels), seed, epoch), rank, world_size)
        self.start = start
        self.workers = workers

    def __len__(self) -> int:
        """Batches of the whole epoch (including skipped ones)."""
        return -(-len(self.order) // self.batch_size)

    def batch(self, index: int) -> tuple[Tensor, Tensor]:
        """Batch ``index`` of the epoch: (float32 [B, C, H, W], int64 [B])."""
        chosen = self.order[index * self.batch_size : (index + 1) * self.batch_size].to(self.images.device)
        generator = batch_generator(self.seed, self.epoch, index, self.rank)
        images = random_crop_flip(self.images[chosen], self.padding, generator, flip=self.flip)
        return normalize(images, self.normalization["mean"], self.normalization["std"]), self.labels[chosen]

    def __iter__(self):
        indices = range(self.start, len(self))
        if self.workers <= 0:
            for index in indices:
                yield self.batch(index)
            return
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="fatq-batches")
        try:
            pending = [pool.submit(self.batch, i) for i in indices[: self.workers]]
            for position, _ in enumerate(indices):
                ahead = position + self.workers
                if ahead < len(indices):
                    pending.append(pool.submit(self.batch, indices[ahead]))
                yield pending[position].result()
                pending[position] = None  # release the batch once the caller has it
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def eval_batches(
    images: Tensor, labels: Tensor, batch_size: int, normalization: dict, rank: int = 0, world_size: int = 1
):
    """Normalized evaluation batches of this rank's shard (no padding: every image counted once).

    Yields:
        (images float32 [B, C, H, W], labels int64 [B]) on the device of ``images``.
    """
    order = shard_indices(torch.arange(len(labels)), rank, world_size, pad=False).to(images.device)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        yield normalize(images[chosen], normalization["mean"], normalization["std"]), labels[chosen]


def check_classes(model_classes: int, class_names: list[str] | None, data_names: list[str], source: str) -> None:
    """FatqError when a dataset's classes are not the ones a model was trained on (count, then names)."""
    if model_classes != len(data_names):
        raise FatqError(f"{source} has {model_classes} classes, the dataset has {len(data_names)}.")
    if class_names is not None and list(class_names) != list(data_names):
        raise FatqError(f"{source} was trained on classes {class_names[:3]}..., the dataset has {data_names[:3]}....")
