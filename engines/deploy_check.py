"""``fatq-export --check``: run an exported file in its engine and compare it with the deploy
reference and with the checkpoint's model.

The engine is the format's ``check_engine`` (:mod:`export.formats`): ONNX Runtime, or OpenVINO
for ``onnx-openvino`` files, through the runners fatq-bench uses (:mod:`engines.registry`).
Three runs see the same images: the engine on the file as written, the
:class:`~export.reference.DeployReference` of its deploy graph, and the PyTorch model in eval
mode. Reported: top-1 agreement and logit differences for each pair, accuracy of each (with
labels), and per quantized tensor the percentage of integers identical between ONNX Runtime
and the reference.

Intermediate tensors come from a throw-away copy of the graph with extra outputs. Exposing a
QuantizeLinear's int8 output would change how ONNX Runtime optimizes the graph (a Q that is also a
graph output is not converted to its uint8 kernels, so the next Conv would not fuse and run in
float), so the copy exposes the float tensor each Q reads instead — a DequantizeLinear → Clip
output that holds integers · s exactly, or the clipped input of a quantizer — and the integers are
clamp(round_half_even(x / s), -128, 127), what the Q computes. The copy's logits are compared with
the file's to show the exposure did not change the computation. A ``--format onnx-ort`` file has no
fusions to perturb: its uint8 tensors carry the deploy names and are exposed as they are, their
integers being the bytes minus the zero points its metadata records (:mod:`export.ort_writer`).
In a ``--format onnx-openvino`` file a 4-bit quantizer is one FakeQuantize whose float output
carries the deploy name and holds integers · s (:mod:`export.openvino_writer`); exposing it may
change OpenVINO's fusions but not the values, which the logits comparison of the copy confirms.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from engines.local_differences import LocalDifferences
from engines.model_files import in_memory_model, inspect_onnx
from engines.registry import ENGINES, RunnerOptions
from engines.runner import Runner
from export.deploy_graph import DeployGraph, bias_arithmetic
from export.formats import REFERENCE, companion_path, format_of
from export.onnx_builder import INPUT_NAME, OUTPUT_NAME
from export.ort_writer import uint8_tensors
from export.pipeline import ExportResult, image_size, normalized
from export.reference import DeployReference
from fatq.errors import FatqError
from fatq.io import progress
from fatq.metrics import RunningAgreement, model_accuracy, top1_correct

DEFAULT_CHECK_IMAGES = 2000


@dataclass(frozen=True)
class Observed:
    """Where a quantized deploy tensor is read in the debug copy, and how to get its integers.

    ``scale`` set: a float tensor whose integers are clamp(round_half_even(x / scale), *bounds) (int8's
    [-128, 127], or a uint8 quantizer's [0, 255] read at its FakeQuantize); else an integer tensor whose
    integers are its values minus ``zero_point``.
    """

    name: str
    dtype: int  # onnx.TensorProto element type
    scale: float | None = None
    zero_point: int = 0
    bounds: tuple[int, int] = (-128, 127)

    def integers(self, value: np.ndarray) -> np.ndarray:
        if self.scale is not None:
            return np.clip(np.round(value / np.float32(self.scale)), *self.bounds)
        return value.astype(np.int32) - self.zero_point


def observable_tensors(model: onnx.ModelProto, quant: dict[str, dict], engine: str = "ort") -> dict[str, Observed]:
    """Where each quantized deploy tensor can be read without perturbing the optimized graph.

    Args:
        model: the exported QDQ model (or a ``--format onnx-ort`` model, whose uint8 tensors
            carry the deploy names and are listed with their zero points in its metadata, or a
            ``--format onnx-openvino`` model).
        quant: {deploy tensor: {scale, qmin, qmax}} of the deploy graph.
        engine: the engine that runs it ("ort" or "openvino": :func:`_openvino_observable`).

    Returns:
        {deploy tensor: :class:`Observed`}.
    """
    fmt = format_of(model)
    if fmt is not None and fmt.name == "onnx-ort":  # QOperator ops: exposing an output does not change any fusion
        uint8 = uint8_tensors(model)
        return {t: Observed(t, TensorProto.UINT8, zero_point=uint8[t]["zero_point"]) for t in quant if t in uint8}
    if engine == "openvino":
        return _openvino_observable(model, quant)
    producers = {out: node for node in model.graph.node for out in node.output}
    int8_constants = {i.name for i in model.graph.initializer if i.data_type == TensorProto.INT8}
    found = {}
    for tensor, q in quant.items():
        node = producers.get(tensor)
        if node is None:
            continue
        if node.op_type == "QuantizeLinear":
            found[tensor] = Observed(node.input[0], TensorProto.FLOAT, q["scale"])
        elif node.op_type == "Clip" and node.input[1] in int8_constants:
            found[tensor] = Observed(tensor, TensorProto.INT8)
        elif node.op_type == "Clip":
            found[tensor] = Observed(tensor, TensorProto.FLOAT, q["scale"])
    return found


def _openvino_observable(model: onnx.ModelProto, quant: dict[str, dict]) -> dict[str, Observed]:
    """Observation points in an onnx-openvino file that leave OpenVINO's computation unchanged.

    Measured on ResNet-20 W4A4 (openvino 2026.4.1): exposing the float input of a QuantizeLinear
    or the output of a range Clip changed the logits by up to 1.7 (its fusions change and a
    rounding tie falls the other way), while exposing FakeQuantize and DequantizeLinear outputs
    left them bit-identical. So a FakeQuantize output is read as it is and an int8 tensor at the
    DequantizeLinear that reads it. A range enforced by a Clip that only float ops read (a conv's
    8-bit output quantizer before a residual Add: Q → DQ → Clip → Add) has no such point — exposing
    the DequantizeLinear before the Clip perturbed the logits too — and is left unobserved
    (``unobserved_int8_tensors``); the quantizers after the Add, which read it, are observed.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = {}
    for tensor, q in quant.items():
        node = producers.get(tensor)
        if node is None:
            continue
        dequantized = [r.output[0] for r in readers.get(tensor, []) if r.op_type == "DequantizeLinear"]
        if node.op_type == "FakeQuantize":
            found[tensor] = Observed(tensor, TensorProto.FLOAT, q["scale"], bounds=(int(q["qmin"]), int(q["qmax"])))
        elif node.op_type == "QuantizeLinear" and dequantized:
            found[tensor] = Observed(dequantized[0], TensorProto.FLOAT, q["scale"])
    return found


def with_outputs(model: onnx.ModelProto, names: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``names`` ({tensor: onnx element type})."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = {o.name for o in copy.graph.output}
    for name, dtype in names.items():
        if name not in existing:
            copy.graph.output.append(helper.make_tensor_value_info(name, dtype, None))
    return copy


def check_runner(engine: str, model, threads: int | None, name: str) -> Runner:
    """The active runner of ``engine`` (an :data:`engines.registry.ENGINES` name) on ``model``
    (a ModelFile: the file, or the debug copy in memory).

    For OpenVINO that runner compiles each input shape as a static model with the float parts
    forced to f32: with a dynamic batch, openvino 2026.4.1 computed different logits for the
    portable QDQ ResNet-20 W4A4 (0.8 % of top-1 changed against its static-shape run and against
    ONNX Runtime, measured), so only static shapes are checked, as fatq-bench runs them.
    """
    spec = ENGINES[engine]
    return spec.factory(model, model.precision, RunnerOptions(threads=threads), name).activate()


def _batches(images: torch.Tensor, labels: torch.Tensor | None, batch_size: int) -> Iterator:
    for start in range(0, images.shape[0], batch_size):
        stop = start + batch_size
        yield images[start:stop], None if labels is None else labels[start:stop]


def compare(
    onnx_path: str | Path,
    graph: DeployGraph,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    batch_size: int = 250,
    threads: int | None = None,
    quiet: bool = False,
    as_trained: nn.Module | None = None,
    engine: str | None = None,
    also: dict[str, nn.Module] | None = None,
) -> dict:
    """Compare an engine on the file, the deploy reference and the PyTorch model on ``images``.

    Args:
        onnx_path: the exported file.
        graph: its deploy graph (integer dialect for QDQ files, folded float for float files).
        model: the model to compare with (eval mode is set here).
        images: normalized float32 [N, C, H, W].
        labels: int64 [N] or None (no accuracies).
        batch_size: images per run.
        threads: the engine's threads (None: its default).
        quiet: no progress bar.
        as_trained: the model before the engine-exact moves (:mod:`export.engine_exact`); the
            engine is also compared with it, reported under ``"<engine>_vs_as_trained"`` and
            ``accuracy["checkpoint_as_trained"]``.
        engine: the :data:`engines.registry.ENGINES` name to run (default: the format's
            ``check_engine``). The deploy reference replays that engine's bias arithmetic.
        also: {key: model} also compared with the engine, as ``"<engine>_vs_<key>"`` and ``accuracy[key]``.

    Returns:
        The report (see ``fatq-export --help``; keys documented in the README).
    """
    onnx_path = Path(onnx_path)
    onnx_model = onnx.load(str(onnx_path))
    fmt = format_of(onnx_model)
    check_engine = engine or (fmt.check_engine if fmt is not None else "ort")
    reference = DeployReference(graph, ENGINES[check_engine].bias_arithmetic if graph.quantized else None)
    if isinstance(model, DeployReference) and model.graph is graph and model.arithmetic == reference.arithmetic:
        reference = model  # compared with the deploy reference itself: one module, run once per batch
    quant = reference.quant
    exposed = observable_tensors(onnx_model, quant, check_engine)
    others = {"as_trained": as_trained} if as_trained is not None else {}
    others.update(also or {})
    engine = ENGINES[check_engine].package  # the report's name: "onnxruntime", "openvino"
    production = check_runner(check_engine, inspect_onnx(onnx_model, onnx_path), threads, onnx_path.name)
    debug_copy = with_outputs(onnx_model, {o.name: o.dtype for o in exposed.values()})
    debug = check_runner(check_engine, in_memory_model(debug_copy, f"{onnx_path.stem}.debug.onnx"), threads, "debug")
    engine_version = production.info().engine_version
    pairs = {k: RunningAgreement() for k in ("engine_model", "ref_model", "engine_ref", *others)}
    correct = {engine: 0, "reference": 0, "checkpoint": 0, **{_accuracy_key(k): 0 for k in others}}
    local = LocalDifferences(graph, reference, set(exposed))
    same = dict.fromkeys(exposed, 0)
    total = dict.fromkeys(exposed, 0)
    debug_identical = True
    model.eval()
    for other in others.values():
        other.eval()
    steps = (images.shape[0] + batch_size - 1) // batch_size
    for x, y in progress(_batches(images, labels, batch_size), total=steps, desc="checking", quiet=quiet):
        x = x.float().contiguous()
        feed = {INPUT_NAME: x.numpy()}
        engine_logits = production.infer(feed)[OUTPUT_NAME]
        debug_out = debug.infer(feed)
        debug_identical &= bool(np.array_equal(debug_out[OUTPUT_NAME], engine_logits))
        ref_logits, integers = reference.run(x, capture=True)
        with torch.no_grad():
            # each module runs once per batch, the deploy reference too when it is also the compared model
            logits_by_module: dict[int, np.ndarray] = {id(reference): ref_logits.float().numpy()}
            for module in (model, *others.values()):
                if id(module) not in logits_by_module:
                    logits_by_module[id(module)] = module(x).float().numpy()
            model_logits = logits_by_module[id(model)]
            other_logits = {k: logits_by_module[id(m)] for k, m in others.items()}
        ref_logits = ref_logits.numpy()
        pairs["engine_model"].update(engine_logits, model_logits)
        for key, logits in other_logits.items():
            pairs[key].update(engine_logits, logits)
        pairs["ref_model"].update(ref_logits, model_logits)
        pairs["engine_ref"].update(engine_logits, ref_logits)
        if y is not None:
            truth = y.numpy()
            runs = [(engine, engine_logits), ("reference", ref_logits), ("checkpoint", model_logits)]
            runs += [(_accuracy_key(k), logits) for k, logits in other_logits.items()]
            for key, logits in runs:
                correct[key] += top1_correct(logits, truth)
        engine_integers = {t: o.integers(debug_out[o.name]).astype(np.float32) for t, o in exposed.items()}
        for tensor, value in engine_integers.items():
            same[tensor] += int((value == integers[tensor].numpy()).sum())
            total[tensor] += value.size
        local.update(x, engine_integers, integers)
    production.close()
    debug.close()
    count = images.shape[0]
    identical = {t: 100.0 * same[t] / max(total[t], 1) for t in exposed}
    report = {
        "images": count,
        "engine": engine,
        f"{engine}_version": engine_version,
        **pairs["engine_model"].result(),
        "reference_vs_checkpoint": pairs["ref_model"].result(),
        f"{engine}_vs_reference": pairs["engine_ref"].result(),
        "reference_arithmetic": reference.arithmetic if graph.quantized else None,
        "accuracy": {k: (100.0 * v / count if labels is not None else None) for k, v in correct.items()},
        "int8_identical_pct": identical,
        "int8_identical_pct_min": min(identical.values()) if identical else None,
        "int8_tensors": len(identical),
        "unobserved_int8_tensors": sorted(set(quant) - set(exposed)),
        "local_differences": local.result(),
        "debug_copy_logits_identical": debug_identical,
        **{f"{engine}_vs_{key}": pairs[key].result() for key in others},
        "onnx_sha256": hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest(),
    }
    return report


def _accuracy_key(key: str) -> str:
    """The ``accuracy`` entry of a compared model (``as_trained`` keeps its historical name)."""
    return "checkpoint_as_trained" if key == "as_trained" else key


def check_images(checkpoint: dict, data_dir, count: int | None, shape: list[int]) -> tuple:
    """(normalized images, labels or None, what they are) for a check.

    Args:
        checkpoint: the checkpoint dict (normalization, input size).
        data_dir: dataset whose test split is used (``count`` images, default
            :data:`DEFAULT_CHECK_IMAGES`, chosen with seed 0), or None for 256 (or ``count``)
            random normal inputs.
        count: images to check.
        shape: [C, H, W] of the graph input.
    """
    if data_dir:
        from fatq.data import check_classes, load_split

        split = load_split(data_dir, "test", image_size=image_size(checkpoint))
        check_classes(checkpoint["num_classes"], checkpoint.get("class_names"), split.class_names, "the checkpoint")
        count = min(len(split), count or DEFAULT_CHECK_IMAGES)
        if count < 1:
            raise FatqError("--check-images must be at least 1.")
        chosen = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:count]
        return normalized(split.images[chosen], checkpoint), split.labels[chosen], f"test split of {data_dir}"
    count = 256 if count is None else count
    if count < 1:
        raise FatqError("--check-images must be at least 1.")
    images = torch.randn(count, *shape, generator=torch.Generator().manual_seed(0))
    return images, None, "random normal inputs (no --data-dir)"


def check_export(
    result: ExportResult,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    source: str,
    min_agreement: float,
    min_int8_identical: float,
    quiet: bool = False,
    engine: str | None = None,
) -> dict:
    """``fatq-export --check`` of what :func:`export.pipeline.export_checkpoint` wrote.

    Args:
        result: the export (its file, deploy graph, model, and the models before calibration
            and before the engine-exact moves, when kept).
        images, labels: from :func:`check_images`; ``source`` says what they are.
        min_agreement: top-1 agreement % engine vs model needed to pass.
        min_int8_identical: % of identical integers per observed tensor needed to pass, unless every value
            the engine computes differently on equal inputs is a rounding tie (:mod:`engines.local_differences`).
        quiet: no progress bar.
        engine: the engine to run (default: the format's ``check_engine``); one whose bias arithmetic
            differs from the file's (ONNX Runtime on the TensorRT file) is compared with the model it
            computes there, the deploy graph with its own arithmetic, and with the file's model too.

    Returns:
        The check report (:func:`compare`'s, plus ``data``, ``compared_model``, the bounds and ``passed``).
    """
    graph, model = result.graph, result.model
    engine = engine or result.format.check_engine
    also = {}
    if graph.quantized:
        label = "checkpoint, eval mode" + (" (calibrated)" if result.uncalibrated is not None else "")
        if "bias_projection" in graph.meta:
            label += f", as the file's engines compute it ({companion_path(result.output, REFERENCE).name})"
        compared = model
        computes = ENGINES[engine].bias_arithmetic
        if computes != bias_arithmetic(graph):
            compared, also = DeployReference(graph, computes), {"file_reference": model}
            label = (
                f"the deploy graph with {computes} biases: what {ENGINES[engine].package} computes on this file "
                f"(it rounds the float biases to int32; the file's own model, with float biases, is compared as "
                f"file_reference)"
            )
    elif graph.meta.get("dequantized_from_quantized_model"):
        compared = float_baseline(model)
        label = "checkpoint, eval mode, activation quantizers disabled (the float baseline this file is)"
    else:
        compared, label = model, "checkpoint, eval mode"
    report = compare(
        result.output,
        graph,
        compared,
        images,
        labels,
        quiet=quiet,
        as_trained=result.as_trained,
        engine=engine,
        also=also,
    )
    report.update(data=source, compared_model=label)
    if result.uncalibrated is not None and labels is not None:
        # the accuracy effect of calibrating the quantizers the model kept float
        report["accuracy"]["checkpoint_uncalibrated"] = model_accuracy(result.uncalibrated, images, labels)
    minimum, local = report["int8_identical_pct_min"], report["local_differences"]
    # fewer identical integers pass only when every value that differs at its own node is a rounding tie
    # (engines.local_differences): the rest differ because they were computed from such a value
    identical = minimum is None or minimum >= min_int8_identical or local["elsewhere"] == 0
    passed = report["top1_agreement_pct"] >= min_agreement and identical
    report.update(min_agreement=min_agreement, min_int8_identical=min_int8_identical, passed=passed)
    return report


def float_baseline(model: nn.Module) -> nn.Module:
    """The model an onnx-fp32 file of a quantized checkpoint is the float version of.

    Activation quantizers are disabled (identity); weights stay fake-quantized (integers · scale)
    and BatchNorm unfolded, so it computes what the dequantized, BN-folded graph computes.
    """
    from fatq.quantizers import ActivationQuantizer

    for module in model.modules():
        if isinstance(module, ActivationQuantizer):
            module.enabled = False
    return model
