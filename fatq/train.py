"""The training loop behind ``fatq-train``: config, optimizer groups, lr schedule, epochs, checkpoints.

Recipe (METHOD.md §4): SGD with momentum 0.9 and weight decay 5e-4 on the network weights,
batch 256, lr 0.04 (0.1 for FP32), cross-entropy; three extra parameter groups with their own
lr and weight decay 1e-4: activation clipping thresholds alpha_a (``input_quantizer``,
``branch_quantizer``, ``shortcut_quantizer``; lr 0.1), weight thresholds alpha_w
(``weight_quantizer``; lr 0.02) and FAT masks (``weight_transform``; lr 0.02). The schedule
multiplies every group's lr by the same factor.

The schedule advances per optimizer step, not per epoch: milestones are given in (possibly
fractional) epochs and converted to steps, so a 1-epoch run decays at the same relative points
as the 400-epoch recipe (150/400 and 225/400 of the way), which a per-epoch schedule could not.

ImageNet-family models (ResNet-18/34, MobileNetV2) default to the ImageNet recipe instead
(:data:`IMAGENET_RECIPE`): lr 0.01, x0.1 at 30/60/90 of 120 epochs, weight decay 1e-4, label
smoothing 0.01, global batch 512 (alpha_a init 8.0 comes with the family, see
:meth:`TrainConfig.quant_spec`).

Learned clipping thresholds stay positive: after every optimizer step each alpha is raised to
at least :data:`fatq.quantizers.ALPHA_FLOOR` (see :func:`fatq.quantizers.clamp_alphas_`), and a
loss or parameter that is NaN/inf stops the run with a :class:`FatqError` before anything of
that step is saved.

Determinism and resume: the position of a run is its global step. The data of step s is a pure
function of (seed, s) (see :class:`fatq.data.TrainBatches` and
:class:`fatq.streaming.StreamBatches`), the lr of step s is a pure function
of s, and ``last.pt`` holds model, optimizer, AMP scaler and RNG states, so a run stopped at
step k and resumed reaches bit-identical parameters to one that never stopped (on the same
device and thread count).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fatq.checkpoint import load_state_strict, save_checkpoint
from fatq.data import ImageSplit, TrainBatches, eval_batches
from fatq.distributed import DistContext, all_reduce_sum, gather_objects
from fatq.errors import FatqError
from fatq.io import progress
from fatq.metrics import topk_correct
from fatq.models import create_model, model_info
from fatq.qconfig import QuantSpec
from fatq.quantizers import FLOAT_BITS, ActivationQuantizer, clamp_alphas_
from fatq.streaming import FileSplit, StreamBatches
from fatq.weight_groups import grouped_weights, weight_groups

TRAIN_CONFIG_VERSION = 1
REFERENCE_EPOCHS = 400
REFERENCE_MILESTONES = (150, 225)
ACTIVATION_QUANTIZER_NAMES = ("input_quantizer", "branch_quantizer", "shortcut_quantizer")
SCHEDULES = ("step", "cosine")
LOADERS = ("memory", "stream")
# METHOD.md §4, ImageNet: the defaults of ImageNet-family models (milestones scaled to --epochs).
IMAGENET_RECIPE = {
    "epochs": 120,
    "milestones_of_epochs": (30, 60, 90),
    "lr": 0.01,
    "weight_decay": 1e-4,
    "label_smoothing": 0.01,
    "batch_size": 512,
}


def default_lr(weight_bits: int) -> float:
    """Reference base lr: 0.1 for the FP32 model, 0.04 for quantized ones."""
    return 0.1 if weight_bits == FLOAT_BITS else 0.04


def default_milestones(epochs: float) -> tuple[float, ...]:
    """The reference milestones 150 and 225 of 400 epochs, scaled to ``epochs`` (in epochs)."""
    return tuple(epochs * m / REFERENCE_EPOCHS for m in REFERENCE_MILESTONES)


def recipe_defaults(arch: str, weight_bits: int, epochs: int | None = None) -> dict:
    """Defaults of the recipe for ``arch`` (TrainConfig field names): CIFAR's, or ImageNet's for its family.

    ``epochs`` (when the user gave it) scales the milestones; otherwise the recipe's epochs are used.
    """
    if model_info(arch).family != "imagenet":
        epochs = REFERENCE_EPOCHS if epochs is None else epochs
        return {"epochs": epochs, "lr": default_lr(weight_bits), "milestones": default_milestones(epochs)}
    recipe = IMAGENET_RECIPE
    epochs = recipe["epochs"] if epochs is None else epochs
    milestones = tuple(epochs * m / recipe["epochs"] for m in recipe["milestones_of_epochs"])
    keep = ("lr", "weight_decay", "label_smoothing", "batch_size")
    return {"epochs": epochs, "milestones": milestones, **{k: recipe[k] for k in keep}}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run's result (saved in checkpoints and config.json).

    Run-time choices that do not change the result (device, workers, max steps, output paths)
    are not part of it. ``milestones`` are in epochs and may be fractional. ``loader`` ("memory"
    or "stream", resolved from ``--loader auto`` when the run starts) is part of it: the two paths
    augment differently (pad-crop vs RandomResizedCrop).
    """

    arch: str
    data_dir: str
    weight_bits: int = 4
    act_bits: int = 4
    edge_inputs: str = "int8"
    transform: bool = True
    target: str = "portable"
    full_range_8bit: bool = False
    mask_init: str = "paper"
    shortcut: str | None = None
    dataset: str = "cifar10"
    image_size: int | None = None
    pretrained: str | None = None
    epochs: int = REFERENCE_EPOCHS
    batch_size: int = 256
    lr: float = 0.04
    lr_schedule: str = "step"
    milestones: tuple[float, ...] = field(default_factory=lambda: default_milestones(REFERENCE_EPOCHS))
    gamma: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    act_alpha_lr: float = 0.1
    weight_alpha_lr: float = 0.02
    transform_lr: float = 0.02
    quantizer_weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    crop_padding: int = 4
    seed: int = 0
    amp: bool = False
    warm_start: bool = True  # re-estimate BN stats and α_a when initialising from --pretrained (fatq/warm_start.py)
    loader: str = "memory"

    def __post_init__(self):
        if self.lr_schedule not in SCHEDULES:
            raise FatqError(f"lr schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}.")
        if self.loader not in LOADERS:
            raise FatqError(f"loader must be one of {', '.join(LOADERS)}, got {self.loader!r}.")
        finite = math.isfinite
        checks = {
            "epochs": self.epochs >= 1,
            "batch size": self.batch_size >= 1,
            "lr": finite(self.lr) and self.lr > 0,
            "weight decay": finite(self.weight_decay) and self.weight_decay >= 0,
            "momentum": 0 <= self.momentum < 1,
            "label smoothing": 0 <= self.label_smoothing < 1,
            "milestones": all(finite(m) and m > 0 for m in self.milestones),
            "act alpha lr": finite(self.act_alpha_lr) and self.act_alpha_lr > 0,
            "weight alpha lr": finite(self.weight_alpha_lr) and self.weight_alpha_lr > 0,
            "transform lr": finite(self.transform_lr) and self.transform_lr > 0,
            "gamma": finite(self.gamma) and self.gamma > 0,
            "seed": 0 <= self.seed < 2**63,
        }
        for name, ok in checks.items():
            if not ok:
                raise FatqError(f"invalid {name}: {getattr(self, name.replace(' ', '_'))!r}.")

    def quant_spec(self) -> QuantSpec:
        """The model's QuantSpec (alpha_a init 8.0 for ImageNet-family models, else 5.0)."""
        alpha = 8.0 if model_info(self.arch).family == "imagenet" else 5.0
        return QuantSpec(
            weight_bits=self.weight_bits,
            act_bits=self.act_bits,
            edge_inputs=self.edge_inputs,
            transform=self.transform,
            target=self.target,
            full_range_8bit=self.full_range_8bit,
            mask_init=self.mask_init,
            act_alpha_init=alpha,
        )

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["milestones"] = list(self.milestones)
        return {"version": TRAIN_CONFIG_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if "milestones" in values:
            values["milestones"] = tuple(values["milestones"])
        return cls(**values)


def build_model(cfg: TrainConfig, num_classes: int, in_channels: int | None = None) -> nn.Module:
    """The model ``cfg`` describes for ``in_channels``-channel images, with fresh (seeded by the caller) parameters."""
    options = {"shortcut": cfg.shortcut} if cfg.shortcut is not None else {}
    return create_model(cfg.arch, spec=cfg.quant_spec(), num_classes=num_classes, in_channels=in_channels, **options)


def _group_name(param_name: str) -> str:
    parts = param_name.split(".")
    if parts[-1] == "alpha" and len(parts) > 1 and parts[-2] in ACTIVATION_QUANTIZER_NAMES:
        return "act_alpha"
    if parts[-1] == "alpha" and len(parts) > 1 and parts[-2] == "weight_quantizer":
        return "weight_alpha"
    if "weight_transform" in parts:
        return "transform"
    return "weights"


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """SGD parameter groups by uniform child names; empty groups are left out.

    Each group carries ``name`` and ``base_lr`` (the lr before the schedule's factor).
    """
    settings = {
        "weights": (cfg.lr, cfg.weight_decay),
        "act_alpha": (cfg.act_alpha_lr, cfg.quantizer_weight_decay),
        "weight_alpha": (cfg.weight_alpha_lr, cfg.quantizer_weight_decay),
        "transform": (cfg.transform_lr, cfg.quantizer_weight_decay),
    }
    members: dict[str, list] = {name: [] for name in settings}
    for name, param in model.named_parameters():
        if param.requires_grad:
            members[_group_name(name)].append(param)
    return [
        {"params": params, "name": name, "base_lr": settings[name][0], "lr": settings[name][0],
         "weight_decay": settings[name][1]}
        for name, params in members.items()
        if params
    ]  # fmt: skip


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum over :func:`parameter_groups`."""
    return torch.optim.SGD(parameter_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum)


class LRSchedule:
    """Per-step lr factor: step decay (x gamma at each milestone) or cosine to 0.

    Args:
        kind: "step" or "cosine".
        total_steps: steps of the whole run (epochs x steps per epoch).
        milestone_steps: steps at which the step schedule multiplies by ``gamma``.
        gamma: decay factor.
    """

    def __init__(self, kind: str, total_steps: int, milestone_steps: list[int], gamma: float = 0.1):
        self.kind, self.total_steps = kind, total_steps
        self.milestone_steps, self.gamma = sorted(milestone_steps), gamma

    @classmethod
    def from_config(cls, cfg: TrainConfig, steps_per_epoch: int) -> LRSchedule:
        milestones = [round(m * steps_per_epoch) for m in cfg.milestones]
        return cls(cfg.lr_schedule, cfg.epochs * steps_per_epoch, milestones, cfg.gamma)

    def factor(self, step: int) -> float:
        """Multiplier of every group's base lr for (0-based) optimizer step ``step``."""
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))
        return self.gamma ** sum(step >= m for m in self.milestone_steps)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr for ``step``; returns the factor."""
        factor = self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return factor

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "total_steps": self.total_steps,
            "milestone_steps": list(self.milestone_steps),
            "gamma": self.gamma,
        }

    def check_matches(self, state: dict) -> None:
        """The schedule is a pure function of the config; a resumed run must reproduce it."""
        if state != self.state_dict():
            raise FatqError(
                f"the lr schedule of the run being resumed {state} differs from this one {self.state_dict()} "
                "(different epochs or number of processes); resume with the original settings."
            )


def _diverged(what: str, step: int) -> FatqError:
    return FatqError(
        f"training diverged at step {step}: {what}; nothing of that step was saved (lower --lr or the alpha lrs)."
    )


def check_finite(model: nn.Module, step: int) -> None:
    """Raise :class:`FatqError` naming the first parameter that is NaN or infinite."""
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise _diverged(f"parameter {name} is not finite", step)


def rng_state() -> dict:
    """Global RNG states as tensors (``weights_only``-loadable)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def parameter_digest(model: nn.Module) -> str:
    """sha256 of every parameter's bytes in name order (identical across DDP ranks when in sync)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def autocast_context(device: torch.device, enabled: bool):
    """fp16 autocast on CUDA, bf16 on CPU (the only half type CPU kernels cover well)."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    normalization: dict,
    batch_size: int,
    ctx: DistContext | None = None,
    amp: bool = False,
    quiet: bool = True,
) -> dict:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of ``model`` on a split held in memory.

    Args:
        model: the (unwrapped) model; put in eval mode here.
        images: uint8 [N, C, H, W] on the model's device; labels: int64 [N].
        normalization: {"mean", "std"} the model expects.
        batch_size: images per forward pass.
        ctx: under DDP each rank evaluates its shard and the counts are summed.
        amp: evaluate under autocast.
        quiet: no progress bar (shown on rank 0 only, and only on a terminal).

    Returns:
        {"top1", "top5", "loss", "images"} over the whole split.
    """
    ctx = ctx or DistContext(0, 1, 0, images.device)
    batches = eval_batches(images, labels, batch_size, normalization, ctx.rank, ctx.world_size)
    total = -(-len(range(ctx.rank, len(labels), ctx.world_size)) // batch_size)
    return evaluate_batches(model, batches, total, images.device, ctx, amp, quiet)


@torch.no_grad()
def evaluate_batches(
    model: nn.Module, batches, total: int, device: torch.device, ctx: DistContext, amp: bool, quiet: bool
) -> dict:
    """:func:`evaluate` over any iterable of (float32 [B, C, H, W], int64 [B]) batches of this rank's shard."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    for batch, target in progress(batches, total=total, desc="eval", quiet=quiet or not ctx.is_main, unit="batch"):
        with autocast_context(device, amp):
            logits = model(batch).float()
        totals[0] += F.cross_entropy(logits, target, reduction="sum").double()
        totals[1] += topk_correct(logits, target, 1)
        totals[2] += topk_correct(logits, target, 5)
        totals[3] += target.numel()
    loss_sum, top1, top5, count = all_reduce_sum(totals, ctx).tolist()
    if count == 0:
        raise FatqError("the evaluation split is empty.")
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "loss": loss_sum / count, "images": int(count)}


@dataclass
class TrainData:
    """Both splits, and what the model expects of them.

    Attributes:
        train, test: uint8 splits in memory (images already on the device), or file lists for
            the streaming path (:class:`fatq.streaming.FileSplit`, decoded per batch).
        normalization: {"mean", "std"} for the model's input.
        class_names: the train split's class names (checkpoint metadata).
        input_size: (C, H, W) of the training inputs (what the checkpoint records).
    """

    train: ImageSplit | FileSplit
    test: ImageSplit | FileSplit
    normalization: dict
    class_names: list[str]
    input_size: tuple[int, int, int]

    @property
    def streaming(self) -> bool:
        return isinstance(self.train, FileSplit)


@dataclass
class RunOptions:
    """Run-time choices that do not change the result.

    Attributes:
        job_dir: where last.pt/best.pt/metrics.jsonl go (only rank 0 writes).
        max_steps: stop after this global step (None: run all epochs).
        save_every: also save last.pt every this many steps (0: at epoch ends and at the stop).
        workers: batch-preparation threads (in memory, see :class:`fatq.data.TrainBatches`), or
            DataLoader worker processes (streaming, see :class:`fatq.streaming.StreamBatches`).
        quiet: no progress bars or per-epoch lines.
        log: called with one metrics dict per evaluation, on rank 0 (metrics.jsonl, epoch lines).
        provenance: how the run was started (command, versions); stored in every checkpoint.
        decode: streaming only: "workers", or "cuda" to decode JPEGs on the GPU (nvJPEG).
    """

    job_dir: Path
    max_steps: int | None = None
    save_every: int = 0
    workers: int = 0
    quiet: bool = False
    log: Callable[[dict], None] | None = None
    provenance: dict = field(default_factory=dict)
    decode: str = "workers"


class Trainer:
    """Trains one model according to a :class:`TrainConfig`; single process or one DDP rank.

    Args:
        cfg: the run's config.
        model: the model, on ``ctx.device`` (initialised by the caller: fresh, pretrained or resumed).
        data: splits, normalization and class names.
        ctx: process/device context.
        options: run-time options.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, data: TrainData, ctx: DistContext, options: RunOptions):
        self.cfg, self.model, self.data, self.ctx, self.options = cfg, model, data, ctx, options
        if cfg.batch_size % ctx.world_size:
            raise FatqError(
                f"batch size {cfg.batch_size} is the global batch and must divide by the {ctx.world_size} processes."
            )
        self.rank_batch = cfg.batch_size // ctx.world_size
        self.steps_per_epoch = len(self._batches(0, 0))
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(model, cfg)
        self.schedule = LRSchedule.from_config(cfg, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and ctx.device.type == "cuda")
        self.step = 0
        self.best_top1 = -1.0
        self.last_eval: dict | None = None
        self.network = self._wrap_ddp(model)
        self.weight_groups = weight_groups(model)  # the layers whose weight paths each step batches

    def _wrap_ddp(self, model: nn.Module) -> nn.Module:
        if not self.ctx.distributed:
            return model
        # quantizers left float (--edge-inputs float) own an alpha that receives no gradient
        unused = any(isinstance(m, ActivationQuantizer) and not m.enabled for m in model.modules())
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=unused)

    def _batches(self, epoch: int, start: int) -> TrainBatches | StreamBatches:
        if self.data.streaming:
            return StreamBatches(
                self.data.train,
                self.data.input_size[-1],
                self.rank_batch,
                self.data.normalization,
                self.ctx.device,
                train=True,
                seed=self.cfg.seed,
                epoch=epoch,
                rank=self.ctx.rank,
                world_size=self.ctx.world_size,
                start=start,
                workers=self.options.workers,
                decode=self.options.decode,
            )
        return TrainBatches(
            self.data.train.images,
            self.data.train.labels,
            self.rank_batch,
            seed=self.cfg.seed,
            epoch=epoch,
            normalization=self.data.normalization,
            padding=self.cfg.crop_padding,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            start=start,
            workers=self.options.workers,
        )

    def resume_from(self, checkpoint: dict) -> None:
        """Restore model, optimizer, scaler, RNG and position from a ``last.pt`` dict."""
        load_state_strict(self.model, checkpoint["state_dict"], source="last.pt")
        self.schedule.check_matches(checkpoint["scheduler"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("amp_scaler"):
            self.scaler.load_state_dict(checkpoint["amp_scaler"])
        set_rng_state(checkpoint["rng"])
        self.step = int(checkpoint["step"])
        metrics = checkpoint.get("metrics") or {}
        self.best_top1 = float(metrics.get("best_top1", -1.0))
        self.last_eval = metrics.get("last_eval")

    def _checkpoint_fields(self, full: bool) -> dict:
        fields = {
            "epoch": self.step // self.steps_per_epoch,
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "metrics": {"last_eval": self.last_eval, "best_top1": self.best_top1},
            "train_config": self.cfg.to_dict(),
            "world_size": self.ctx.world_size,
            "provenance": self.options.provenance,
        }
        if full:
            fields.update(
                optimizer=self.optimizer.state_dict(),
                scheduler=self.schedule.state_dict(),
                rng=rng_state(),
                amp_scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            )
        return fields

    def save(self, name: str, full: bool = True) -> None:
        """Write ``job_dir/name`` atomically (rank 0 only)."""
        if self.ctx.is_main:
            check_finite(self.model, self.step)  # never write a diverged model
            save_checkpoint(
                self.options.job_dir / name,
                self.model,
                self.data.normalization,
                self.data.class_names,
                input_size=self.data.input_size,
                **self._checkpoint_fields(full),
            )

    def evaluate(self) -> dict:
        if self.data.streaming:
            batches = StreamBatches(
                self.data.test,
                self.data.input_size[-1],
                self.rank_batch,
                self.data.normalization,
                self.ctx.device,
                train=False,
                rank=self.ctx.rank,
                world_size=self.ctx.world_size,
                workers=self.options.workers,
                decode=self.options.decode,
            )
            return evaluate_batches(
                self.model, batches, len(batches), self.ctx.device, self.ctx, False, self.options.quiet
            )
        return evaluate(
            self.model,
            self.data.test.images,
            self.data.test.labels,
            self.data.normalization,
            self.rank_batch,
            self.ctx,
            amp=False,  # report the accuracy of the float32 model that export folds, even after --amp training
            quiet=self.options.quiet,
        )

    def _train_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        with autocast_context(self.ctx.device, self.cfg.amp), grouped_weights(self.model, self.weight_groups):
            logits = self.network(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        clamp_alphas_(self.model)
        return loss.detach() * labels.numel(), topk_correct(logits.detach(), labels, 1)

    def _check_loss(self, loss_sum: Tensor, count: int) -> None:
        """Stop on a NaN/inf loss of any rank (one sync per step: cheap next to a training step)."""
        bad = all_reduce_sum((~torch.isfinite(loss_sum)).double().reshape(1), self.ctx)
        if bad.item():
            value = loss_sum.item() / count
            raise _diverged(f"the training loss is {value if math.isfinite(value) else 'not finite'}", self.step + 1)

    def fit(self) -> dict:
        """Train until the last epoch or ``max_steps``; returns the final evaluation record."""
        limit = self.total_steps if self.options.max_steps is None else min(self.total_steps, self.options.max_steps)
        while self.step < limit:
            epoch, first = divmod(self.step, self.steps_per_epoch)
            self._run_epoch(epoch, first, limit)
        if self.last_eval is None or self.last_eval["step"] != self.step:
            self._evaluate_and_save(train_stats=None)
        return self.last_eval

    def _run_epoch(self, epoch: int, first: int, limit: int) -> None:
        batches = self._batches(epoch, first)
        totals = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)  # loss sum, top1, count
        bar = progress(
            total=len(batches),
            initial=first,
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            quiet=self.options.quiet or not self.ctx.is_main,
            unit="step",
        )
        self.network.train()
        started = time.perf_counter()
        with bar:
            for images, labels in batches:
                factor = self.schedule.apply(self.optimizer, self.step)
                loss_sum, correct = self._train_step(images, labels)
                self._check_loss(loss_sum, labels.numel())
                totals[0] += loss_sum
                totals[1] += correct
                totals[2] += labels.numel()
                self.step += 1
                bar.update(1)
                if not bar.disable and self.step % 10 == 0:
                    bar.set_postfix(loss=f"{loss_sum.item() / labels.numel():.3f}", lr=f"{self.cfg.lr * factor:.2g}")
                at_epoch_end = self.step % self.steps_per_epoch == 0
                if self.options.save_every and self.step % self.options.save_every == 0 and not at_epoch_end:
                    self.save("last.pt")
                if self.step >= limit:
                    break
        seconds = time.perf_counter() - started
        loss_sum, correct, count = all_reduce_sum(totals, self.ctx).tolist()
        stats = {
            "train_loss": loss_sum / max(count, 1),
            "train_top1": 100.0 * correct / max(count, 1),
            "train_images": int(count),
            "train_seconds": seconds,
            "train_images_per_s": count / seconds if seconds > 0 else None,
            "lr": self.cfg.lr * self.schedule.factor(self.step - 1),
        }
        if self.step % self.steps_per_epoch == 0 or self.step >= limit:
            self._evaluate_and_save(stats)

    def _evaluate_and_save(self, train_stats: dict | None) -> None:
        result = self.evaluate()
        record = {
            "epoch": self.step / self.steps_per_epoch,
            "step": self.step,
            **result,
            **(train_stats or {}),
        }
        self.last_eval = record
        improved = result["top1"] > self.best_top1
        self.best_top1 = max(self.best_top1, result["top1"])
        if self.options.log is not None and self.ctx.is_main:
            self.options.log(record)
        self.save("last.pt")
        if improved:
            self.save("best.pt", full=False)

    def rank_digests(self) -> list[str]:
        """:func:`parameter_digest` of every rank (all equal when DDP kept the replicas in sync)."""
        return gather_objects(parameter_digest(self.model), self.ctx)
