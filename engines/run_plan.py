"""Which (model, engine, precision) combinations a benchmark runs, their labels, and their runners.

What each engine runs is its entry in :data:`engines.registry.ENGINES` (model kinds, extra
precisions for float models, custom ops); this module only combines them.

Labels key the report's ``accuracy`` and ``agreement`` maps: the engine name when every
engine runs once, ``ENGINE:PRECISION`` when that is unique, else ``MODEL:ENGINE:PRECISION``
(MODEL = the file name without its suffix).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engines.model_files import KIND_ARTICLES, KIND_NAMES, TRT_PLAN, ModelFile
from engines.registry import ENGINES, RunnerOptions
from engines.runner import Runner
from fatq.errors import FatqError


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


def _unsupported(model: ModelFile, engine: str, precision: str) -> str | None:
    """Why ``engine`` cannot run ``model`` at ``precision``, or None if it can."""
    spec = ENGINES[engine]
    if model.kind not in spec.kinds:
        wanted = " or ".join(KIND_NAMES[k] for k in spec.kinds)
        return f"{engine} runs {wanted}; {model.path.name} is {KIND_ARTICLES[model.kind]}"
    if model.only_engine not in (None, engine):
        uses = ENGINES[model.only_engine].custom_ops
        return f"{model.path.name} uses {uses}; only engine {model.only_engine} runs it"
    native = model.precision
    if precision == native:
        return None
    if native == "int8":
        return f"{model.path.name} is an int8 (QDQ/quantized) model; it runs only as int8"
    if model.kind == TRT_PLAN:
        return f"a TensorRT plan runs the precision it was built with ({native})"
    extra = spec.float_precisions
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


def make_runner(spec: RunSpec, options: RunnerOptions) -> Runner:
    """The (inactive) runner of one configuration (its engine's factory, :mod:`engines.registry`)."""
    return ENGINES[spec.engine].factory(spec.model, spec.precision, options, spec.label)
