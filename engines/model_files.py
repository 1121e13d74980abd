"""What kind of model file a path holds, and what an ONNX file says about itself.

fatq-bench accepts three kinds of MODEL: an ONNX file (QDQ int8 or float), a TensorRT plan
(``.plan``/``.engine`` with its JSON sidecar, see :mod:`engines.trt_builder`) and a fatq
checkpoint (the torch engine). Detection reads the file's bytes, not only its suffix, so a
mislabelled file gets a clear error instead of an engine's stack trace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fatq.errors import FatqError

ONNX, TRT_PLAN, CHECKPOINT = "onnx", "trt-plan", "checkpoint"
PLAN_SUFFIXES = (".plan", ".engine", ".trt")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip container
_PICKLE_MAGIC = b"\x80"  # torch.save's legacy (non-zip) format starts with a pickle protocol byte
# ops of an int8 graph: QDQ files, and the QOperator form of ``fatq-export --format onnx-ort``
INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"}
# custom op domains fatq-export writes -> the only engine that reads them (onnx-ort, onnx-openvino files)
ENGINE_DOMAINS = {"com.microsoft": "ort", "org.openvinotoolkit": "openvino"}
# ONNX elem_type -> the float precision a graph without Q/DQ computes in
_FLOAT_PRECISION = {1: "fp32", 10: "fp16", 16: "bf16"}


def detect_model_kind(path: str | Path) -> str:
    """``"onnx"``, ``"trt-plan"`` or ``"checkpoint"``; FatqError for anything else.

    Args:
        path: a file path.
    """
    path = Path(path)
    if not path.is_file():
        raise FatqError(f"model file {path} does not exist.")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC):
        return CHECKPOINT
    if path.suffix.lower() in PLAN_SUFFIXES or plan_sidecar_path(path).is_file():
        return TRT_PLAN
    if _parses_as_onnx(path):
        return ONNX
    raise FatqError(
        f"{path} is neither an ONNX model, a TensorRT plan (.plan/.engine with its .json sidecar) "
        "nor a fatq checkpoint."
    )


def plan_sidecar_path(plan: str | Path) -> Path:
    """Where the JSON sidecar of a TensorRT plan lives: ``model.plan`` -> ``model.plan.json``."""
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


def _parses_as_onnx(path: Path) -> bool:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError, UnicodeDecodeError):
        return False
    # Protobuf accepts some arbitrary bytes as an empty message: a real model has a graph.
    return model.ir_version > 0 and len(model.graph.node) > 0


@dataclass(frozen=True)
class OnnxModelInfo:
    """Facts about an ONNX file that runners and reports need.

    Attributes:
        path: the file.
        precision: "int8" when the graph holds Q/DQ or QLinearConv/QLinearMatMul nodes, else the
            float type of its first input ("fp32", "fp16", "bf16").
        metadata: the model's ``metadata_props`` as a dict of strings.
        normalization: {"mean": [...], "std": [...]} from the metadata, or None.
        opset: the default-domain opset version.
        only_engine: "ort" when the graph imports ONNX Runtime's contrib ops (``com.microsoft``, as
            ``fatq-export --format onnx-ort`` files do), "openvino" when it imports OpenVINO's
            (``org.openvinotoolkit``, ``--format onnx-openvino``): no other engine reads them. None
            for a standard ONNX graph.
    """

    path: Path
    precision: str
    metadata: dict = field(default_factory=dict)
    normalization: dict | None = None
    opset: int | None = None
    only_engine: str | None = None


def read_onnx_info(path: str | Path) -> OnnxModelInfo:
    """Read an ONNX file's precision, metadata and normalization (without external weights)."""
    import onnx

    path = Path(path)
    if detect_model_kind(path) != ONNX:
        raise FatqError(f"{path} is not an ONNX model.")
    model = onnx.load_model(str(path), load_external_data=False)
    ops = {node.op_type for node in model.graph.node}
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    elem_type = inputs[0].type.tensor_type.elem_type if inputs else 1
    precision = "int8" if ops & INT8_OPS else _FLOAT_PRECISION.get(elem_type, "fp32")
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    only_engine = next((ENGINE_DOMAINS[o.domain] for o in model.opset_import if o.domain in ENGINE_DOMAINS), None)
    normalization = normalization_from_metadata(metadata, path)
    return OnnxModelInfo(path, precision, metadata, normalization, opset, only_engine)


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
