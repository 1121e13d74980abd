"""Import a checkpoint of the FAT reference code as an ordinary fatq checkpoint.

The reference format (``../shared/pretrained/fat-reference/README.md``) is
``{"epoch", "state_dict", "best_top1_acc", "optimizer"}``; per FAT-quantized conv ``P`` it holds
``P.weight``, ``P.act_alpha`` (α_a), ``P.weight_quant.wgt_alpha`` (α_w) and
``P.weight_quant.transform.weight`` (the mask layer T). The stem and the classifier carry a
``transform.weight`` their forward never uses: it is reported and dropped. CIFAR ResNets name the
option-B shortcut ``downsample.{0,1}`` where fatq says ``shortcut.{0,1}``; every other module path
is fatq's (for VGG and the ImageNet ResNets the shared documents give no key names: fatq's
torchvision-style paths are assumed, and any difference is reported as missing/unexpected keys).

The imported model is built with the reference forward's semantics, expressed as QuantSpec options:
``edge_weights="signed_max"`` (stem/classifier weights round(W / max(W) · 127), signed max, no clamp),
``act_clamp="top"`` (clamp(x/α_a, max=1), 2^b − 1 levels), ``weight_rounding="reference"`` (body
weight integers in the reference's operation order, so ties round alike), ``edge_inputs="float"`` and
``residual_inputs="float"`` (float stem/classifier inputs and residual Adds; export calibrates them),
and shortcut B. MobileNetV2 is refused: its block inputs are signed, where the reference's top-only
clamp has integers unbounded below, which no int8 engine represents.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from fatq.checkpoint import (
    CIFAR_NORMALIZATION,
    IMAGENET_NORMALIZATION,
    _check_shapes,
    read_checkpoint_file,
    save_checkpoint,
    strip_prefix,
)
from fatq.errors import CheckpointError, FatqError
from fatq.layers import QUANTIZED_LAYERS
from fatq.models import create_model, model_info
from fatq.provenance import sha256_file
from fatq.qconfig import QuantSpec
from fatq.quantizers import FLOAT_BITS, ActivationQuantizer, SignedMaxWeightQuantizer, check_bits
from fatq.transform import FATTransform

SOURCE_FORMAT = "fat-reference"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SUPPORTED = (
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "vgg_small",
    "vgg16_bn",
    "resnet18",
    "resnet34",
)
# fatq module path piece -> the reference code's (CIFAR ResNets' option-B shortcut)
_RENAMES = ((".shortcut.0.", ".downsample.0."), (".shortcut.1.", ".downsample.1."))
_IMAGENET_BLOCKS = {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet34"}
_VGG_CONVS = {6: "vgg_small", 13: "vgg16_bn"}


@dataclass
class ImportReport:
    """What an import found and did (saved as the checkpoint's ``imported_from``)."""

    source: str
    sha256: str
    arch: str
    bits: int
    epoch: int | None
    best_top1_acc: float | None
    dropped_keys: list[str] = field(default_factory=list)
    edge_integer_ranges: dict[str, list[int]] = field(default_factory=dict)
    beyond_int8: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": SOURCE_FORMAT, **self.__dict__}


def _ref_path(path: str) -> str:
    """fatq module path -> the reference code's."""
    dotted = f".{path}."
    for ours, theirs in _RENAMES:
        dotted = dotted.replace(ours, theirs)
    return dotted[1:-1]


def detect_arch(state: dict) -> str | None:
    """The architecture the tensors describe (block counts, conv counts), or None if unrecognised."""
    if any(k.startswith("features.") for k in state):
        convs = sum(1 for k, v in state.items() if k.startswith("features.") and k.endswith(".weight") and v.dim() == 4)
        return _VGG_CONVS.get(convs)
    stages = []
    for stage in (1, 2, 3, 4):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        if blocks:
            stages.append(max(blocks) + 1)
    if len(stages) == 4:
        return _IMAGENET_BLOCKS.get(tuple(stages))
    if len(stages) == 3 and len(set(stages)) == 1:
        return f"resnet{6 * stages[0] + 2}"
    return None


def _expected_keys(model: nn.Module) -> dict[str, str | None]:
    """fatq state-dict key -> the reference key it is read from (None: fatq-only, keeps its built value).

    fatq-only: the quantizer state of the stem/classifier (rule flag, float input) and of the residual
    Adds (disabled: float), and every quantizer's extra state.
    """
    mapping: dict[str, str | None] = {key: _ref_path(key) for key in model.state_dict()}
    layers = {name for name, module in model.named_modules() if isinstance(module, QUANTIZED_LAYERS)}
    for name, module in model.named_modules():
        if name in layers:
            owned = tuple(f"{name}.{child}." for child in ("weight_transform", "weight_quantizer", "input_quantizer"))
        elif isinstance(module, ActivationQuantizer) and name.rpartition(".")[0] not in layers:
            owned = (f"{name}.",)
        else:
            continue
        mapping.update({key: None for key in mapping if key.startswith(owned)})
        if isinstance(module, QUANTIZED_LAYERS) and isinstance(module.weight_transform, FATTransform):
            ref = _ref_path(name)
            mapping[f"{name}.weight_transform.mask.weight"] = f"{ref}.weight_quant.transform.weight"
            mapping[f"{name}.weight_quantizer.alpha"] = f"{ref}.weight_quant.wgt_alpha"
            mapping[f"{name}.input_quantizer.alpha"] = f"{ref}.act_alpha"
    return mapping


def _edge_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, QUANTIZED_LAYERS) and isinstance(m.weight_quantizer, SignedMaxWeightQuantizer)
    }


def _check_kind(state: dict, bits: int, path: Path) -> None:
    """Quantized vs FP32 from the tensors: a FAT file has act_alpha/wgt_alpha, an FP32 one has none."""
    quantized = any(k.endswith(".act_alpha") or k.endswith(".weight_quant.wgt_alpha") for k in state)
    if quantized and bits == FLOAT_BITS:
        raise CheckpointError(f"{path} holds a FAT-quantized model (it has act_alpha/wgt_alpha); give its --bits.")
    if not quantized and bits != FLOAT_BITS:
        raise CheckpointError(f"{path} holds an FP32 model (no act_alpha/wgt_alpha); import it with --bits 32.")


def import_reference(path: str | Path, arch: str, bits: int, shortcut: str = "B") -> tuple[nn.Module, ImportReport]:
    """Build the fatq model of a reference checkpoint.

    Args:
        path: the reference ``.pth.tar`` file.
        arch: fatq architecture name (one of :data:`SUPPORTED`).
        bits: the bit-width it was trained at (weights = activations), or 32 for an FP32 file.
        shortcut: CIFAR ResNet shortcut; the reference's ResNets use "B".

    Returns:
        (model in eval mode, report). Raises CheckpointError naming missing/unexpected keys,
        a wrong architecture or a quantized/FP32 mismatch.
    """
    path = Path(path)
    check_bits(bits, "--bits")
    if arch == "mobilenetv2":
        raise FatqError(
            "mobilenetv2 cannot be imported: the reference's top-only activation clamp on its signed block inputs "
            "gives integers unbounded below, which fatq and int8 engines cannot represent."
        )
    model_info(arch)
    if arch not in SUPPORTED:
        raise FatqError(f"fatq-import supports {', '.join(SUPPORTED)}, not {arch}.")
    raw = read_checkpoint_file(path)
    state = strip_prefix(raw["state_dict"])
    found = detect_arch(state)
    if found is not None and found != arch:
        raise CheckpointError(f"{path} holds a {found} (from its block/conv counts), not a {arch}.")
    _check_kind(state, bits, path)
    options = {"shortcut": shortcut} if "shortcut" in model_info(arch).options else {}
    classifier = [v for k, v in state.items() if k.endswith(".weight") and v.dim() == 2 and "transform" not in k]
    if not classifier:
        raise CheckpointError(f"{path} has no classifier weight (a 2-D .weight tensor).")
    spec = QuantSpec(
        weight_bits=bits,
        act_bits=bits,
        edge_inputs="float",
        residual_inputs="float",
        edge_weights="signed_max",
        act_clamp="top",
        weight_rounding="reference",
        act_alpha_init=8.0 if model_info(arch).family == "imagenet" else 5.0,
    )
    model = create_model(arch, spec=spec, num_classes=classifier[-1].shape[0], **options)
    mapping = _expected_keys(model)
    wanted = {ref for ref in mapping.values() if ref is not None}
    edge = _edge_layers(model)
    unused = {f"{_ref_path(name)}.transform.weight" for name in edge}
    dropped = sorted(k for k in state if k in unused)
    missing = sorted(ref for ref in wanted if ref not in state)
    unexpected = sorted(k for k in state if k not in wanted and k not in unused)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit a {arch} ({'FP32' if bits == FLOAT_BITS else f'{bits}-bit FAT'}, options {options}): "
            f"missing keys {missing[:4]}{' …' if len(missing) > 4 else ''}, "
            f"unexpected keys {unexpected[:4]}{' …' if len(unexpected) > 4 else ''}."
        )
    own = model.state_dict()
    incoming = {key: (state[ref] if ref is not None else own[key]) for key, ref in mapping.items()}
    incoming = {
        k: v.reshape(own[k].shape) if k.endswith(".alpha") and v.numel() == 1 else v for k, v in incoming.items()
    }
    _check_shapes(own, incoming, str(path), arch)
    model.load_state_dict(incoming)
    report = ImportReport(
        source=path.name,
        sha256=sha256_file(path),
        arch=arch,
        bits=bits,
        epoch=int(raw["epoch"]) if "epoch" in raw else None,
        best_top1_acc=float(raw["best_top1_acc"]) if "best_top1_acc" in raw else None,
        dropped_keys=dropped,
    )
    for name, layer in edge.items():
        if not float(layer.weight.detach().max()) > 0:
            raise CheckpointError(
                f"{path}: {name}.weight has no positive entry; the reference's signed-max rule divides by max(W)."
            )
        q, _ = layer.weight_integers()
        lo, hi = int(q.min()), int(q.max())
        report.edge_integer_ranges[name] = [lo, hi]
        if lo < -127:
            report.beyond_int8.append(name)
    return model.eval(), report


def save_imported(model: nn.Module, report: ImportReport, output: str | Path) -> None:
    """Write the fatq checkpoint (normalization and class names of the reference's data, provenance)."""
    family = model_info(model.arch).family
    normalization = CIFAR_NORMALIZATION if family == "cifar" else IMAGENET_NORMALIZATION
    classes = CIFAR10_CLASSES if family == "cifar" and model.num_classes == 10 else None
    save_checkpoint(output, model, normalization, classes, imported_from=report.to_dict())
