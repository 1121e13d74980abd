"""OpenVINO runner: reads a (QDQ) ONNX file or an OpenVINO IR (``.xml`` + ``.bin``) and runs it on the CPU plugin.

OpenVINO runs the float parts of a model in bf16 on CPUs with AVX-512 BF16/AMX unless told
otherwise (DEPLOY.md), which changes both speed and numbers. This runner therefore always sets
``INFERENCE_PRECISION_HINT``: ``f32`` by default (labelled "fp32", or "int8" for a QDQ graph,
whose float parts then stay f32) and ``bf16`` only when asked (labelled "bf16"). The compiled
model's actual inference precision and whether the CPU has native BF16 are reported in
:meth:`OpenVinoRunner.info`.

Each batch size gets its own compiled model with a static input shape (what OpenVINO's
benchmark_app does with ``-shape``): dynamic shapes cost speed on the CPU plugin. Compilation
happens on the first :meth:`infer` of a new shape, so benchmarks must warm up per shape.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from engines.host import cpu_device
from engines.model_files import OPENVINO_IR, ModelFile, inspect_model, ir_weights_path, onnx_model_file
from engines.runner import Runner, RunnerInfo, TensorMeta
from fatq.errors import FatqError
from fatq.extras import import_extra

PRECISION_HINTS = {"f32": "fp32", "bf16": "bf16"}
# the location lines OpenVINO puts before its reason ("Exception from src/...:84:", "Check 'x' failed at ...:")
_LOCATION_LINE = re.compile(r"^(Exception from \S+:\d+:|Check '.*' failed at \S+:\d+:)$")


def openvino_reason(exc: BaseException) -> str:
    """OpenVINO's message without its source-location lines, on one line (the reason is in the later lines)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    reason = " ".join(line for line in lines if line and not _LOCATION_LINE.match(line))
    return reason.rstrip(".") or type(exc).__name__


@functools.lru_cache(maxsize=1)
def openvino_core():
    """The process's one ``openvino.Core``, kept until the process exits; every OpenVINO use in fatq takes it.

    Why one: OpenVINO's CPU plugin (2026.4.1, measured) installs a signal stack (``sigaltstack``) on the
    thread that compiles a model and, when its Core goes away, restores the stack that was installed
    before it. Two Cores released in creation order therefore leave the thread's signal stack pointing
    at freed memory, and the next signal with a Python handler (Python installs its handlers with
    ``SA_ONSTACK``; PyTorch's DataLoader installs one for SIGCHLD) writes its frame there: heap
    corruption, then a segmentation fault far away. A single Core that is never released avoids it.
    """
    return import_extra("openvino").Core()


def _model_file(model) -> ModelFile:
    """An OpenVINO IR's ModelFile as given, else the ONNX model's (see ``onnx_model_file``)."""
    if isinstance(model, (str, Path)):
        model = inspect_model(model)
    return model if isinstance(model, ModelFile) and model.kind == OPENVINO_IR else onnx_model_file(model)


class OpenVinoRunner(Runner):
    """An ONNX model or an OpenVINO IR compiled by OpenVINO for the CPU.

    Args:
        model: ONNX file (QDQ int8 or float) or OpenVINO IR ``.xml`` (its ``.bin`` beside it), its
            :class:`~engines.model_files.ModelFile`, or an ``onnx.ModelProto`` / its bytes (read from memory).
        threads: ``INFERENCE_NUM_THREADS``; None lets OpenVINO choose.
        precision_hint: "f32" (default) or "bf16" for the float parts of the model; "bf16" is
            refused for QDQ graphs (their label would not say what ran).
        name: label used in errors and reports (default: the file name).
    """

    def __init__(
        self,
        model: str | Path | ModelFile | bytes,
        threads: int | None = None,
        precision_hint: str = "f32",
        name: str | None = None,
    ):
        model_file = _model_file(model)
        super().__init__(name or model_file.path.name)
        if precision_hint not in PRECISION_HINTS:
            raise FatqError(
                f"OpenVINO precision hint must be one of {sorted(PRECISION_HINTS)}, got {precision_hint!r}."
            )
        if threads is not None and threads < 1:
            raise FatqError(f"threads must be at least 1, got {threads}.")
        self.model_file = model_file
        if precision_hint == "bf16" and model_file.precision == "int8":
            raise FatqError(f"{model_file.path.name} is a QDQ int8 graph; the bf16 mode applies to float models only.")
        self.threads = threads
        self.precision_hint = precision_hint
        self._ov = None
        self._core = None
        self._model = None
        # input shapes -> (compiled model, infer request, [(output port, the names it is returned under)])
        self._compiled: dict[tuple, tuple] = {}

    def _activate(self) -> None:
        ov = import_extra("openvino")
        self._core = openvino_core()
        source = self.model_file
        try:
            if source.kind == OPENVINO_IR:
                self._model = self._core.read_model(str(source.path), str(ir_weights_path(source.path)))
            else:
                self._model = self._core.read_model(source.source)
        except Exception as exc:  # OpenVINO raises RuntimeError; its frontends may raise others
            raise FatqError(f"OpenVINO cannot read {source.path.name}: {openvino_reason(exc)}.") from None
        self._ov = ov

    def _config(self) -> dict:
        config = {
            "INFERENCE_PRECISION_HINT": self.precision_hint,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = self.threads
        return config

    def _compiled_for(self, feeds: dict[str, np.ndarray]) -> tuple:
        key = tuple((name, feeds[name].shape) for name in sorted(feeds))
        if key not in self._compiled:
            model = self._model.clone()
            try:
                model.reshape({name: list(shape) for name, shape in key})
                compiled = self._core.compile_model(model, "CPU", self._config())
            except Exception as exc:  # bad weights, unsupported layers: found at compile time
                raise FatqError(
                    f"OpenVINO cannot compile {self.model_file.path.name}: {openvino_reason(exc)}."
                ) from None
            self._compiled[key] = (compiled, compiled.create_infer_request(), self._output_names(compiled))
        return self._compiled[key]

    def _output_names(self, compiled) -> list[tuple]:
        """(port, names) for each output of ``compiled``: the model's own output names the port carries.

        OpenVINO merges identical nodes (two DequantizeLinear of one tensor), and the compiled port then carries
        every merged tensor's name, ``get_any_name()`` perhaps another's: keyed by the model's declared names
        (each, where outputs merged), every graph output is found by its own name.
        """
        declared = {port.get_any_name() for port in self._model.outputs}
        return [(port, sorted(declared & set(port.get_names())) or [port.get_any_name()]) for port in compiled.outputs]

    def _input_metadata(self) -> dict[str, TensorMeta]:
        meta = {}
        for port in self._model.inputs:
            shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
            meta[port.get_any_name()] = TensorMeta(np.dtype(port.get_element_type().to_dtype()), shape)
        return meta

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {name: feeds[name] for name in self._input_metadata()}
        _, request, output_names = self._compiled_for(inputs)
        results = request.infer(inputs)
        outputs = {}
        for port, names in output_names:
            # The request reuses its output buffers: copy before the next call overwrites them.
            outputs.update(dict.fromkeys(names, np.array(results[port], copy=True)))
        return outputs

    def _close(self) -> None:
        self._compiled.clear()
        self._model = None
        self._core = None

    def compiled_inference_precision(self) -> str | None:
        """The inference precision OpenVINO reports for the compiled models ("f32", "bf16"), if compiled."""
        for compiled, *_ in self._compiled.values():
            value = compiled.get_property("INFERENCE_PRECISION_HINT")
            return value.get_type_name() if hasattr(value, "get_type_name") else str(value)
        return None

    def cpu_has_native_bf16(self) -> bool:
        """Whether the CPU plugin lists BF16 among its optimization capabilities."""
        core = self._core or openvino_core()
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")

    def info(self) -> RunnerInfo:
        ov = self._ov or import_extra("openvino")
        model_precision = self.model_file.precision
        label = "int8" if model_precision == "int8" else PRECISION_HINTS[self.precision_hint]
        return RunnerInfo(
            engine="openvino",
            engine_version=ov.get_version(),
            device=cpu_device(),
            precision=label,
            threads=self.threads,
            options={
                "inference_precision_hint": self.precision_hint,
                "compiled_inference_precision": self.compiled_inference_precision(),
                "cpu_native_bf16": self.cpu_has_native_bf16(),
                "performance_hint": "LATENCY",
                "static_shapes": True,
            },
        )
