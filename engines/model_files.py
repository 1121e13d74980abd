"""What kind of model a MODEL argument holds, and what it says about itself: inspected once.

fatq-bench accepts four kinds of MODEL: an ONNX file (QDQ int8 or float, fatq's or anyone's), an
OpenVINO IR (``model.xml`` with its ``model.bin``), a TensorRT plan (``.plan``/``.engine`` with its
JSON sidecar, see :mod:`engines.trt_builder`) and a fatq checkpoint (the torch engine). Detection
reads the file's bytes, not only its suffix, so a mislabelled file gets a clear error instead of an
engine's stack trace. :func:`inspect_model` parses an ONNX file once; the :class:`ModelFile` it
returns carries every fact the planner, the runners and the report need, so nothing parses it
again. :func:`inspect_onnx` does the same for a model in memory (``fatq-export --check`` runs its
debug copy without a temp file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fatq.errors import FatqError

ONNX, OPENVINO_IR, TRT_PLAN, CHECKPOINT = "onnx", "openvino-ir", "trt-plan", "checkpoint"
# how skip reasons name each kind (engines.run_plan)
KIND_NAMES = {
    ONNX: "ONNX files",
    OPENVINO_IR: "OpenVINO IR (.xml + .bin)",
    TRT_PLAN: "TensorRT plans",
    CHECKPOINT: "fatq checkpoints",
}
KIND_ARTICLES = {
    ONNX: "an ONNX file",
    OPENVINO_IR: "an OpenVINO IR",
    TRT_PLAN: "a TensorRT plan",
    CHECKPOINT: "a fatq checkpoint",
}
PLAN_SUFFIXES = (".plan", ".engine", ".trt")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip container
_PICKLE_MAGIC = b"\x80"  # torch.save's legacy (non-zip) format starts with a pickle protocol byte
# ops of an int8 graph: QDQ files, and the QOperator form of ``fatq-export --format onnx-ort``
INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"}
# ONNX elem_type -> the float precision a graph without Q/DQ computes in
_FLOAT_PRECISION = {1: "fp32", 10: "fp16", 16: "bf16"}


def detect_model_kind(path: str | Path) -> str:
    """``"onnx"``, ``"openvino-ir"``, ``"trt-plan"`` or ``"checkpoint"``; FatqError for anything else.

    Args:
        path: a file path.
    """
    path = Path(path)
    kind = _kind_from_bytes(path)
    if kind is None and _load_onnx(path) is None:
        raise _not_a_model(path)
    return kind or ONNX


def _kind_from_bytes(path: Path) -> str | None:
    """CHECKPOINT, OPENVINO_IR or TRT_PLAN from the first bytes and the name; None: maybe ONNX (parse to tell)."""
    if path.is_dir():
        raise FatqError(f"model {path} is a directory, not a model file.")
    if not path.is_file():
        raise FatqError(f"model file {path} does not exist.")
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC):
        return CHECKPOINT
    if head.lstrip().startswith(b"<"):  # XML; an OpenVINO IR's root element is <net>
        return OPENVINO_IR if b"<net" in head else None
    if path.suffix.lower() in PLAN_SUFFIXES or plan_sidecar_path(path).is_file():
        return TRT_PLAN
    return None


def _not_a_model(path: Path) -> FatqError:
    return FatqError(
        f"{path} is neither an ONNX model, an OpenVINO IR (.xml with its .bin), a TensorRT plan "
        "(.plan/.engine with its .json sidecar) nor a fatq checkpoint."
    )


def plan_sidecar_path(plan: str | Path) -> Path:
    """Where the JSON sidecar of a TensorRT plan lives: ``model.plan`` -> ``model.plan.json``."""
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


def _load_onnx(path: Path):
    """The ONNX model in ``path`` (without external weights), or None when it is not one."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError, UnicodeDecodeError):
        return None
    # Protobuf accepts some arbitrary bytes as an empty message: a real model has a graph.
    return model if model.ir_version > 0 and len(model.graph.node) > 0 else None


@dataclass(frozen=True)
class ModelFile:
    """One model (a MODEL argument, or an ONNX model in memory) and the facts about it.

    Attributes:
        path: the file (for a model in memory: the name it is reported under).
        kind: "onnx", "openvino-ir", "trt-plan" or "checkpoint".
        precision: "int8" when an ONNX graph holds Q/DQ or QLinearConv/QLinearMatMul nodes (an IR:
            FakeQuantize layers), else the float type of its first input ("fp32", "fp16", "bf16");
            a plan's build precision; "int8" or "fp32" for a quantized or FP32 checkpoint.
        metadata: an ONNX model's ``metadata_props`` as a dict of strings (an IR: the entries
            OpenVINO kept from the ONNX file it was converted from, under ``rt_info/framework``).
        normalization: {"mean": [...], "std": [...]} from the metadata, or None.
        opset: the default-domain opset version of an ONNX model.
        only_engine: the one engine that reads the graph's custom ops (a ``fatq-export --format
            onnx-ort`` or ``onnx-openvino`` file, see :func:`export.formats.format_of`); None for
            a standard graph.
        data: the serialized ONNX model of a model in memory (None: read from ``path``).
    """

    path: Path
    kind: str
    precision: str
    metadata: dict = field(default_factory=dict)
    normalization: dict | None = None
    opset: int | None = None
    only_engine: str | None = None
    data: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def stem(self) -> str:
        return self.path.name.split(".")[0]

    @property
    def source(self) -> str | bytes:
        """What an engine loads: the serialized model in memory, else the file path."""
        return self.data if self.data is not None else str(self.path)


def inspect_onnx(model, path: str | Path = "model.onnx", data: bytes | None = None) -> ModelFile:
    """The facts of an ``onnx.ModelProto`` (``path``: the file it was read from, or a name for reports)."""
    from export.formats import format_of

    path = Path(path)
    ops = {node.op_type for node in model.graph.node}
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    elem_type = inputs[0].type.tensor_type.elem_type if inputs else 1
    precision = "int8" if ops & INT8_OPS else _FLOAT_PRECISION.get(elem_type, "fp32")
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    fmt = format_of(model)
    normalization = normalization_from_metadata(metadata, path)
    return ModelFile(path, ONNX, precision, metadata, normalization, opset, fmt.only_engine if fmt else None, data)


def in_memory_model(model, name: str = "model.onnx") -> ModelFile:
    """A ModelFile for an ``onnx.ModelProto`` or its serialized bytes (engines load it from memory)."""
    import onnx

    data = model if isinstance(model, bytes) else model.SerializeToString()
    proto = onnx.load_model_from_string(data) if isinstance(model, bytes) else model
    return inspect_onnx(proto, name, data)


def inspect_model(path: str | Path) -> ModelFile:
    """Detect a MODEL file's kind and read its facts (an ONNX file is parsed once, here)."""
    path = Path(path)
    kind = _kind_from_bytes(path)
    if kind == TRT_PLAN:
        from engines.trt_builder import read_sidecar

        return ModelFile(path, kind, read_sidecar(path)["precision"])
    if kind == OPENVINO_IR:
        return _inspect_ir(path)
    if kind == CHECKPOINT:
        from engines.torch_runner import checkpoint_is_float
        from fatq.checkpoint import check_layout, load_fatq_checkpoint

        precision = "fp32" if checkpoint_is_float(check_layout(load_fatq_checkpoint(path), path)) else "int8"
        return ModelFile(path, kind, precision)
    model = _load_onnx(path)
    if model is None:
        raise _not_a_model(path)
    if not any(init.data_location == init.EXTERNAL for init in model.graph.initializer):
        from export.lint_rules import check_structure

        check_structure(model, path)  # engines crash or mislead on malformed graphs
    return inspect_onnx(model, path)


def ir_weights_path(xml: str | Path) -> Path:
    """The ``.bin`` weights file beside an OpenVINO IR's ``.xml`` (``model.xml`` -> ``model.bin``)."""
    return Path(xml).with_suffix(".bin")


def _inspect_ir(path: Path) -> ModelFile:
    """The facts of an OpenVINO IR, read from its XML (the weights file is only checked to exist)."""
    from xml.etree import ElementTree

    if not ir_weights_path(path).is_file():
        raise FatqError(f"OpenVINO IR {path} has no weights file {ir_weights_path(path).name} beside it.")
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        raise FatqError(f"OpenVINO IR {path} is not well-formed XML ({exc}).") from None
    if root.tag != "net":
        raise _not_a_model(path)
    types = {layer.get("type") for layer in root.iter("layer")}
    # OpenVINO keeps the source ONNX file's metadata_props as rt_info/framework/<key value=...>
    framework = root.find("rt_info/framework")
    metadata = {entry.tag: entry.get("value", "") for entry in framework} if framework is not None else {}
    precision = "int8" if "FakeQuantize" in types else _ir_input_precision(root)
    return ModelFile(path, OPENVINO_IR, precision, metadata, normalization_from_metadata(metadata, path))


def _ir_input_precision(root) -> str:
    """The float precision of an IR's first Parameter ("fp32" when it names none fatq knows)."""
    element = {"f32": "fp32", "f16": "fp16", "bf16": "bf16"}
    for layer in root.iter("layer"):
        if layer.get("type") == "Parameter":
            data = layer.find("data")
            return element.get(data.get("element_type") if data is not None else "", "fp32")
    return "fp32"


def onnx_model_file(model) -> ModelFile:
    """What an ONNX runner was given -- a path, a :class:`ModelFile`, an ``onnx.ModelProto`` or its
    bytes -- as a ModelFile of an ONNX model (FatqError for anything else)."""
    if isinstance(model, ModelFile):
        found = model
    elif isinstance(model, (str, Path)):
        found = inspect_model(model)
    else:
        found = in_memory_model(model)
    if found.kind != ONNX:
        raise FatqError(f"{found.path} is not an ONNX model.")
    return found


def normalization_from_metadata(metadata: dict, source: str | Path = "model") -> dict | None:
    """{"mean", "std"} lists from ONNX ``metadata_props``, or None when the model records none.

    Accepted forms: a ``normalization`` entry holding JSON ``{"mean": [...], "std": [...]}``
    (what ``fatq-export`` writes), or separate ``mean`` / ``std`` entries holding JSON lists.
    """
    try:
        if "normalization" in metadata:
            value = json.loads(metadata["normalization"])
            mean, std = value["mean"], value["std"]
        elif "mean" in metadata and "std" in metadata:
            mean, std = json.loads(metadata["mean"]), json.loads(metadata["std"])
        else:
            return None
        mean, std = [float(m) for m in mean], [float(s) for s in std]
    except (ValueError, KeyError, TypeError):
        raise FatqError(f"{source} has unreadable normalization metadata; re-export it with fatq-export.") from None
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise FatqError(f"{source} has invalid normalization metadata (mean {mean}, std {std}).")
    return {"mean": mean, "std": std}
