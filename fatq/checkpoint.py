"""Checkpoints: fatq's own format, loading FP32 / higher-bit / public weights into a model.

A fatq checkpoint is a plain dict (``torch.load(path, weights_only=True)`` reads it):

    format: "fatq-checkpoint", format_version: 1, fatq_version, git_commit,
    arch, arch_options, num_classes, spec (QuantSpec.to_dict()), layers (per-layer quantizer
    config), normalization {"mean", "std"}, input_size [C, H, W], class_names,
    state_dict, and optionally epoch, step, metrics, train_config, optimizer, scheduler, rng.

``input_size`` is the size the model was trained on (channels of the data, the side of the
training crops), not the architecture's registered size: a MobileNetV2 trained on CIFAR-10
records [3, 32, 32], one trained on a 28x28 grayscale folder [1, 28, 28] (and has a 1-channel
first conv). Export and benchmarks read the model's input shape from this field.

Public formats: the one of ``../shared/pretrained`` is ``{"best_prec1", "state_dict"}`` with
``module.``-prefixed keys; torchvision's ``model.state_dict()`` files (``resnet18-*.pth``) are a
bare dict of tensors. Both imply ImageNet normalization.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fatq.errors import CheckpointError
from fatq.io import atomic_path
from fatq.models import create_model, model_info
from fatq.provenance import __version__, git_commit
from fatq.qconfig import QuantSpec

FORMAT = "fatq-checkpoint"
FORMAT_VERSION = 1
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
CIFAR_NORMALIZATION = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}
# Parameters/buffers a quantized model has and an FP32 (or plain uniform) one lacks: these may be
# missing when initialising from a checkpoint; anything else missing is an architecture mismatch.
QUANTIZER_KEY_PARTS = (
    "weight_transform.",
    "weight_quantizer.",
    "input_quantizer.",
    "branch_quantizer.",
    "shortcut_quantizer.",
    "num_batches_tracked",
)  # checkpoints from PyTorch < 0.4.1 lack BN's counter


def read_checkpoint_file(path: str | Path) -> dict:
    """``torch.load`` with weights_only=True on CPU; one clear error for missing/corrupt files."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give the checkpoint file (e.g. {path}/best.pt).")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    # torch.load's unpickler raises whatever the bytes trip (IndexError for a text file): any failure is unreadable
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"{path} is not a readable checkpoint (corrupt, truncated, or not a weights-only torch.save file: "
            f"{type(exc).__name__})."
        ) from None
    bare = isinstance(data, dict) and data and all(isinstance(k, str) and "." in k for k in data)
    if bare and all(isinstance(v, torch.Tensor) for v in data.values()):
        # a bare state dict (tensors under module-path keys), as torchvision's model.state_dict() files are
        return {"state_dict": data}
    if not isinstance(data, dict) or "state_dict" not in data:
        raise CheckpointError(f"{path} holds no state_dict; it is neither a fatq nor a supported public checkpoint.")
    return check_layout(data, path)


def is_fatq_checkpoint(data: dict) -> bool:
    return data.get("format") == FORMAT


def load_fatq_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint and insist it is fatq's own format (with its metadata)."""
    data = read_checkpoint_file(path)
    if not is_fatq_checkpoint(data):
        raise CheckpointError(
            f"{path} is not a fatq checkpoint (no fatq metadata); train or convert it with fatq-train."
        )
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer fatq (format {data['format_version']}); upgrade fatq.")
    return data


# the fields every reader of a fatq checkpoint uses (model_from_checkpoint, the runners, fatq-ptq)
REQUIRED_FIELDS = ("arch", "spec", "num_classes", "normalization", "state_dict")


def check_layout(data: dict, path: str | Path) -> dict:
    """``data`` if its fields have the types the format promises, else one CheckpointError sentence.

    Checked before a model is built from it: a tensor where the state dict belongs, or a fatq
    checkpoint without its spec, would otherwise fail deep inside torch or the model factory.
    """
    state = data.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}'s state_dict is a {type(state).__name__}, not a dict of tensors; it is not a model checkpoint."
        )
    if is_fatq_checkpoint(data):
        missing = [k for k in REQUIRED_FIELDS if k not in data]
        if missing:
            raise CheckpointError(f"{path} is a fatq checkpoint without its {', '.join(missing)} field(s).")
        if not isinstance(data["spec"], dict) or not isinstance(data["arch"], str):
            raise CheckpointError(f"{path} records an unreadable arch or spec; it was not written by fatq.")
    return data


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    """Remove a DataParallel/DDP prefix from every key that has it."""
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def layer_configs(model: nn.Module) -> dict:
    """Per-layer quantizer config {module path: {...}} for every quantizer in ``model``."""
    configs = {}
    for name, module in model.named_modules():
        if hasattr(module, "int_range") and hasattr(module, "bits"):
            lo, hi = module.int_range
            entry = {"kind": getattr(module, "kind", "activation"), "bits": module.bits, "int_range": [lo, hi]}
            if hasattr(module, "signed"):
                entry.update(signed=module.signed, enabled=module.enabled)
            configs[name] = entry
    return configs


def model_from_checkpoint(data: dict) -> nn.Module:
    """Rebuild the model a fatq checkpoint describes and load its weights (strict)."""
    spec = QuantSpec.from_dict(data["spec"])
    in_channels = data["input_size"][0] if data.get("input_size") else None  # older checkpoints: the registered 3
    model = create_model(
        data["arch"],
        spec=spec,
        num_classes=data["num_classes"],
        in_channels=in_channels,
        **data.get("arch_options", {}),
    )
    load_state_strict(model, data["state_dict"], source=f"checkpoint of {data['arch']}")
    return model


def load_state_strict(model: nn.Module, state_dict: dict, source: str) -> None:
    """Load with strict key and shape checks, naming the first offending keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match {model.arch}: missing {missing[:3]}, unexpected {unexpected[:3]}."
        )
    _check_shapes(own, state_dict, source, model.arch)
    model.load_state_dict(state_dict)


def _check_shapes(own: dict, incoming: dict, source: str, arch: str) -> None:
    for key, value in incoming.items():
        if isinstance(value, torch.Tensor) and key in own and own[key].shape != value.shape:
            raise CheckpointError(
                f"{source} does not fit {arch}: {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)}."
            )


def init_from_pretrained(model: nn.Module, path: str | Path) -> dict:
    """Initialise ``model`` from an FP32, higher-bit fatq, or public checkpoint (non-strict).

    Keys present in both are loaded (the progressive b+1 -> b initialisation also carries the
    learned alphas and masks); quantizer keys the source lacks keep their initial values, and
    quantizer keys the model lacks are dropped (a portable-placement source for a TensorRT-placement
    model has branch quantizers; a FAT source for a ``--no-transform`` model has masks).
    Any other missing key, any unexpected key or any shape mismatch is an error: weights are
    never loaded silently into the wrong architecture.

    Returns:
        Metadata of the source: {"normalization", "class_names" (or None), "format"}.
    """
    data = read_checkpoint_file(path)
    if is_fatq_checkpoint(data):
        if data["arch"] != model.arch:
            raise CheckpointError(f"{path} holds a {data['arch']}, not a {model.arch}.")
        state, meta = (
            data["state_dict"],
            {"normalization": data["normalization"], "class_names": data.get("class_names"), "format": FORMAT},
        )
    else:
        state, meta = (
            strip_prefix(data["state_dict"]),
            {"normalization": IMAGENET_NORMALIZATION, "class_names": None, "format": "public"},
        )
    own = model.state_dict()
    unexpected = [k for k in state if k not in own and not any(p in k for p in QUANTIZER_KEY_PARTS)]
    state = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in state and not any(p in k for p in QUANTIZER_KEY_PARTS)]
    if unexpected or missing:
        raise CheckpointError(
            f"{path} does not fit {model.arch} ({model_info(model.arch).name}, options {model.arch_options}): "
            f"unexpected keys {unexpected[:3]}, missing keys {missing[:3]}."
        )
    _check_shapes(own, state, str(path), model.arch)
    model.load_state_dict({k: v for k, v in state.items()}, strict=False)
    return meta


def build_checkpoint(
    model: nn.Module,
    normalization: dict,
    class_names: list[str] | None,
    input_size: list[int] | tuple[int, ...] | None = None,
    **extra,
) -> dict:
    """The dict :func:`save_checkpoint` writes: metadata + state dict + ``extra`` fields.

    ``input_size`` [C, H, W] is the size of the training inputs; without it the registered H, W
    with the model's channels (only for models that were never trained here).
    """
    if input_size is None:
        input_size = [getattr(model, "in_channels", 3), *model_info(model.arch).input_size[1:]]
    if int(input_size[0]) != getattr(model, "in_channels", 3):
        raise CheckpointError(f"input size {list(input_size)} disagrees with the model's {model.in_channels} channels.")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fatq_version": __version__,
        "git_commit": git_commit(),
        "arch": model.arch,
        "arch_options": dict(model.arch_options),
        "num_classes": model.num_classes,
        "spec": model.spec.to_dict(),
        "layers": layer_configs(model),
        "normalization": {"mean": list(normalization["mean"]), "std": list(normalization["std"])},
        "input_size": [int(v) for v in input_size],
        "class_names": list(class_names) if class_names is not None else None,
        "state_dict": {
            k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()
        },
        **extra,
    }


def atomic_save(obj: dict, path: str | Path) -> None:
    """``torch.save`` to a temp file in the target directory, then rename (no half-written file)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"directory {path.parent} does not exist.")
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    normalization: dict,
    class_names: list[str] | None = None,
    input_size: list[int] | tuple[int, ...] | None = None,
    **extra,
) -> None:
    """Write a fatq checkpoint atomically (see the module docstring for its fields)."""
    atomic_save(build_checkpoint(model, normalization, class_names, input_size, **extra), path)
