"""``fatq-train``: FAT quantization-aware training and evaluation of a registered model.

Examples:
    fatq-train --arch resnet20 --bits 4 --dataset cifar10 --data-dir DATA \\
        --pretrained resnet20-cifar10-fp32.th --epochs 1 --device cpu
    fatq-train --job-dir runs/x --resume --data-dir DATA          # continue from runs/x/last.pt
    fatq-train --eval-only resnet20-cifar10-fp32.th --arch resnet20 --data-dir DATA
    fatq-train --arch resnet18 --bits 4 --dataset imagefolder --data-dir IMAGENET   # ImageNet recipe, streamed
    fatq-train --arch resnet20 --dataset cifar10 --data-dir cifar --download        # fetch CIFAR-10 first

Data: CIFAR-10 and small image folders are decoded once into memory; an image folder whose
decoded training split would exceed 4 GiB is streamed from its files by DataLoader workers
(``--loader`` overrides the choice; the streaming path crops with RandomResizedCrop).

A job directory (default ``runs/<arch>-w<w>a<a>-<timestamp>``) receives ``last.pt`` (model,
optimizer, RNG: everything to resume), ``best.pt`` (best test top-1), ``metrics.jsonl`` (one
line per evaluation) and ``config.json`` (resolved config, command lines, versions). Under
``torchrun`` the processes share the work (DDP) and only rank 0 writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

from fatq import distributed
from fatq.checkpoint import (
    CIFAR_NORMALIZATION,
    IMAGENET_NORMALIZATION,
    init_from_pretrained,
    is_fatq_checkpoint,
    load_fatq_checkpoint,
    model_from_checkpoint,
    read_checkpoint_file,
)
from fatq.cli_common import SentenceParser, run_cli
from fatq.data import (
    ImageSplit,
    channel_statistics,
    check_classes,
    download_cifar10,
    list_image_files,
    load_split,
    resolve_image_folder,
    split_dir,
)
from fatq.errors import FatqError
from fatq.io import remove_stale_temp_files, write_json_atomic
from fatq.models import create_model, list_models, model_info
from fatq.output_check import check_distinct_outputs, check_output_dir, check_output_file
from fatq.provenance import __version__, git_commit
from fatq.qconfig import MASK_INITS, TARGETS, QuantSpec
from fatq.streaming import FileSplit, StreamBatches, estimated_decoded_bytes, sample_statistics, scan_split
from fatq.train import (
    RunOptions,
    TrainConfig,
    TrainData,
    Trainer,
    build_model,
    evaluate,
    evaluate_batches,
    recipe_defaults,
)

DEFAULT_BITS = 4
DATASETS = ("cifar10", "imagefolder")
# Flags a resumed run may change: where the data is. Everything else that shapes the result
# comes from the run being resumed, and a contradicting flag is an error rather than ignored.
RESUME_OVERRIDABLE = ("data_dir",)
# Above this many bytes of decoded training images, --loader auto streams the image folder from its files.
MEMORY_LOADER_LIMIT = 4 * 2**30


def build_parser() -> argparse.ArgumentParser:
    # Config flags default to SUPPRESS: absent flags are absent from the namespace, so a resumed
    # run can tell "not given" from "given with the default value".
    p = SentenceParser(
        prog="fatq-train",
        description="FAT quantization-aware training (and evaluation) of a CNN.",
        argument_default=argparse.SUPPRESS,
    )
    m = p.add_argument_group("model")
    m.add_argument("--arch", choices=list_models(), metavar="ARCH", help=f"architecture: {', '.join(list_models())}")
    m.add_argument("--bits", type=int, help=f"weight and activation bits, 2..8 or 32 for FP32 (default {DEFAULT_BITS})")
    m.add_argument("--weight-bits", type=int, help="body weight bits (overrides --bits)")
    m.add_argument("--act-bits", type=int, help="body activation bits (overrides --bits)")
    m.add_argument(
        "--edge-inputs",
        choices=("int8", "float"),
        help="inputs of the first conv and last linear: int8 (learned 8-bit, deployable; default) "
        "or float (the paper's setting; export calibrates them)",
    )
    m.add_argument("--shortcut", choices=("A", "B"), help="CIFAR ResNet shortcut: A (public checkpoints) or B (paper)")
    m.add_argument(
        "--no-transform", dest="transform", action="store_false", help="plain uniform quantizer (FAT ablation)"
    )
    m.add_argument(
        "--target",
        choices=TARGETS,
        help="quantizer placement: portable (default; both residual-Add inputs quantized, exact in every engine) "
        "trt (TensorRT's: only the shortcut input quantized, so Conv+BN+Add+ReLU fuse) or cpu (ONNX Runtime's "
        "and OpenVINO's: a block's input quantized once, shared by its first conv and its identity shortcut; "
        "every 8-bit quantizer uses all 256 int8 or uint8 values, so the model exports to onnx-ort and "
        "onnx-openvino, not to the TensorRT file)",
    )
    m.add_argument(
        "--mask-init",
        choices=MASK_INITS,
        help="FAT mask initialisation: paper (default; T = 1/C_out, sigmoid saturated at 1.0 in float32 for "
        "long rows) or unsaturated (T = 3/(C_out sqrt(N)): the mask starts near 0.93 with a gradient)",
    )
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, help="cifar10 (default) or any imagefolder with train/ and test|val/")
    d.add_argument("--data-dir", help="dataset directory or .tar.gz (required)")
    d.add_argument(
        "--image-size",
        type=int,
        help="imagefolder: train on this square size (default: the images' own size in memory, "
        "the architecture's size when streamed or when sizes differ)",
    )
    d.add_argument(
        "--loader",
        choices=("auto", "memory", "stream"),
        help="memory: decode once into one tensor; stream: DataLoader workers decode every batch "
        "(RandomResizedCrop + flip); auto (default): stream image folders over 4 GiB decoded",
    )
    d.add_argument(
        "--download",
        action="store_true",
        default=False,
        help="cifar10: download it into --data-dir with torchvision first (md5-checked)",
    )
    d.add_argument(
        "--gpu-decode",
        action="store_true",
        default=False,
        help="streaming on CUDA: decode JPEGs on the GPU with nvJPEG (slower than workers on CIFAR-size images)",
    )
    t = p.add_argument_group("training")
    t.add_argument("--pretrained", help="initialise from an FP32, higher-bit fatq, or public checkpoint")
    t.add_argument(
        "--paper-start",
        dest="warm_start",
        action="store_false",
        help="with --pretrained, skip the warm start (BN statistics and activation ranges re-estimated on "
        "4 training batches of 128) and start as the paper does (near chance for the first ~50 steps)",
    )
    t.add_argument("--epochs", type=int, help="epochs (default 400; 120 for ImageNet models)")
    t.add_argument(
        "--batch-size",
        type=int,
        help="global batch size, split across processes (default 256; 512 for ImageNet models)",
    )
    t.add_argument(
        "--lr", type=float, help="base lr of the weights (default 0.04, 0.1 for --bits 32; 0.01 for ImageNet models)"
    )
    t.add_argument("--lr-schedule", choices=("step", "cosine"), help="per-step lr schedule (default step)")
    t.add_argument(
        "--milestones",
        help="step-schedule epochs, comma-separated, may be fractional (default 150/400 and 225/400 of --epochs; "
        "30/120, 60/120, 90/120 for ImageNet models)",
    )
    t.add_argument("--weight-decay", type=float, help="weight decay of the weights (default 5e-4; 1e-4 ImageNet)")
    t.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    t.add_argument("--label-smoothing", type=float, help="cross-entropy label smoothing (default 0; 0.01 ImageNet)")
    t.add_argument("--seed", type=int, help="seed of the initialisation, data order and augmentation (default 0)")
    t.add_argument("--amp", action="store_true", help="mixed precision: fp16 + GradScaler on CUDA, bf16 on CPU")
    r = p.add_argument_group("run")
    r.add_argument("--max-steps", type=int, default=None, help="stop after this global optimizer step")
    r.add_argument("--job-dir", default=None, help="output directory (default runs/<arch>-w<w>a<a>-<timestamp>)")
    r.add_argument("--resume", action="store_true", default=False, help="continue the run in --job-dir from last.pt")
    r.add_argument("--save-every", type=int, default=0, help="also save last.pt every N steps (default: epoch ends)")
    r.add_argument("--eval-only", metavar="CKPT", default=None, help="evaluate a fatq, FP32 or public checkpoint")
    r.add_argument("--device", choices=distributed.DEVICE_CHOICES, default="auto", help="auto picks CUDA if present")
    r.add_argument(
        "--workers",
        type=int,
        default=None,
        help="in memory: batch-preparation threads (default 1 on CPU, 0 on CUDA); streaming: DataLoader "
        "processes per training process (default: the CPU cores per process, minus one)",
    )
    r.add_argument("--json", default=None, help="write the final metrics to this JSON file")
    r.add_argument("--quiet", action="store_true", default=False, help="no progress bars or per-epoch lines")
    return p


def _parse_milestones(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise FatqError(f"--milestones must be comma-separated epoch numbers, got {text!r}.") from None
    if not values:
        raise FatqError("--milestones is empty.")
    return values


def _given_config(args: argparse.Namespace) -> dict:
    """Config values given on the command line (TrainConfig field names; ``bits`` resolved)."""
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    if "milestones" in given:
        given["milestones"] = _parse_milestones(given["milestones"])
    bits = getattr(args, "bits", None)
    if bits is not None:
        given.setdefault("weight_bits", bits)
        given.setdefault("act_bits", bits)
    return given


def choose_loader(data_dir: str, dataset: str, arch: str, image_size: int | None) -> str:
    """--loader auto: "stream" for an image folder whose decoded training split would exceed
    :data:`MEMORY_LOADER_LIMIT` at the training size, else "memory" (always for CIFAR-10)."""
    path = Path(data_dir).expanduser()
    if dataset == "cifar10":
        return "memory"
    files, _, _ = list_image_files(split_dir(resolve_image_folder(path), "train"))
    side = image_size or model_info(arch).input_size[-1]
    return "stream" if estimated_decoded_bytes(len(files), 3, side) > MEMORY_LOADER_LIMIT else "memory"


def resolve_config(args: argparse.Namespace, saved: dict | None = None) -> TrainConfig:
    """The run's config: defaults < command line, or the resumed run's config (+ data dir)."""
    given = _given_config(args)
    if given.get("loader") == "auto":
        del given["loader"]  # a choice, not a value: a resumed run keeps the one it made
    if saved is not None:
        base = TrainConfig.from_dict(saved)
        for key, value in given.items():
            if key not in RESUME_OVERRIDABLE and getattr(base, key) != value:
                flag = "--" + key.replace("_", "-")
                raise FatqError(
                    f"{flag} {value} differs from the run being resumed ({getattr(base, key)}); "
                    "resume with the original settings or start a new job."
                )
        return TrainConfig.from_dict({**base.to_dict(), **{k: given[k] for k in RESUME_OVERRIDABLE if k in given}})
    for required in ("arch", "data_dir"):
        if required not in given:
            raise FatqError(f"--{required.replace('_', '-')} is required.")
    model_info(given["arch"])
    given.setdefault("weight_bits", DEFAULT_BITS)
    given.setdefault("act_bits", DEFAULT_BITS)
    # a new --target cpu run uses all 256 values of every 8-bit quantizer (QuantSpec.full_range_8bit); a resumed
    # run keeps what its config says (absent in configs written before the field: False)
    given.setdefault("full_range_8bit", given.get("target") == "cpu")
    for key, value in recipe_defaults(given["arch"], given["weight_bits"], given.get("epochs")).items():
        given.setdefault(key, value)
    if given.get("image_size") is not None and given["image_size"] < 1:
        raise FatqError(f"--image-size must be positive, got {given['image_size']}.")
    if "loader" not in given:
        given["loader"] = choose_loader(given["data_dir"], given.get("dataset", "cifar10"), given["arch"],
                                        given.get("image_size"))  # fmt: skip
    cfg = TrainConfig(**given)
    cfg.quant_spec()  # validates bits and edge mode now, before any data is read
    return cfg


def default_job_dir(cfg: TrainConfig, ctx: distributed.DistContext) -> Path:
    stamp = distributed.broadcast_object(datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), ctx)
    return Path("runs") / f"{cfg.arch}-w{cfg.weight_bits}a{cfg.act_bits}-{stamp}"


def _load_splits(
    data_dir: str,
    dataset: str,
    image_size: int | None,
    arch: str,
    splits: tuple[str, ...],
    quiet: bool,
    loader: str = "memory",
) -> dict:
    """The named splits, decoded into memory (or read from the cache) or listed for streaming.

    In memory, an image folder keeps its images' size unless ``image_size`` is given (images of
    different sizes are resized to the architecture's size); streamed, crops are ``image_size``
    or the architecture's size. All splits must have the same classes, channels and size.
    """
    registered = model_info(arch).input_size[-1]
    if loader == "stream":
        if dataset == "cifar10" and (Path(data_dir).expanduser() / "cifar-10-batches-py").is_dir():
            raise FatqError("--loader stream reads image files; CIFAR-10 in torchvision's format is decoded in memory.")
        loaded = {s: scan_split(data_dir, s) for s in splits}
        channels = loaded[splits[0]].channels
        for split in loaded.values():
            split.channels = channels  # the first split decides: every split is decoded to its channels
        size = image_size or registered
        shapes = {(channels, size, size)}
    else:
        if dataset == "cifar10":
            image_size, fallback = None, None  # CIFAR-10 is 32x32 already; None shares the decode cache
        else:
            fallback = registered
        loaded = {s: load_split(data_dir, s, dataset, image_size, quiet=quiet, mixed_sizes_to=fallback) for s in splits}
        shapes = {tuple(split.images.shape[1:]) for split in loaded.values()}
    if len({tuple(split.class_names) for split in loaded.values()}) != 1:
        raise FatqError(f"the splits of {data_dir} have different class folders.")
    if len(shapes) != 1:
        raise FatqError(f"the splits of {data_dir} have different image shapes {sorted(shapes)}; pass --image-size.")
    return loaded


def input_size_of(split: ImageSplit | FileSplit, image_size: int | None, arch: str) -> tuple[int, int, int]:
    """(C, H, W) the model sees: the decoded images' shape, or (channels, side, side) when streamed."""
    if isinstance(split, FileSplit):
        side = image_size or model_info(arch).input_size[-1]
        return (split.channels, side, side)
    return tuple(int(v) for v in split.images.shape[1:])


def default_normalization(dataset: str, arch: str, train: ImageSplit | FileSplit, side: int) -> dict:
    """CIFAR-10's constants, ImageNet's for ImageNet-family models on RGB data, else the data's own statistics."""
    channels = train.channels if isinstance(train, FileSplit) else train.images.shape[1]
    if dataset == "cifar10" and channels == 3:
        return CIFAR_NORMALIZATION
    if model_info(arch).family == "imagenet" and channels == 3:
        return IMAGENET_NORMALIZATION
    if isinstance(train, FileSplit):
        return sample_statistics(train, side)
    return channel_statistics(train.images)


def _stream_workers(requested: int | None) -> int:
    """DataLoader workers per training process: as asked, else the cores per local process minus one."""
    if requested is not None:
        return requested
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 2) // local - 1)


def provenance(args_argv: list[str], ctx: distributed.DistContext, **extra) -> dict:
    """How this invocation ran: command, versions, machine facts."""
    return {
        "command": ["fatq-train", *args_argv],
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "fatq_version": __version__,
        "git_commit": git_commit(),
        "torch": str(torch.__version__),  # TorchVersion is not weights_only-loadable
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(ctx.device),
        "world_size": ctx.world_size,
        "torch_threads": torch.get_num_threads(),
        **extra,
    }


def _final_line(result: dict) -> str:
    return (
        f"top-1 {result['top1']:.2f} %  top-5 {result['top5']:.2f} %  loss {result['loss']:.4f}  "
        f"({result['images']} test images)"
    )


def run_eval_only(args: argparse.Namespace, argv: list[str], ctx: distributed.DistContext) -> int:
    """``--eval-only CKPT``: evaluate a fatq checkpoint, or an FP32/public one (needs --arch)."""
    data_dir = getattr(args, "data_dir", None)
    if data_dir is None:
        raise FatqError("--data-dir is required.")
    _download_if_asked(args, None, ctx)
    given = _given_config(args)
    checkpoint = read_checkpoint_file(args.eval_only)
    fatq_format = is_fatq_checkpoint(checkpoint)
    if fatq_format:
        checkpoint = load_fatq_checkpoint(args.eval_only)
        arch = checkpoint["arch"]
        if given.get("arch", arch) != arch:
            raise FatqError(f"{args.eval_only} holds a {arch}, not a {given['arch']}.")
    elif "arch" not in given:
        raise FatqError(f"{args.eval_only} has no fatq metadata; pass --arch to say which model it holds.")
    else:
        arch = given["arch"]
    dataset = given.get("dataset", "cifar10")
    image_size = given.get("image_size")
    if image_size is None and fatq_format and checkpoint.get("input_size"):
        image_size = int(checkpoint["input_size"][-1])  # evaluate at the size it was trained on
    loader = given.get("loader") or "auto"
    if loader == "auto":
        loader = choose_loader(data_dir, dataset, arch, image_size)
    test = _load_splits(data_dir, dataset, image_size, arch, ("test",), args.quiet, loader)["test"]
    channels = input_size_of(test, image_size, arch)[0]
    if fatq_format:
        model = model_from_checkpoint(checkpoint)
        spec = model.spec
        requested = (given.get("weight_bits", spec.weight_bits), given.get("act_bits", spec.act_bits))
        if requested != (spec.weight_bits, spec.act_bits):
            raise FatqError(f"{args.eval_only} is a W{spec.weight_bits}A{spec.act_bits} model; omit --bits.")
        normalization, class_names = checkpoint["normalization"], checkpoint.get("class_names")
    else:
        # a checkpoint without metadata holds FP32 weights unless --bits says to quantize them
        bits = (given.get("weight_bits", 32), given.get("act_bits", 32))
        spec = QuantSpec.from_bits(
            bits, edge_inputs=given.get("edge_inputs", "int8"), transform=given.get("transform", True)
        )
        options = {"shortcut": given["shortcut"]} if "shortcut" in given else {}
        model = create_model(arch, spec=spec, num_classes=len(test.class_names), in_channels=channels, **options)
        meta = init_from_pretrained(model, args.eval_only)
        normalization, class_names = meta["normalization"], meta["class_names"]
    check_classes(model.num_classes, class_names, test.class_names, str(args.eval_only))
    if model.in_channels != channels:
        raise FatqError(f"{args.eval_only} takes {model.in_channels}-channel images, the dataset has {channels}.")
    model.to(ctx.device)
    batch = given.get("batch_size", 256)
    amp = given.get("amp", False)
    if isinstance(test, FileSplit):
        side = input_size_of(test, image_size, arch)[-1]
        batches = StreamBatches(
            test, side, batch, normalization, ctx.device, train=False, rank=ctx.rank, world_size=ctx.world_size,
            workers=_stream_workers(args.workers),
        )  # fmt: skip
        result = evaluate_batches(model, batches, len(batches), ctx.device, ctx, amp, args.quiet)
    else:
        images, labels = test.images.to(ctx.device), test.labels.to(ctx.device)
        result = evaluate(model, images, labels, normalization, batch, ctx, amp, args.quiet)
    if ctx.is_main:
        print(_final_line(result))
        if args.json:
            summary = {
                **result,
                "steps": 0,
                "checkpoint": str(args.eval_only),
                "checkpoint_format": "fatq" if fatq_format else "public",
                "arch": arch,
                "weight_bits": model.spec.weight_bits,
                "act_bits": model.spec.act_bits,
                "normalization": normalization,
                **provenance(argv, ctx),
            }
            write_json_atomic(args.json, summary)
    return 0


def _read_resume_checkpoint(args: argparse.Namespace) -> dict:
    if args.job_dir is None:
        raise FatqError("--resume needs --job-dir (the directory of the run to continue).")
    last = Path(args.job_dir) / "last.pt"
    if not last.is_file():
        raise FatqError(f"--resume: {last} does not exist; there is no run to continue in {args.job_dir}.")
    checkpoint = load_fatq_checkpoint(last)
    if "train_config" not in checkpoint or "optimizer" not in checkpoint:
        raise FatqError(f"{last} holds no training state (optimizer, step); it cannot be resumed.")
    return checkpoint


def _download_if_asked(args: argparse.Namespace, saved: dict | None, ctx: distributed.DistContext) -> None:
    """--download: rank 0 fetches CIFAR-10 into the data dir (before anything looks at it), the others wait."""
    if not args.download:
        return
    given = {**(saved or {}), **_given_config(args)}
    if given.get("dataset", "cifar10") != "cifar10":
        raise FatqError("--download fetches CIFAR-10 only; it needs --dataset cifar10.")
    if "data_dir" not in given:
        raise FatqError("--data-dir is required.")
    if ctx.is_main:
        download_cifar10(given["data_dir"], quiet=args.quiet)
    distributed.barrier(ctx)


def _warm_start(model, train, normalization: dict, seed: int, quiet: bool) -> None:
    """Re-estimate BN statistics and activation ranges at initialisation (fatq/warm_start.py)."""
    if not isinstance(train, ImageSplit):  # it draws its batches from the decoded in-memory split
        if not quiet:
            print("note: the warm start needs the in-memory loader; starting as the paper does (--paper-start).")
        return
    from fatq.warm_start import DEFAULT_BATCH_SIZE, DEFAULT_BATCHES, training_batches, warm_start

    warm_start(model, training_batches(train.images, normalization, DEFAULT_BATCH_SIZE, DEFAULT_BATCHES, seed))


def run_training(args: argparse.Namespace, argv: list[str], ctx: distributed.DistContext) -> int:
    checkpoint = _read_resume_checkpoint(args) if args.resume else None
    saved = checkpoint["train_config"] if checkpoint else None
    _download_if_asked(args, saved, ctx)
    cfg = resolve_config(args, saved)
    job_dir = Path(args.job_dir) if args.job_dir else default_job_dir(cfg, ctx)
    if checkpoint is None and (job_dir / "last.pt").exists():
        raise FatqError(f"{job_dir} already holds a run; pass --resume to continue it or choose another --job-dir.")
    if args.gpu_decode and (cfg.loader != "stream" or ctx.device.type != "cuda"):
        raise FatqError("--gpu-decode needs the streaming loader (--loader stream) and a CUDA device.")
    splits = _load_splits(
        cfg.data_dir, cfg.dataset, cfg.image_size, cfg.arch, ("train", "test"), args.quiet, cfg.loader
    )
    train, test = splits["train"], splits["test"]
    input_size = input_size_of(train, cfg.image_size, cfg.arch)
    if checkpoint is None and cfg.dataset == "imagefolder" and cfg.loader == "memory":
        # pad crops by 1/8 of the side, as 4 px does for 32x32 CIFAR
        cfg = dataclasses.replace(cfg, crop_padding=max(1, input_size[-1] // 8))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_classes=len(train.class_names), in_channels=input_size[0])
    if checkpoint is not None:
        normalization = checkpoint["normalization"]
        check_classes(model.num_classes, checkpoint.get("class_names"), train.class_names, str(args.job_dir))
        if checkpoint.get("input_size") and list(checkpoint["input_size"]) != list(input_size):
            raise FatqError(
                f"the run being resumed trained on {checkpoint['input_size']} inputs, the data gives "
                f"{list(input_size)}; resume with the original data."
            )
    elif cfg.pretrained:
        meta = init_from_pretrained(model, cfg.pretrained)
        normalization = meta["normalization"]
        check_classes(model.num_classes, meta["class_names"], train.class_names, cfg.pretrained)
        if cfg.warm_start and not model.spec.is_float:
            _warm_start(model, train, normalization, cfg.seed, quiet=args.quiet or not ctx.is_main)
    else:
        normalization = default_normalization(cfg.dataset, cfg.arch, train, input_size[-1])

    device = ctx.device
    model.to(device)
    if isinstance(train, ImageSplit):
        train = ImageSplit(train.images.to(device), train.labels.to(device), train.class_names)
        test = ImageSplit(test.images.to(device), test.labels.to(device), test.class_names)
        workers = args.workers if args.workers is not None else (1 if device.type == "cpu" else 0)
    else:
        workers = _stream_workers(args.workers)
    data = TrainData(train, test, normalization, train.class_names, input_size)
    quiet = args.quiet or not ctx.is_main
    log = _metrics_logger(job_dir, cfg, quiet) if ctx.is_main else None
    if checkpoint is not None and args.max_steps is None:
        # where a run ends is part of the run: a resumed --max-steps run stops where it was meant to
        args.max_steps = checkpoint.get("provenance", {}).get("max_steps")
        if args.max_steps is not None and not quiet:
            print(f"resuming a run that stops at step {args.max_steps} (--max-steps changes it)")
    invocation = provenance(
        argv, ctx, resumed_from_step=checkpoint["step"] if checkpoint else None, max_steps=args.max_steps
    )
    decode = "cuda" if args.gpu_decode else "workers"
    options = RunOptions(job_dir, args.max_steps, args.save_every, workers, quiet, log, invocation, decode)
    trainer = Trainer(cfg, model, data, ctx, options)  # last checks (e.g. batch vs processes) before writing
    if checkpoint is not None:
        trainer.resume_from(checkpoint)
    if ctx.is_main:
        job_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(job_dir)  # a checkpoint save cut short by kill -9 before this run
        _write_config(job_dir, cfg, normalization, invocation)
    result = trainer.fit()
    digests = trainer.rank_digests()
    if ctx.is_main:
        if len(set(digests)) > 1:
            print(f"warning: parameters differ across ranks: {digests}", file=sys.stderr)
        print(_final_line(result) + f"  step {trainer.step}  ->  {job_dir}")
        if args.json:
            summary = {
                "top1": result["top1"],
                "top5": result["top5"],
                "loss": result["loss"],
                "steps": trainer.step,
                "epochs": trainer.step / trainer.steps_per_epoch,
                "test_images": result["images"],
                "best_top1": trainer.best_top1,
                "train_images_per_s": result.get("train_images_per_s"),
                "job_dir": str(job_dir),
                "checkpoint": str(job_dir / "last.pt"),
                "rank_param_digests": digests,
                "config": cfg.to_dict(),
                **provenance(argv, ctx),
            }
            write_json_atomic(args.json, summary)
    return 0


def _metrics_logger(job_dir: Path, cfg: TrainConfig, quiet: bool):
    path = job_dir / "metrics.jsonl"

    def log(record: dict) -> None:
        line = json.dumps({**record, "time": datetime.datetime.now().isoformat(timespec="seconds")})
        with open(path, "a") as f:  # one short line per epoch: an append is as good as atomic here
            f.write(line + "\n")
        if not quiet:
            train = ""
            if "train_loss" in record:
                train = f"train loss {record['train_loss']:.4f} top-1 {record['train_top1']:.2f} %  |  "
            print(
                f"epoch {record['epoch']:.2f}/{cfg.epochs} step {record['step']}  |  {train}"
                f"test top-1 {record['top1']:.2f} % top-5 {record['top5']:.2f} % loss {record['loss']:.4f}",
                flush=True,
            )

    return log


def _write_config(job_dir: Path, cfg: TrainConfig, normalization: dict, invocation: dict) -> None:
    path = job_dir / "config.json"
    runs = json.loads(path.read_text()).get("invocations", []) if path.exists() else []
    write_json_atomic(
        path, {"config": cfg.to_dict(), "normalization": normalization, "invocations": [*runs, invocation]}
    )


def _check_outputs(args: argparse.Namespace) -> None:
    """--job-dir and --json can be written and overwrite no input, before any data is read."""
    check_output_dir(Path(args.job_dir) if args.job_dir else None, "job directory (--job-dir)")
    check_output_file(Path(args.json) if args.json else None, "JSON report (--json)")
    inputs = [getattr(args, "pretrained", None), args.eval_only]
    if args.job_dir:
        inputs += [Path(args.job_dir) / name for name in ("last.pt", "best.pt", "config.json", "metrics.jsonl")]
    check_distinct_outputs({"--json": args.json}, [Path(p) for p in inputs if p and Path(p).is_file()])


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    for name in ("max_steps", "workers", "save_every"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise FatqError(f"--{name.replace('_', '-')} must not be negative, got {value}.")
    _check_outputs(args)
    if args.eval_only and args.resume:
        raise FatqError("--eval-only and --resume exclude each other.")
    ctx = distributed.setup(args.device)
    try:
        status = run_eval_only(args, argv, ctx) if args.eval_only else run_training(args, argv, ctx)
        # leave the process group together: gloo aborts a rank (std::terminate) whose peer has already
        # closed its connections; not on error paths, where a failed rank would never reach the barrier
        distributed.barrier(ctx)
        return status
    finally:
        distributed.shutdown(ctx)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: exit status 0, or 2 with one sentence on stderr for a user error."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
