"""Datasets as decoded uint8 tensors: CIFAR-10 (torchvision format or an ImageFolder/JPEG tree)
and any ImageFolder dataset with train/ and val/ (or test/).

Small datasets are decoded once and cached as uint8 tensors ([N, 3, H, W]) under the cache
directory (``FATQ_CACHE_DIR``, default ``~/.cache/fatq``), so later runs start in a second.
A ``.tar.gz`` of an ImageFolder tree (e.g. ``cifar10-jpeg.tar.gz``) is extracted into the cache
on first use. Normalization constants are not chosen here: they belong to the checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fatq.errors import FatqError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}
EVAL_SPLIT_NAMES = ("test", "val")


@dataclass
class ImageSplit:
    """One split decoded to memory.

    Attributes:
        images: uint8 [N, 3, H, W] (grayscale converted to RGB explicitly).
        labels: int64 [N], class index = position in ``class_names``.
        class_names: sorted class-folder names (ImageFolder convention).
    """

    images: Tensor
    labels: Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return int(self.labels.numel())


def cache_dir() -> Path:
    """Where extracted archives and decoded tensors live (created on demand)."""
    root = Path(os.environ.get("FATQ_CACHE_DIR", Path.home() / ".cache" / "fatq"))
    root.mkdir(parents=True, exist_ok=True)
    return root


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
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FatqError(f"cannot extract {archive}: {exc}.") from None
    (tmp / ".complete").touch()
    if target.exists():  # another process won the race
        import shutil

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


def _split_dir(root: Path, split: str) -> Path:
    names = (split,) if split == "train" else EVAL_SPLIT_NAMES
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise FatqError(f"{root} has no {'/'.join(names)} split.")


def _decode_image_folder(split_dir: Path, image_size: int | None) -> ImageSplit:
    from PIL import Image

    class_names = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not class_names:
        raise FatqError(f"{split_dir} has no class folders.")
    files, labels = [], []
    for index, name in enumerate(class_names):
        found = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [index] * len(found)
    if not files:
        raise FatqError(f"{split_dir} contains no images.")
    arrays = []
    for path in files:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")  # grayscale / palette / RGBA -> RGB, explicitly
                if image_size is not None and img.size != (image_size, image_size):
                    img = img.resize((image_size, image_size), Image.BILINEAR)
                arrays.append(np.asarray(img, dtype=np.uint8))
        except OSError as exc:
            raise FatqError(f"cannot decode image {path}: {exc}.") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise FatqError(f"images in {split_dir} have different sizes {sorted(shapes)[:3]}; pass an image size.")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageSplit(images, torch.tensor(labels, dtype=torch.int64), class_names)


def _load_torchvision_cifar10(path: Path, split: str) -> ImageSplit:
    from torchvision.datasets import CIFAR10

    dataset = CIFAR10(str(path), train=split == "train", download=False)
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return ImageSplit(images, torch.tensor(dataset.targets, dtype=torch.int64), list(dataset.classes))


def load_split(
    data_dir: str | Path, split: str = "test", dataset: str = "cifar10", image_size: int | None = None
) -> ImageSplit:
    """Load one split as uint8 tensors, decoding once and caching the result.

    Args:
        data_dir: CIFAR-10 in torchvision's format (``cifar-10-batches-py`` inside), or an
            image-folder tree / archive (see :func:`resolve_image_folder`).
        split: "train" or "test" ("val" is accepted for image folders).
        dataset: "cifar10" or "imagefolder".
        image_size: resize every image to this square size (image folders only).
    """
    if split not in ("train", "test", "val"):
        raise FatqError(f"split must be train, test or val, got {split!r}.")
    path = Path(data_dir).expanduser()
    if dataset == "cifar10" and (path / "cifar-10-batches-py").is_dir():
        return _load_torchvision_cifar10(path, split)
    if dataset not in ("cifar10", "imagefolder"):
        raise FatqError(f"unknown dataset {dataset!r}; use cifar10 or imagefolder.")
    root = resolve_image_folder(path)
    split_dir = _split_dir(root, split)
    key = hashlib.sha1(f"{split_dir.resolve()}|{image_size}".encode()).hexdigest()[:16]
    cached = cache_dir() / "decoded" / f"{split_dir.parent.name}-{split_dir.name}-{key}.pt"
    if cached.exists():
        data = torch.load(cached, weights_only=True)
        return ImageSplit(data["images"], data["labels"], data["class_names"])
    result = _decode_image_folder(split_dir, image_size)
    cached.parent.mkdir(parents=True, exist_ok=True)
    from fatq.checkpoint import atomic_save

    atomic_save({"images": result.images, "labels": result.labels, "class_names": result.class_names}, cached)
    return result


def normalize(images: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """uint8 [N, 3, H, W] -> float32 [N, 3, H, W], (x/255 - mean) / std per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t
