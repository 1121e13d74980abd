"""Batched training augmentation on uint8 image tensors, on the device the images live on.

Random crop with zero padding and horizontal flip (METHOD.md §4) for a whole batch in one
gather, so on CUDA the uint8 dataset stays on the GPU and the loader never becomes the
bottleneck. The random draws come from an explicit CPU generator: the same generator seed gives
the same batch on CPU and CUDA, and training can make every batch a pure function of
(seed, epoch, batch index), which is what exact mid-epoch resume needs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def mixed_seed(*keys: int) -> int:
    """A 64-bit seed from integer keys, e.g. (seed, epoch, sample index).

    ``numpy.random.SeedSequence`` mixes the keys, so nearby key tuples give unrelated streams.
    """
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def batch_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys, e.g. (seed, epoch, batch index, rank) (see :func:`mixed_seed`)."""
    return torch.Generator().manual_seed(mixed_seed(*keys))


def random_crop_flip(images: Tensor, padding: int, generator: torch.Generator, flip: bool = True) -> Tensor:
    """Random crop of the original size from the zero-padded image, then a random horizontal flip.

    Same distribution as torchvision's ``RandomCrop(size, padding=padding)`` followed by
    ``RandomHorizontalFlip()`` applied per image.

    Args:
        images: uint8 (or any dtype) [B, C, H, W], on CPU or CUDA.
        padding: pixels of zero padding on every side; crop offsets are uniform in [0, 2*padding].
        generator: CPU generator the offsets and flips are drawn from (3 draws per image).
        flip: flip each image horizontally with probability 1/2.

    Returns:
        Tensor of the dtype, shape and device of ``images``.
    """
    batch, channels, height, width = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    if not flip:
        flips.zero_()
    rows = offsets[0, :, None] + torch.arange(height)  # [B, H] rows of the padded image
    cols = offsets[1, :, None] + torch.arange(width)  # [B, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # reversing the crop's columns flips it
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    # one gather: out[b, c, i, j] = padded[b, c, rows[b, i], cols[b, j]]
    return padded[
        torch.arange(batch, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows.to(device)[:, None, :, None],
        cols.to(device)[:, None, None, :],
    ]
