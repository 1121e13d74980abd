"""The output formats of ``fatq-export``: one record each, and :func:`format_of` to recognise a file.

Everything the exporter, the linter, ``--check`` and ``fatq-bench`` need to know about a format is
in its :class:`OutputFormat` entry of :data:`FORMATS`; adding a format is adding one entry (and
its writer). A written file records its format's ``metadata_tag`` in ``metadata_props["format"]``;
:func:`format_of` reads it back.

The portable file ``--format onnx`` *is* the TensorRT file (a choice, not a separate
``onnx-trt``): TensorRT's ONNX parser is the strictest of the three engines, so the one file it
accepts is written for it — float32 Conv/Gemm biases (never a DequantizeLinear of int32), int8
DequantizeLinear inputs, zero zero points, float32 constant scales and Clip bounds, no uint8,
opset 20 — and ONNX Runtime and OpenVINO read the same file. Its biases are the trained float
biases, which TensorRT and OpenVINO add in float (its ``.reference.pt`` is that model); ONNX
Runtime rounds them to int32 itself and so computes the int32-bias model of the same deploy graph,
which ``--check`` compares it with (the ``onnx-ort`` file is the exact answer for ONNX Runtime).
The exporter refuses to write it unless :func:`export.lint_rules.assert_clean` finds nothing
against the TensorRT rules (target ``"trt"``, :attr:`OutputFormat.lint_target`).
The engine-specific files keep their own forms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from export.deploy_graph import DeployGraph
from export.float_writer import write_float
from export.openvino_writer import METADATA_KEY as OPENVINO_KEY
from export.openvino_writer import OPENVINO_DOMAIN, write_openvino
from export.ort_writer import METADATA_KEY as ORT_KEY
from export.ort_writer import MS_DOMAIN, write_ort
from export.qdq_writer import write_qdq

DEPLOY_GRAPH = ".deploy.npz"  # the folded deploy graph the file was written from (export.deploy_graph)
REFERENCE = ".reference.pt"  # the PyTorch model an engine-exact int8 file computes (export.engine_exact)
# the fatq-bench engines (engines.registry; tests/export/test_formats.py keeps the two in step) that read standard ONNX
PORTABLE_ENGINES = ("ort", "ort-cuda", "ort-trt", "openvino", "trt")


@dataclass(frozen=True)
class OutputFormat:
    """One ``--format`` of fatq-export.

    Attributes:
        name: the ``--format`` value.
        suffix: the default output suffix (beside the checkpoint: ``<stem><suffix>``).
        metadata_tag: the ``format`` entry of the file's ``metadata_props``.
        int8: written from the lowered (integer) graph; else from the folded float graph.
        writer: ``(graph, opset=, metadata=) -> onnx.ModelProto``.
        engines: the fatq-bench engines that read it (one: the file uses that engine's own ops).
        check_engine: the engine ``fatq-export --check`` runs it in.
        purpose: None for a portable file (DEPLOY.md's rules apply and are enforced on export);
            for an engine-specific one, what it is for (the lint note: the rules do not apply).
        domain: the custom op domain the writer imports (recognises files without a tag).
        writer_key: the ``metadata_props`` entry the writer always adds (recognises its files without a
            tag even when no node needed the custom domain, e.g. a VGG without residual Adds).
        bias_arithmetic: how the engines the file is written for add a conv's bias (:mod:`export.reference`):
            "float" (TensorRT, OpenVINO: the trained float bias, after the dequantized accumulator) or
            "int32" (ONNX Runtime's kernels); its ``.reference.pt`` is the model computed that way.
    """

    name: str
    suffix: str
    metadata_tag: str
    int8: bool
    writer: Callable[..., onnx.ModelProto]
    engines: tuple[str, ...]
    check_engine: str
    purpose: str | None = None
    domain: str | None = None
    writer_key: str | None = None
    bias_arithmetic: str = "int32"

    @property
    def only_engine(self) -> str | None:
        """The one engine that reads this format's custom ops, or None for a portable format."""
        return self.engines[0] if len(self.engines) == 1 else None

    @property
    def lint_target(self) -> str | None:
        """The :mod:`export.lint_rules` target a file must pass before it is written: "trt" for the
        portable formats (the strictest reader), None for an engine-specific one (its own ops by design)."""
        return "trt" if self.purpose is None else None

    @property
    def companions(self) -> tuple[str, ...]:
        """Suffixes of the files written beside it: the deploy graph, and for an int8 format the
        ``.reference.pt`` (unless exported as trained, see :mod:`export.engine_exact`)."""
        return (DEPLOY_GRAPH, REFERENCE) if self.int8 else (DEPLOY_GRAPH,)

    def write(self, graph: DeployGraph, opset: int, metadata: dict) -> onnx.ModelProto:
        return self.writer(graph, opset=opset, metadata=metadata)


_ORT_KERNELS = "ONNX Runtime's CPU kernels (uint8, zero points, com.microsoft ops)"
_OPENVINO_OPS = "OpenVINO (its FakeQuantize op)"
# name, suffix, metadata tag, int8, writer, engines, check engine, purpose, custom op domain
FORMATS: dict[str, OutputFormat] = {
    f.name: f
    for f in (
        # the TensorRT file, read by every portable engine (module docstring)
        OutputFormat("onnx", ".onnx", "qdq-int8", True, write_qdq, PORTABLE_ENGINES, "ort", bias_arithmetic="float"),
        OutputFormat(
            "onnx-ort", ".ort.onnx", "ort-uint8", True, write_ort, ("ort",), "ort", _ORT_KERNELS, MS_DOMAIN, ORT_KEY
        ),
        OutputFormat(
            "onnx-openvino",
            ".ov.onnx",
            "openvino-fq",
            True,
            write_openvino,
            ("openvino",),
            "openvino",
            _OPENVINO_OPS,
            OPENVINO_DOMAIN,
            OPENVINO_KEY,
            bias_arithmetic="float",
        ),
        OutputFormat("onnx-fp32", ".fp32.onnx", "fp32", False, write_float, PORTABLE_ENGINES, "ort"),
    )
}


def companion_path(onnx_path: str | Path, suffix: str) -> Path:
    """A file written beside an export: ``model.onnx`` + ``.deploy.npz`` -> ``model.deploy.npz``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.stem + suffix)


def format_of(model: onnx.ModelProto) -> OutputFormat | None:
    """The format a model was written in: its recorded ``format`` tag, else (a file without one,
    e.g. not from fatq-export) the format whose custom op domain one of its nodes uses, or whose writer's
    own metadata entry it carries; None for a standard ONNX graph that records no fatq format.

    Node domains, not opset imports: tools import domains they never use (ONNX Runtime's
    ``quant_pre_process`` adds ``com.microsoft`` to every file it writes)."""
    tag = next((entry.value for entry in model.metadata_props if entry.key == "format"), None)
    for fmt in FORMATS.values():
        if tag == fmt.metadata_tag:
            return fmt
    domains = {node.domain for node in model.graph.node}
    keys = {entry.key for entry in model.metadata_props}
    return next(
        (fmt for fmt in FORMATS.values() if fmt.domain and (fmt.domain in domains or fmt.writer_key in keys)), None
    )
