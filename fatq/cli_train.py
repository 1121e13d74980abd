"""``fatq-train``: FAT quantization-aware training and evaluation of a registered model.

Examples:
    fatq-train --arch resnet20 --bits 4 --dataset cifar10 --data-dir DATA \\
        --pretrained resnet20-cifar10-fp32.th --epochs 1 --device cpu
    fatq-train --job-dir runs/x --resume --data-dir DATA          # continue from runs/x/last.pt
    fatq-train --eval-only resnet20-cifar10-fp32.th --arch resnet20 --data-dir DATA

A job directory (default ``runs/<arch>-w<w>a<a>-<timestamp>``) receives ``last.pt`` (model,
optimizer, RNG: everything to resume), ``best.pt`` (best test top-1), ``metrics.jsonl`` (one
line per evaluation) and ``config.json`` (resolved config, command lines, versions). Under
``torchrun`` the processes share the work (DDP) and only rank 0 writes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

from fatq import distributed
from fatq.checkpoint import (
    CIFAR_NORMALIZATION,
    init_from_pretrained,
    is_fatq_checkpoint,
    load_fatq_checkpoint,
    model_from_checkpoint,
    read_checkpoint_file,
)
from fatq.cli_common import SentenceParser, run_cli
from fatq.data import channel_statistics, load_split
from fatq.errors import FatqError
from fatq.io import write_json_atomic
from fatq.models import create_model, list_models, model_info
from fatq.provenance import __version__, git_commit
from fatq.qconfig import QuantSpec
from fatq.train import (
    RunOptions,
    TrainConfig,
    TrainData,
    Trainer,
    build_model,
    default_lr,
    default_milestones,
    evaluate,
)

DEFAULT_BITS = 4
DATASETS = ("cifar10", "imagefolder")
# Flags a resumed run may change: where the data is. Everything else that shapes the result
# comes from the run being resumed, and a contradicting flag is an error rather than ignored.
RESUME_OVERRIDABLE = ("data_dir",)


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
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, help="cifar10 (default) or any imagefolder with train/ and test|val/")
    d.add_argument("--data-dir", help="dataset directory or .tar.gz (required)")
    d.add_argument("--image-size", type=int, help="resize imagefolder images to this square size")
    t = p.add_argument_group("training")
    t.add_argument("--pretrained", help="initialise from an FP32, higher-bit fatq, or public checkpoint")
    t.add_argument(
        "--paper-start",
        dest="warm_start",
        action="store_false",
        help="with --pretrained, skip the warm start (BN statistics and activation ranges re-estimated on "
        "4 training batches of 128) and start as the paper does (near chance for the first ~50 steps)",
    )
    t.add_argument("--epochs", type=int, help="epochs (default 400)")
    t.add_argument("--batch-size", type=int, help="global batch size, split across processes (default 256)")
    t.add_argument("--lr", type=float, help="base lr of the weights (default 0.04; 0.1 for --bits 32)")
    t.add_argument("--lr-schedule", choices=("step", "cosine"), help="per-step lr schedule (default step)")
    t.add_argument(
        "--milestones",
        help="step-schedule epochs, comma-separated, may be fractional (default 150/400 and 225/400 of --epochs)",
    )
    t.add_argument("--weight-decay", type=float, help="weight decay of the weights (default 5e-4)")
    t.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    t.add_argument("--label-smoothing", type=float, help="cross-entropy label smoothing (default 0)")
    t.add_argument("--seed", type=int, help="seed of the initialisation, data order and augmentation (default 0)")
    t.add_argument("--amp", action="store_true", help="mixed precision: fp16 + GradScaler on CUDA, bf16 on CPU")
    r = p.add_argument_group("run")
    r.add_argument("--max-steps", type=int, default=None, help="stop after this global optimizer step")
    r.add_argument("--job-dir", default=None, help="output directory (default runs/<arch>-w<w>a<a>-<timestamp>)")
    r.add_argument("--resume", action="store_true", default=False, help="continue the run in --job-dir from last.pt")
    r.add_argument("--save-every", type=int, default=0, help="also save last.pt every N steps (default: epoch ends)")
    r.add_argument("--eval-only", metavar="CKPT", default=None, help="evaluate a fatq, FP32 or public checkpoint")
    r.add_argument("--device", choices=distributed.DEVICE_CHOICES, default="auto", help="auto picks CUDA if present")
    r.add_argument("--workers", type=int, default=None, help="batch-preparation threads (default 1 on CPU, 0 on CUDA)")
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


def resolve_config(args: argparse.Namespace, saved: dict | None = None) -> TrainConfig:
    """The run's config: defaults < command line, or the resumed run's config (+ data dir)."""
    given = _given_config(args)
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
    given.setdefault("weight_bits", DEFAULT_BITS)
    given.setdefault("act_bits", DEFAULT_BITS)
    given.setdefault("lr", default_lr(given["weight_bits"]))
    epochs = given.setdefault("epochs", TrainConfig.__dataclass_fields__["epochs"].default)
    given.setdefault("milestones", default_milestones(epochs))
    if given.get("dataset") == "imagefolder":  # pad crops by 1/8 of the side, as 4 px does for 32x32 CIFAR
        side = given.get("image_size") or model_info(given["arch"]).input_size[-1]
        given.setdefault("crop_padding", max(1, side // 8))
    cfg = TrainConfig(**given)
    cfg.quant_spec()  # validates bits and edge mode now, before any data is read
    return cfg


def default_job_dir(cfg: TrainConfig, ctx: distributed.DistContext) -> Path:
    stamp = distributed.broadcast_object(datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), ctx)
    return Path("runs") / f"{cfg.arch}-w{cfg.weight_bits}a{cfg.act_bits}-{stamp}"


def _load_splits(
    data_dir: str, dataset: str, image_size: int | None, arch: str, splits: tuple[str, ...], quiet: bool
) -> dict:
    """Decode (or read from the cache) the named splits; all must have the same classes."""
    if dataset == "imagefolder" and image_size is None:
        image_size = model_info(arch).input_size[-1]
    elif dataset == "cifar10":
        image_size = None  # CIFAR-10 is 32x32 already; None shares the decode cache
    loaded = {s: load_split(data_dir, s, dataset, image_size, quiet=quiet) for s in splits}
    if len({tuple(split.class_names) for split in loaded.values()}) != 1:
        raise FatqError(f"the splits of {data_dir} have different class folders.")
    return loaded


def _check_classes(model_classes: int, class_names: list[str] | None, data_names: list[str], source: str) -> None:
    if model_classes != len(data_names):
        raise FatqError(f"{source} has {model_classes} classes, the dataset has {len(data_names)}.")
    if class_names is not None and list(class_names) != list(data_names):
        raise FatqError(f"{source} was trained on classes {class_names[:3]}..., the dataset has {data_names[:3]}....")


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
    test = _load_splits(data_dir, dataset, given.get("image_size"), arch, ("test",), args.quiet)["test"]
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
        model = create_model(arch, spec=spec, num_classes=len(test.class_names), **options)
        meta = init_from_pretrained(model, args.eval_only)
        normalization, class_names = meta["normalization"], meta["class_names"]
    _check_classes(model.num_classes, class_names, test.class_names, str(args.eval_only))
    model.to(ctx.device)
    images, labels = test.images.to(ctx.device), test.labels.to(ctx.device)
    batch = given.get("batch_size", 256)
    result = evaluate(model, images, labels, normalization, batch, ctx, given.get("amp", False), args.quiet)
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


def run_training(args: argparse.Namespace, argv: list[str], ctx: distributed.DistContext) -> int:
    checkpoint = _read_resume_checkpoint(args) if args.resume else None
    cfg = resolve_config(args, checkpoint["train_config"] if checkpoint else None)
    job_dir = Path(args.job_dir) if args.job_dir else default_job_dir(cfg, ctx)
    if checkpoint is None and (job_dir / "last.pt").exists():
        raise FatqError(f"{job_dir} already holds a run; pass --resume to continue it or choose another --job-dir.")
    splits = _load_splits(cfg.data_dir, cfg.dataset, cfg.image_size, cfg.arch, ("train", "test"), args.quiet)
    train, test = splits["train"], splits["test"]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_classes=len(train.class_names))
    if checkpoint is not None:
        normalization = checkpoint["normalization"]
        _check_classes(model.num_classes, checkpoint.get("class_names"), train.class_names, str(args.job_dir))
    elif cfg.pretrained:
        meta = init_from_pretrained(model, cfg.pretrained)
        normalization = meta["normalization"]
        _check_classes(model.num_classes, meta["class_names"], train.class_names, cfg.pretrained)
        if cfg.warm_start and not model.spec.is_float:
            from fatq.warm_start import DEFAULT_BATCH_SIZE, DEFAULT_BATCHES, training_batches, warm_start

            batches = training_batches(train.images, normalization, DEFAULT_BATCH_SIZE, DEFAULT_BATCHES, cfg.seed)
            warm_start(model, batches)
    elif cfg.dataset == "cifar10":
        normalization = CIFAR_NORMALIZATION
    else:
        normalization = channel_statistics(train.images)

    device = ctx.device
    model.to(device)
    data = TrainData(
        train=type(train)(train.images.to(device), train.labels.to(device), train.class_names),
        test=type(test)(test.images.to(device), test.labels.to(device), test.class_names),
        normalization=normalization,
        class_names=train.class_names,
    )
    workers = args.workers if args.workers is not None else (1 if device.type == "cpu" else 0)
    quiet = args.quiet or not ctx.is_main
    log = _metrics_logger(job_dir, cfg, quiet) if ctx.is_main else None
    invocation = provenance(argv, ctx, resumed_from_step=checkpoint["step"] if checkpoint else None)
    options = RunOptions(job_dir, args.max_steps, args.save_every, workers, quiet, log, invocation)
    trainer = Trainer(cfg, model, data, ctx, options)  # last checks (e.g. batch vs processes) before writing
    if checkpoint is not None:
        trainer.resume_from(checkpoint)
    if ctx.is_main:
        job_dir.mkdir(parents=True, exist_ok=True)
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


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    for name in ("max_steps", "workers", "save_every"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise FatqError(f"--{name.replace('_', '-')} must not be negative, got {value}.")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise FatqError(f"directory {Path(args.json).parent} does not exist (for --json).")
    if args.eval_only and args.resume:
        raise FatqError("--eval-only and --resume exclude each other.")
    ctx = distributed.setup(args.device)
    try:
        if args.eval_only:
            return run_eval_only(args, argv, ctx)
        return run_training(args, argv, ctx)
    finally:
        distributed.shutdown(ctx)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: exit status 0, or 2 with one sentence on stderr for a user error."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
