"""Which (model, engine, precision) combinations a benchmark runs, their labels, and their runners.

Engines (as given to ``fatq-bench --engine``):

=============  ============================  =========================================
engine         model kinds                   precisions
=============  ============================  =========================================
ort            ONNX                          the graph's own (int8 for QDQ or onnx-ort, else fp32)
ort-cuda       ONNX (onnxruntime-gpu)        the graph's own
ort-trt        ONNX (onnxruntime-gpu)        the graph's own (TensorRT EP)
openvino       ONNX                          int8 (QDQ, onnx-openvino); fp32 (forced f32) or bf16 (float)
trt            ONNX (built here) or a plan   int8 (QDQ); fp32 or fp16 (float); a plan's own
torch          fatq checkpoint               int8 (quantized, fake-quant) or fp32
torch-cuda     fatq checkpoint               as torch, plus fp16 for FP32 checkpoints
=============  ============================  =========================================

Labels key the report's ``accuracy`` and ``agreement`` maps: the engine name when every
engine runs once, ``ENGINE:PRECISION`` when that is unique, else ``MODEL:ENGINE:PRECISION``
(MODEL = the file name without its suffix).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engines.model_files import CHECKPOINT, ONNX, TRT_PLAN, detect_model_kind, read_onnx_info
from engines.runner import Runner
from fatq.errors import FatqError

ENGINES = ("ort", "ort-cuda", "ort-trt", "openvino", "trt", "torch", "torch-cuda")
PRECISIONS = ("int8", "fp16", "fp32", "bf16")


# the custom ops of an engine-specific ONNX file (ModelFile.only_engine), for skip reasons
_ENGINE_OPS = {
    "ort": "ONNX Runtime's CPU contrib ops (an onnx-ort export)",
    "openvino": "OpenVINO's own ops (an onnx-openvino export)",
}


@dataclass(frozen=True)
class ModelFile:
    """One MODEL argument: its path, kind and native precision."""

    path: Path
    kind: str
    precision: str
    only_engine: str | None = None  # the one engine that reads its custom ops (onnx-ort, onnx-openvino files)

    @property
    def stem(self) -> str:
        return self.path.name.split(".")[0]


@dataclass(frozen=True)
class RunSpec:
    """One configuration to benchmark."""

    model: ModelFile
    engine: str
    precision: str
    label: str = ""


@dataclass(frozen=True)
class Skipped:
    """A requested combination that cannot run, and why."""

    model: str
    engine: str
    precision: str
    reason: str

    def to_dict(self) -> dict:
        return {"model": self.model, "engine": self.engine, "precision": self.precision, "reason": self.reason}


def inspect_model(path: str | Path) -> ModelFile:
    """Detect a MODEL argument's kind and native precision."""
    path = Path(path)
    kind = detect_model_kind(path)
    if kind == ONNX:
        info = read_onnx_info(path)
        return ModelFile(path, kind, info.precision, info.only_engine)
    if kind == TRT_PLAN:
        from engines.trt_builder import read_sidecar

        precision = read_sidecar(path)["precision"]
    else:
        from engines.torch_runner import checkpoint_is_float
        from fatq.checkpoint import load_fatq_checkpoint

        precision = "fp32" if checkpoint_is_float(load_fatq_checkpoint(path)) else "int8"
    return ModelFile(path, kind, precision)


KIND_NAMES = {ONNX: "ONNX files", TRT_PLAN: "TensorRT plans", CHECKPOINT: "fatq checkpoints"}
KIND_ARTICLES = {ONNX: "an ONNX file", TRT_PLAN: "a TensorRT plan", CHECKPOINT: "a fatq checkpoint"}


def _unsupported(model: ModelFile, engine: str, precision: str) -> str | None:
    """Why ``engine`` cannot run ``model`` at ``precision``, or None if it can."""
    kinds = {"torch": (CHECKPOINT,), "torch-cuda": (CHECKPOINT,), "trt": (ONNX, TRT_PLAN)}.get(engine, (ONNX,))
    if model.kind not in kinds:
        wanted = " or ".join(KIND_NAMES[k] for k in kinds)
        return f"{engine} runs {wanted}; {model.path.name} is {KIND_ARTICLES[model.kind]}"
    if model.only_engine not in (None, engine):
        uses = _ENGINE_OPS[model.only_engine]
        return f"{model.path.name} uses {uses}; only engine {model.only_engine} runs it"
    native = model.precision
    if precision == native:
        return None
    if native == "int8":
        return f"{model.path.name} is an int8 (QDQ/quantized) model; it runs only as int8"
    if model.kind == TRT_PLAN:
        return f"a TensorRT plan runs the precision it was built with ({native})"
    extra = {"openvino": ("bf16",), "trt": ("fp16",), "torch-cuda": ("fp16",)}.get(engine, ())
    if native == "fp32" and precision in extra:
        return None
    options = " or ".join((native, *extra))
    return f"{engine} runs the {native} model {model.path.name} as {options}, not {precision}"


def plan_runs(
    models: list[ModelFile], engines: list[str], precisions: list[str] | None
) -> tuple[list[RunSpec], list[Skipped]]:
    """Every runnable (model, engine, precision), labelled; plus the skipped combinations.

    Args:
        models: inspected MODEL arguments.
        engines: engine names in the order given.
        precisions: requested precisions, or None for each model's native one.
    """
    for engine in engines:
        if engine not in ENGINES:
            raise FatqError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}.")
    specs, skipped = [], []
    for engine in dict.fromkeys(engines):
        for model in models:
            for precision in dict.fromkeys(precisions or [model.precision]):
                reason = _unsupported(model, engine, precision)
                if reason:
                    skipped.append(Skipped(str(model.path), engine, precision, reason))
                else:
                    specs.append(RunSpec(model, engine, precision))
    if not specs:
        details = "; ".join(f"{s.engine} on {Path(s.model).name} as {s.precision}: {s.reason}" for s in skipped[:3])
        raise FatqError(f"no requested engine can run the given models ({details}).")
    return _labelled(specs), skipped


def _labelled(specs: list[RunSpec]) -> list[RunSpec]:
    def unique(keys: list) -> bool:
        return len(set(keys)) == len(keys)

    if unique([s.engine for s in specs]):
        labels = [s.engine for s in specs]
    elif unique([(s.engine, s.precision) for s in specs]):
        labels = [f"{s.engine}:{s.precision}" for s in specs]
    else:
        labels = [f"{s.model.stem}:{s.engine}:{s.precision}" for s in specs]
    if not unique(labels):  # two MODEL files with the same stem in different directories
        labels = [f"{s.model.path}:{s.engine}:{s.precision}" for s in specs]
    return [RunSpec(s.model, s.engine, s.precision, label) for s, label in zip(specs, labels, strict=True)]


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


def make_runner(spec: RunSpec, options: RunnerOptions) -> Runner:
    """The (inactive) runner of one configuration."""
    path, engine, name = spec.model.path, spec.engine, spec.label
    if engine.startswith("ort"):
        from engines.ort_runner import OrtRunner

        provider = {"ort": "cpu", "ort-cuda": "cuda", "ort-trt": "trt"}[engine]
        return OrtRunner(path, threads=options.threads, provider=provider, name=name)
    if engine == "openvino":
        from engines.openvino_runner import OpenVinoRunner

        return OpenVinoRunner(
            path, threads=options.threads, precision_hint="bf16" if spec.precision == "bf16" else "f32", name=name
        )
    if engine == "trt":
        from engines.trt_builder import BuildSettings, build_engine_cached
        from engines.trt_runner import TrtRunner

        plan = path
        if spec.model.kind == ONNX:
            settings = BuildSettings(
                precision=spec.precision,
                min_batch=1,
                opt_batch=options.opt_batch,
                max_batch=options.max_batch,
                typing=options.trt_typing,
                workspace_mib=options.trt_workspace_mib,
            )
            plan = build_engine_cached(path, settings)
        return TrtRunner(plan, name=name)
    from engines.torch_runner import TorchRunner

    return TorchRunner.from_checkpoint(
        path,
        mode=options.torch_mode,
        device="cuda" if engine == "torch-cuda" else "cpu",
        threads=options.threads,
        half=spec.precision == "fp16",
        name=name,
    )
