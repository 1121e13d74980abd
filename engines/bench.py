"""The benchmark behind ``fatq-bench``: latency, accuracy and agreement of several runs side by side.

One call of :func:`run_benchmark`:

1. plans the (model, engine, precision) runs (:mod:`engines.run_plan`) and activates their runners;
2. builds the evaluation inputs: the test split of ``data_dir`` (normalized with each model's own
   normalization from ONNX ``metadata_props``, the IR's ``rt_info``, the checkpoint or the plan
   sidecar; for a file that records none, the ``--mean/--std`` given, else the reference
   checkpoint's) or, without data, seeded random images;
3. runs every runner and the reference model (a fatq checkpoint in eval mode) over those inputs:
   top-1/top-5 and agreement with the reference;
4. times every runner at every batch size it accepts, interleaved (:mod:`engines.timing`); a file
   with a fixed batch runs at that batch only (the other batch sizes are listed under ``skipped``);
5. returns the report dict documented in ``docs/bench_schema.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engines.gate import evaluate_gate
from engines.host import cpu_name
from engines.model_files import CHECKPOINT, ONNX, OPENVINO_IR, ModelFile, inspect_model, normalization_from_metadata
from engines.registry import ENGINES, RunnerOptions, reference_mode
from engines.run_plan import RunSpec, Skipped, make_runner, plan_runs
from engines.runner import Runner
from engines.timing import time_interleaved
from fatq.errors import FatqError
from fatq.io import progress
from fatq.metrics import agreement, topk_accuracy
from fatq.provenance import __version__, git_commit, sha256_file

SCHEMA = "fatq-bench"
SCHEMA_VERSION = 1
RANDOM_SAMPLES = 256
FLOAT_PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class BenchSettings:
    """What to measure (see ``fatq-bench --help`` for each field's flag).

    Attributes:
        batch_sizes: batch sizes to time.
        warmup: untimed calls per runner and batch size.
        iterations: timed calls per runner and batch size.
        rounds: turns the iterations are split into (interleaving).
        threads: CPU threads per engine.
        data_dir: evaluation data (test split), or None for random inputs.
        dataset: "cifar10" or "imagefolder".
        limit: evaluate on this many test images (evenly spaced), or all.
        reference: fatq checkpoint to measure agreement against, or None.
        reference_mode: "eval" compares with the trained fake-quant model (float BN and bias);
            "deploy" with export's deploy reference of the same checkpoint (engine integer
            semantics: int32 bias, requantization), which integer engines should match bit for bit.
        min_agreement: gate bound on top-1 agreement (%), or None.
        max_accuracy_drop: gate bound on the top-1 drop against the reference (points), or None.
        runner_options: torch mode and TensorRT build settings.
        normalization: {"mean", "std"} for model files that record none (``--mean/--std``), or None.
    """

    batch_sizes: tuple[int, ...] = (1, 8, 64)
    warmup: int = 10
    iterations: int = 50
    rounds: int = 5
    threads: int | None = None
    data_dir: Path | None = None
    dataset: str = "cifar10"
    limit: int | None = None
    reference: Path | None = None
    reference_mode: str = "eval"
    min_agreement: float | None = None
    max_accuracy_drop: float | None = None
    runner_options: RunnerOptions = field(default_factory=RunnerOptions)
    normalization: dict | None = None


def model_normalization(spec: RunSpec) -> dict | None:
    """The normalization a model was trained with, as its file records it (None if it does not)."""
    if spec.model.kind in (ONNX, OPENVINO_IR):
        return spec.model.normalization
    if spec.model.kind == CHECKPOINT:
        from fatq.checkpoint import load_fatq_checkpoint

        return load_fatq_checkpoint(spec.model.path)["normalization"]
    from engines.trt_builder import read_sidecar

    return normalization_from_metadata(read_sidecar(spec.model.path).get("source_metadata", {}), spec.model.path)


def model_class_names(model: ModelFile) -> list[str] | None:
    """The class names a model file records (ONNX/IR metadata, a checkpoint's field), or None."""
    if model.kind == CHECKPOINT:
        from fatq.checkpoint import load_fatq_checkpoint

        return load_fatq_checkpoint(model.path).get("class_names")
    try:
        names = json.loads(model.metadata.get("class_names", "null"))
    except ValueError:
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def check_class_names(models: list[ModelFile], reference: tuple[str, dict] | None, eval_inputs: EvalInputs) -> None:
    """Refuse a dataset whose classes are not the ones a model (or the reference) was trained on.

    Top-1 against another labelling is meaningless: it reads as chance or 0 %. Names are compared
    in order (the class index is the position); files that record no names are not checked.

    Args:
        models: the MODEL files.
        reference: (file name, checkpoint dict) of ``--reference``, or None.
        eval_inputs: the loaded test split.
    """
    if eval_inputs.class_names is None:
        return
    recorded = [(m.path.name, model_class_names(m)) for m in models]
    if reference is not None:
        recorded.append((f"the reference {reference[0]}", reference[1].get("class_names")))
    for name, classes in recorded:
        if classes is not None and list(classes) != list(eval_inputs.class_names):
            shown = ", ".join(classes[:4]) + (", ..." if len(classes) > 4 else "")
            found = ", ".join(eval_inputs.class_names[:4]) + (", ..." if len(eval_inputs.class_names) > 4 else "")
            raise FatqError(
                f"{name} was trained on the classes [{shown}], but the data's test split has [{found}]; "
                "top-1 would compare unrelated labels."
            )


@dataclass
class EvalInputs:
    """Images every run is evaluated on: uint8 [N, C, H, W] and labels int64 [N] (None for random data)."""

    images: torch.Tensor
    labels: np.ndarray | None
    source: str
    class_names: list[str] | None = None

    def normalized(self, normalization: dict | None) -> np.ndarray:
        """float32 [N, C, H, W]: normalized images, or (random data, no normalization) N(0, 1) noise."""
        from fatq.data import normalize

        if normalization is None:
            if self.labels is not None:
                raise FatqError("internal: real data needs a normalization")  # checked by the caller
            generator = torch.Generator().manual_seed(1)
            return torch.randn(self.images.shape, generator=generator).numpy()
        return normalize(self.images, normalization["mean"], normalization["std"]).numpy()


def load_eval_inputs(settings: BenchSettings, sample_shape: tuple[int, int, int]) -> EvalInputs:
    """The test split (checked against the models' input shape) or seeded random images."""
    if settings.data_dir is None:
        count = settings.limit or RANDOM_SAMPLES
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (count, *sample_shape), generator=generator, dtype=torch.uint8)
        return EvalInputs(images, None, f"random uint8 images (seed 0, {count})")
    from fatq.data import load_split

    size = sample_shape[1] if settings.dataset == "imagefolder" and sample_shape[1] == sample_shape[2] else None
    split = load_split(settings.data_dir, "test", settings.dataset, image_size=size)
    if tuple(split.images.shape[1:]) != tuple(sample_shape):
        raise FatqError(
            f"the models expect inputs of shape {tuple(sample_shape)}, but the dataset's images are "
            f"{tuple(split.images.shape[1:])}."
        )
    images, labels = split.images, split.labels.numpy()
    if settings.limit is not None and settings.limit < len(labels):
        # Evenly spaced, not the first N: image folders are sorted by class.
        index = np.linspace(0, len(labels) - 1, settings.limit).round().astype(np.int64)
        images, labels = images[torch.from_numpy(index)], labels[index]
    return EvalInputs(images, labels, f"{settings.dataset} test split ({len(labels)} images)", split.class_names)


def predict(runner: Runner, inputs: np.ndarray, batch: int, on_batch=None) -> np.ndarray:
    """Logits [N, classes] of ``runner`` on float32 ``inputs`` [N, C, H, W], in batches of ``batch``.

    The last partial batch is padded with copies of its first image (engines with a fixed batch
    accept nothing else); the padding's outputs are dropped.
    """
    (name,) = runner.input_metadata()
    outputs = []
    for start in range(0, len(inputs), batch):
        chunk = inputs[start : start + batch]
        real = len(chunk)
        if real < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch - real, axis=0)])
        result = runner.infer({name: np.ascontiguousarray(chunk)})
        outputs.append(_logits(runner, result)[:real])
        if on_batch:
            on_batch()
    return np.concatenate(outputs).astype(np.float32)


def _logits(runner: Runner, result: dict[str, np.ndarray]) -> np.ndarray:
    if len(result) != 1:
        raise FatqError(f"{runner.name} has {len(result)} outputs {sorted(result)}; fatq-bench expects one (logits).")
    (logits,) = result.values()
    if logits.ndim != 2:
        raise FatqError(f"{runner.name} returns an output of shape {logits.shape}; expected logits [batch, classes].")
    return logits


def _input_shape(label: str, runner: Runner) -> tuple[int, int, int]:
    """The per-image shape [C, H, W] a runner takes."""
    metadata = runner.input_metadata()
    if len(metadata) != 1:
        raise FatqError(f"{label} has {len(metadata)} inputs; fatq-bench benchmarks single-input image classifiers.")
    (meta,) = metadata.values()
    sample = meta.sample_shape()
    if len(sample) != 3 or not all(isinstance(d, int) and d > 0 for d in sample):
        raise FatqError(f"{label} takes inputs of shape {meta.shape}; fatq-bench needs a fixed [batch, C, H, W] image.")
    return tuple(sample)


@dataclass(frozen=True)
class BatchPlan:
    """Which batch sizes each run is timed and evaluated at.

    Attributes:
        timed: {label: batch sizes} -- the requested ones it accepts, or its fixed batch.
        eval_batch: {label: batch} for accuracy and agreement (a fixed batch, else the largest timed).
        order: every batch size timed, requested ones first.
        skipped: the (run, batch size) pairs not timed, with the reason.
    """

    timed: dict[str, tuple[int, ...]]
    eval_batch: dict[str, int]
    order: tuple[int, ...]
    skipped: list[Skipped]


def plan_batches(specs: list[RunSpec], runners: dict[str, Runner], batch_sizes: tuple[int, ...]) -> BatchPlan:
    """Fit ``batch_sizes`` to each runner: a fixed batch runs at that batch only (requested or not),
    an engine with a largest batch (a TensorRT profile) skips the larger ones."""
    timed, eval_batch, skipped = {}, {}, []
    for spec in specs:
        runner = runners[spec.label]
        ((_, meta),) = runner.input_metadata().items()
        fixed, largest = meta.fixed_batch, runner.max_batch()
        if fixed is not None:
            accepted, why = (
                (fixed,),
                f"{spec.model.path.name} has a fixed batch of {fixed}; it runs at batch {fixed} only",
            )
        elif largest is not None:
            accepted = tuple(b for b in batch_sizes if b <= largest) or (largest,)
            why = f"{spec.label} accepts batches up to {largest}"
        else:
            accepted, why = batch_sizes, ""
        for batch in batch_sizes:
            if batch not in accepted:
                skipped.append(Skipped(str(spec.model.path), spec.engine, spec.precision, f"batch {batch}: {why}"))
        timed[spec.label], eval_batch[spec.label] = accepted, max(accepted)
    wanted = dict.fromkeys([*batch_sizes, *(b for batches in timed.values() for b in batches)])
    order = tuple(b for b in wanted if any(b in batches for batches in timed.values()))
    return BatchPlan(timed, eval_batch, order, skipped)


def _timing_feeds(runner: Runner, inputs: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    (name,) = runner.input_metadata()
    repeats = -(-batch // len(inputs))
    return {name: np.ascontiguousarray(np.concatenate([inputs] * repeats)[:batch])}


def _ratios(specs: list[RunSpec], runs: list[dict]) -> list[dict]:
    """int8 throughput over each float run of the same engine, per batch size."""
    by_label = {(r["label"], r["batch_size"]): r["throughput_ips"] for r in runs}
    ratios = []
    for quant in (s for s in specs if s.precision == "int8"):
        for base in (s for s in specs if s.engine == quant.engine and s.precision in FLOAT_PRECISIONS):
            for batch in sorted({r["batch_size"] for r in runs}):
                num, den = by_label.get((quant.label, batch)), by_label.get((base.label, batch))
                if num and den:
                    ratios.append(
                        {
                            "engine": quant.engine,
                            "kind": f"int8/{base.precision}",
                            "numerator": quant.label,
                            "denominator": base.label,
                            "batch_size": batch,
                            "throughput_ratio": num / den,
                        }
                    )
    return ratios


def _open_runners(stack: contextlib.ExitStack, specs: list[RunSpec], options: RunnerOptions) -> tuple:
    """Activate one runner per spec (closed by ``stack``); returns ({label: runner}, per-image shape)."""
    runners: dict[str, Runner] = {}
    for spec in specs:
        runner = make_runner(spec, options)
        stack.callback(runner.close)
        runners[spec.label] = runner.activate()
    shapes = {label: _input_shape(label, r) for label, r in runners.items()}
    if len(set(shapes.values())) > 1:
        raise FatqError(f"the models take different input shapes {shapes}; benchmark them separately.")
    return runners, next(iter(shapes.values()))


def _note_engine_exact_reference(models: list, settings: BenchSettings) -> None:
    """Say so when an int8 file computes a ``.reference.pt`` other than the ``--reference`` given."""
    if settings.reference is None or settings.reference_mode != "eval":
        return
    for model in models:
        if model.kind != ONNX:
            continue
        moved = model.metadata.get("bias_projection")
        if moved is None:
            continue
        computed = Path(model.path).with_name(json.loads(moved)["reference_checkpoint"])
        given = Path(settings.reference)
        if computed.exists() and computed.resolve() != given.resolve() and not _same_weights(computed, given):
            print(
                f"fatq-bench: note: {Path(model.path).name} computes {computed.name} (the model on the engine grid, "
                f"see fatq-export); against {Path(settings.reference).name} expect lower agreement.",
            )  # stdout: information, while stderr carries only an error's one sentence


def _note_bias_arithmetic(specs: list, settings: BenchSettings) -> None:
    """Say so when an engine computes a file with other bias arithmetic than the ``--reference`` model.

    A file written for float-bias engines (``bias_arithmetic`` "float" in its metadata: the TensorRT
    file) computes its ``.reference.pt`` in TensorRT and OpenVINO, while ONNX Runtime rounds its
    biases to int32 and computes the deploy reference (``--reference-mode deploy``) instead.
    """
    if settings.reference is None:
        return
    for spec in specs:
        if spec.model.kind != ONNX or spec.engine not in ENGINES:
            continue
        written = spec.model.metadata.get("bias_arithmetic")
        computes = ENGINES[spec.engine].bias_arithmetic
        if written is None or computes is None:
            continue
        compared = written if settings.reference_mode == "eval" else "int32"  # deploy mode replays int32 biases
        if computes != compared:
            better = reference_mode(written, spec.engine)
            print(
                f"fatq-bench: note: {spec.engine} computes {Path(spec.model.path).name} with {computes} biases, the "
                f"{settings.reference_mode}-mode reference with {compared} biases; expect lower agreement "
                f"(--reference-mode {better} compares with the model {spec.engine} computes).",
            )  # stdout, as the note above


def _same_weights(first: Path, second: Path) -> bool:
    """Whether two fatq checkpoints hold identical weights (the portable and onnx-ort exports' references do)."""
    import torch

    from fatq.checkpoint import load_fatq_checkpoint

    try:
        a, b = (load_fatq_checkpoint(p)["state_dict"] for p in (first, second))
    except FatqError:
        return False
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def _open_reference(stack: contextlib.ExitStack, settings: BenchSettings, sample_shape: tuple) -> tuple:
    """The reference checkpoint's runner (eval or deploy mode) and its checkpoint dict, or (None, None)."""
    if settings.reference is None:
        return None, None
    from engines.torch_runner import TorchRunner
    from fatq.checkpoint import load_fatq_checkpoint

    data = load_fatq_checkpoint(settings.reference)
    if tuple(data["input_size"]) != tuple(sample_shape):
        raise FatqError(
            f"the reference {settings.reference} takes {tuple(data['input_size'])} inputs, "
            f"the models take {tuple(sample_shape)}."
        )
    runner = TorchRunner.from_checkpoint(
        settings.reference, mode=settings.reference_mode, threads=settings.threads, name="reference"
    )
    stack.callback(runner.close)
    return runner.activate(), data


def _check_normalization_channels(normalization: dict | None, sample_shape: tuple) -> None:
    """--mean/--std must have one value per input channel."""
    if normalization is not None and len(normalization["mean"]) != sample_shape[0]:
        raise FatqError(
            f"--mean/--std give {len(normalization['mean'])} values, the models take {sample_shape[0]} channels."
        )


def _normalized_inputs(eval_inputs: EvalInputs, normalizations: dict[str, dict | None]) -> dict[str, np.ndarray]:
    """{label: float32 inputs}; labels with the same normalization share one array (CIFAR: 123 MB each)."""
    if eval_inputs.labels is not None:
        missing = [label for label, n in normalizations.items() if n is None]
        if missing:
            raise FatqError(
                f"{', '.join(missing)} record no input normalization; pass the mean and std the model was trained "
                "with (--mean 0.49,0.48,0.45 --std 0.25,0.24,0.26, or --normalization cifar10|imagenet)."
            )
    arrays: dict[str, np.ndarray] = {}
    result = {}
    for label, normalization in normalizations.items():
        key = json.dumps(normalization, sort_keys=True)
        if key not in arrays:
            arrays[key] = eval_inputs.normalized(normalization)
        result[label] = arrays[key]
    return result


def _accuracy(logits: np.ndarray, eval_inputs: EvalInputs) -> dict:
    return {
        "top1": topk_accuracy(logits, eval_inputs.labels, 1),
        "top5": topk_accuracy(logits, eval_inputs.labels, 5),
        "samples": len(eval_inputs.labels),
    }


def _evaluate(
    runners: dict[str, Runner],
    inputs: dict[str, np.ndarray],
    eval_inputs: EvalInputs,
    eval_batch: dict[str, int],
    reference: tuple,
    settings: BenchSettings,
    quiet: bool,
) -> tuple[dict, dict, dict | None]:
    """Accuracy and agreement of every run (each at its ``eval_batch``, the reference at the largest);
    returns (accuracy, agreements, reference summary)."""
    reference_runner, reference_data = reference
    batches = [*eval_batch.values(), *([max(eval_batch.values())] if reference_runner is not None else [])]
    bar = progress(total=sum(-(-len(eval_inputs.images) // b) for b in batches), desc="evaluating", quiet=quiet)
    logits = {label: predict(r, inputs[label], eval_batch[label], bar.update) for label, r in runners.items()}
    reference_logits = None
    if reference_runner is not None:
        reference_inputs = eval_inputs.normalized(reference_data["normalization"])
        reference_logits = predict(reference_runner, reference_inputs, max(eval_batch.values()), bar.update)
    bar.close()

    accuracy, agreements = {}, {}
    num_classes = len(eval_inputs.class_names or [])
    for label, values in logits.items():
        if eval_inputs.labels is not None:
            if values.shape[1] < num_classes:
                raise FatqError(f"{label} outputs {values.shape[1]} classes, the dataset has {num_classes}.")
            accuracy[label] = _accuracy(values, eval_inputs)
        if reference_logits is not None:
            if values.shape != reference_logits.shape:
                raise FatqError(
                    f"{label} outputs {values.shape[1]} classes, the reference {reference_logits.shape[1]}."
                )
            agreements[label] = agreement(values, reference_logits)
    summary = None
    if reference_logits is not None:
        summary = {
            "checkpoint": str(settings.reference),
            "sha256": sha256_file(settings.reference),
            "mode": settings.reference_mode,
            "arch": reference_data["arch"],
            "spec": reference_data["spec"],
        }
        if eval_inputs.labels is not None:
            acc = _accuracy(reference_logits, eval_inputs)
            summary.update(top1=acc["top1"], top5=acc["top5"])
    return accuracy, agreements, summary


def _time_runs(
    specs: list[RunSpec],
    runners: dict[str, Runner],
    inputs: dict[str, np.ndarray],
    settings: BenchSettings,
    batches: BatchPlan,
    quiet: bool,
) -> list[dict]:
    """Interleaved timing of every run at every batch size it accepts: the ``runs`` entries of the report."""
    runs = []
    calls = sum(len(b) for b in batches.timed.values()) * (settings.warmup + settings.iterations)
    bar = progress(total=calls, desc="timing", quiet=quiet)
    infos = {label: r.info() for label, r in runners.items()}
    for batch in batches.order:
        active = {label: r for label, r in runners.items() if batch in batches.timed[label]}
        feeds = {label: _timing_feeds(r, inputs[label], batch) for label, r in active.items()}
        results = time_interleaved(active, feeds, batch, settings.warmup, settings.iterations, settings.rounds,
                                   bar.update)  # fmt: skip
        for spec in (s for s in specs if s.label in active):
            result, info = results[spec.label], infos[spec.label]
            runs.append(
                {
                    "label": spec.label,
                    "model": str(spec.model.path),
                    "engine": spec.engine,
                    "engine_version": info.engine_version,
                    "precision": spec.precision,
                    "device": info.device,
                    "threads": info.threads,
                    "batch_size": batch,
                    "latency_ms": result.latency.to_dict(),
                    "latency_source": result.source,
                    "transfer_ms": {k: v.to_dict() for k, v in result.transfers.items()} or None,
                    "throughput_ips": result.throughput_ips,
                    "warmup": settings.warmup,
                    "iterations": settings.iterations,
                }
            )
    bar.close()
    return runs


def _config_entries(specs: list[RunSpec], runners: dict[str, Runner], normalizations: dict, batches: BatchPlan):
    entries = []
    for spec in specs:
        info = runners[spec.label].info()  # after the runs: compiled-model facts are known now
        entries.append(
            {
                "label": spec.label,
                "model": str(spec.model.path),
                "model_kind": spec.model.kind,
                "engine": spec.engine,
                "engine_version": info.engine_version,
                "precision": spec.precision,
                "device": info.device,
                "threads": info.threads,
                "options": info.options,
                "memory_bytes": runners[spec.label].memory_bytes(),
                "normalization": normalizations[spec.label],
                "fixed_batch": next(iter(runners[spec.label].input_metadata().values())).fixed_batch,
                "batch_sizes": list(batches.timed[spec.label]),
                "eval_batch": batches.eval_batch[spec.label],
            }
        )
    return entries


def run_benchmark(
    model_paths: list[str | Path | ModelFile],
    engines: list[str],
    precisions: list[str] | None,
    settings: BenchSettings,
    command: str = "",
    quiet: bool = False,
) -> dict:
    """Run the whole benchmark and return the report (``docs/bench_schema.md``).

    Args:
        model_paths: MODEL files (ONNX, TensorRT plans, fatq checkpoints), or their
            :func:`~engines.model_files.inspect_model` records (not inspected again).
        engines: engine names (:data:`engines.registry.ENGINES`).
        precisions: precisions to run, or None for each model's own.
        settings: what to measure.
        command: the command line, recorded in the report.
        quiet: no progress bars.
    """
    if not settings.batch_sizes or min(settings.batch_sizes) < 1:
        raise FatqError(f"batch sizes must be positive integers, got {list(settings.batch_sizes)}.")
    models = [p if isinstance(p, ModelFile) else inspect_model(p) for p in model_paths]
    _note_engine_exact_reference(models, settings)
    specs, skipped = plan_runs(models, engines, precisions)
    _note_bias_arithmetic(specs, settings)
    batch_sizes = tuple(dict.fromkeys(settings.batch_sizes))
    options = dataclasses.replace(settings.runner_options, threads=settings.threads, max_batch=max(batch_sizes),
                                  opt_batch=max(batch_sizes))  # fmt: skip
    with contextlib.ExitStack() as stack:
        runners, sample_shape = _open_runners(stack, specs, options)
        batches = plan_batches(specs, runners, batch_sizes)
        skipped += batches.skipped
        _check_normalization_channels(settings.normalization, sample_shape)
        reference = _open_reference(stack, settings, sample_shape)
        fallback = settings.normalization or (reference[1]["normalization"] if reference[1] else None)
        normalizations = {spec.label: model_normalization(spec) or fallback for spec in specs}
        eval_inputs = load_eval_inputs(settings, sample_shape)
        given = (Path(settings.reference).name, reference[1]) if reference[1] else None
        check_class_names(models, given, eval_inputs)
        inputs = _normalized_inputs(eval_inputs, normalizations)
        accuracy, agreements, reference_summary = _evaluate(
            runners, inputs, eval_inputs, batches.eval_batch, reference, settings, quiet
        )
        gate = evaluate_gate(
            agreements,
            accuracy,
            reference_summary.get("top1") if reference_summary else None,
            settings.min_agreement,
            settings.max_accuracy_drop,
        )
        runs = _time_runs(specs, runners, inputs, settings, batches, quiet)
        configs = _config_entries(specs, runners, normalizations, batches)

    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "fatq_version": __version__,
        "git_commit": git_commit(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpu": cpu_name(), "python": sys.version.split()[0], "platform": platform.platform()},
        "settings": {
            "batch_sizes": list(batches.order),
            "warmup": settings.warmup,
            "iterations": settings.iterations,
            "rounds": settings.rounds,
            "threads": settings.threads,
            "eval_inputs": eval_inputs.source,
            "eval_batch": max(batches.eval_batch.values()),
            "data_dir": str(settings.data_dir) if settings.data_dir else None,
            "dataset": settings.dataset,
            "torch_mode": settings.runner_options.torch_mode,
        },
        "models": [
            {"path": str(m.path), "kind": m.kind, "precision": m.precision, "sha256": sha256_file(m.path)}
            for m in models
        ],
        "configs": configs,
        "runs": runs,
        "ratios": _ratios(specs, runs),
        "accuracy": accuracy,
        "reference": reference_summary,
        "agreement": {label: a.to_dict() for label, a in agreements.items()},
        "gate": gate.to_dict(),
        "skipped": [s.to_dict() for s in skipped],
    }
