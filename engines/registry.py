"""The engines of fatq-bench and fatq-export --check: one :class:`EngineSpec` each in :data:`ENGINES`.

=============  ============================  =========================================
engine         model kinds                   precisions
=============  ============================  =========================================
ort            ONNX                          the graph's own (int8 for QDQ or onnx-ort, else fp32)
ort-cuda       ONNX (onnxruntime-gpu)        the graph's own
ort-trt        ONNX (onnxruntime-gpu)        the graph's own (TensorRT EP)
openvino       ONNX or an OpenVINO IR        int8 (QDQ, onnx-openvino, FakeQuantize IR); fp32 (forced f32) or bf16
trt            ONNX (built here) or a plan   int8 (QDQ); fp32 or fp16 (float); a plan's own
torch          fatq checkpoint               int8 (quantized, fake-quant) or fp32
torch-cuda     fatq checkpoint               as torch, plus fp16 for FP32 checkpoints
=============  ============================  =========================================

Adding an engine is one entry here (and its :class:`~engines.runner.Runner`): the planner
(:mod:`engines.run_plan`), the CLI choices and the skip reasons read this table. Runner modules
are imported inside the factories, so this table imports no engine package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engines.model_files import CHECKPOINT, ONNX, OPENVINO_IR, TRT_PLAN, ModelFile
from engines.runner import Runner

PRECISIONS = ("int8", "fp16", "fp32", "bf16")


@dataclass(frozen=True)
class RunnerOptions:
    """Settings shared by every runner of one benchmark.

    Attributes:
        threads: CPU threads per engine (None: the engine's default).
        torch_mode: "eval" or "deploy" for the torch engines.
        max_batch: the largest batch any run will feed (TensorRT optimization profile).
        opt_batch: the batch TensorRT tunes for.
        trt_typing: "auto", "strong" or "weak" (see :mod:`engines.trt_builder`).
        trt_workspace_mib: TensorRT builder workspace limit.
    """

    threads: int | None = None
    torch_mode: str = "eval"
    max_batch: int = 64
    opt_batch: int = 64
    trt_typing: str = "auto"
    trt_workspace_mib: int = 1024


# factory(model, precision, options, name) -> an inactive runner
RunnerFactory = Callable[[ModelFile, str, RunnerOptions, str], Runner]


@dataclass(frozen=True)
class EngineSpec:
    """One engine.

    Attributes:
        name: the ``--engine`` value.
        kinds: the model kinds it runs.
        float_precisions: precisions it can run an fp32 model at besides fp32 itself.
        default_for: the model kinds it is fatq-bench's default engine for.
        package: the Python package it runs on (reports name it, e.g. ``onnxruntime_version``).
        factory: builds the runner of one (model, precision).
        custom_ops: for an engine that has its own ONNX ops (an engine-specific export), what they
            are, for the reason other engines skip such a file.
        bias_arithmetic: how it adds a QDQ conv's float bias (:mod:`export.reference`): "int32"
            (ONNX Runtime's CPU kernels round it to int32 at s_x · s_w and add it to the accumulator)
            or "float" (added to the dequantized accumulator: TensorRT by its documentation, OpenVINO
            measured); None for engines that run checkpoints. The integer model an engine computes
            on a file is the file's deploy graph replayed with this arithmetic.
    """

    name: str
    kinds: tuple[str, ...]
    float_precisions: tuple[str, ...]
    default_for: tuple[str, ...]
    package: str
    factory: RunnerFactory
    custom_ops: str | None = None
    bias_arithmetic: str | None = None


def _ort(provider: str) -> RunnerFactory:
    def make(model: ModelFile, precision: str, options: RunnerOptions, name: str) -> Runner:
        from engines.ort_runner import OrtRunner

        return OrtRunner(model, threads=options.threads, provider=provider, name=name)

    return make


def _openvino(model: ModelFile, precision: str, options: RunnerOptions, name: str) -> Runner:
    from engines.openvino_runner import OpenVinoRunner

    hint = "bf16" if precision == "bf16" else "f32"
    return OpenVinoRunner(model, threads=options.threads, precision_hint=hint, name=name)


def _trt(model: ModelFile, precision: str, options: RunnerOptions, name: str) -> Runner:
    from engines.trt_builder import BuildSettings, build_engine_cached
    from engines.trt_runner import TrtRunner

    plan = model.path
    if model.kind == ONNX:
        settings = BuildSettings(
            precision=precision,
            min_batch=1,
            opt_batch=options.opt_batch,
            max_batch=options.max_batch,
            typing=options.trt_typing,
            workspace_mib=options.trt_workspace_mib,
        )
        plan = build_engine_cached(model.path, settings)
    return TrtRunner(plan, name=name)


def _torch(device: str) -> RunnerFactory:
    def make(model: ModelFile, precision: str, options: RunnerOptions, name: str) -> Runner:
        from engines.torch_runner import TorchRunner

        return TorchRunner.from_checkpoint(
            model.path,
            mode=options.torch_mode,
            device=device,
            threads=options.threads,
            half=precision == "fp16",
            name=name,
        )

    return make


ENGINES: dict[str, EngineSpec] = {
    e.name: e
    for e in (
        EngineSpec(
            "ort",
            (ONNX,),
            (),
            (ONNX,),
            "onnxruntime",
            _ort("cpu"),
            custom_ops="ONNX Runtime's CPU contrib ops (an onnx-ort export)",
            bias_arithmetic="int32",
        ),
        # assumed, not run here (no GPU): the CUDA and TensorRT providers add the bias in float
        EngineSpec("ort-cuda", (ONNX,), (), (), "onnxruntime", _ort("cuda"), bias_arithmetic="float"),
        EngineSpec("ort-trt", (ONNX,), (), (), "onnxruntime", _ort("trt"), bias_arithmetic="float"),
        EngineSpec(
            "openvino",
            (ONNX, OPENVINO_IR),
            ("bf16",),
            (OPENVINO_IR,),
            "openvino",
            _openvino,
            custom_ops="OpenVINO's own ops (an onnx-openvino export)",
            bias_arithmetic="float",
        ),
        EngineSpec("trt", (ONNX, TRT_PLAN), ("fp16",), (TRT_PLAN,), "tensorrt", _trt, bias_arithmetic="float"),
        EngineSpec("torch", (CHECKPOINT,), (), (CHECKPOINT,), "torch", _torch("cpu")),
        EngineSpec("torch-cuda", (CHECKPOINT,), ("fp16",), (), "torch", _torch("cuda")),
    )
}


def reference_mode(file_bias_arithmetic: str | None, engine: str) -> str:
    """The fatq-bench ``--reference-mode`` that compares ``engine`` with the model it computes on a file
    whose ``.reference.pt`` is given: "deploy" (int32 biases) for an int32 engine on a float-bias file (ONNX
    Runtime on the TensorRT file rounds its float biases itself), else "eval"."""
    computes = ENGINES[engine].bias_arithmetic
    return "deploy" if file_bias_arithmetic == "float" and computes == "int32" else "eval"


def default_engine(model: ModelFile) -> str:
    """fatq-bench's engine for ``model`` when no ``--engine`` is given."""
    return next(e.name for e in ENGINES.values() if model.kind in e.default_for)
