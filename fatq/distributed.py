"""Device choice and torchrun / DistributedDataParallel helpers.

``torchrun --nproc_per_node K`` sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`setup` then joins
the process group (NCCL on CUDA, gloo on CPU). A single process (no WORLD_SIZE, or 1) runs
without a process group and every helper here degrades to the identity, so the training loop
has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fatq.errors import FatqError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistContext:
    """Where this process runs and which part of the data it owns.

    Attributes:
        rank: global rank, 0..world_size-1.
        world_size: number of processes (1 without torchrun).
        local_rank: rank on this machine (picks the CUDA device).
        device: the device this process computes on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """ "auto" -> CUDA when available, else CPU; "cuda" without a GPU is a user error."""
    if choice not in DEVICE_CHOICES:
        raise FatqError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {choice!r}.")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise FatqError("--device cuda was requested but PyTorch sees no CUDA device.")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup(device_choice: str) -> DistContext:
    """Join the torchrun process group if there is one; returns this process's context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (no-op for a single process)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over all ranks (returns a new tensor; identity for one process)."""
    out = values.detach().clone()
    if ctx.distributed:
        # gloo reduces CPU tensors, NCCL device tensors
        out = out.to(ctx.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's ``obj`` on every rank (e.g. a job-dir name with a timestamp)."""
    if not ctx.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(obj, ctx: DistContext) -> list:
    """``obj`` of every rank, in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    """Wait for all ranks (no-op for one process)."""
    if ctx.distributed:
        dist.barrier()
