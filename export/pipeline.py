"""The export pipeline: a fatq checkpoint -> one ONNX file and its companions, as a library call.

    result = export_checkpoint("w4a4.pt", "onnx")          # -> w4a4.onnx, w4a4.deploy.npz, w4a4.reference.pt
    graph = DeployGraph.load(result.deploy_graph_path)     # what the file was written from

Stages, each run once: load the checkpoint and build the model; calibrate the quantizers the
model keeps float (:mod:`fatq.calibration_pass`, needs ``calibration.data``); fold
(:mod:`export.fold`); for an int8 format lower (:mod:`export.lower`) and, unless ``engine_exact``
is off, move the model onto what the format's engines compute (:mod:`export.engine_exact`, with the
format's ``bias_arithmetic``; it lowers again only after it changed the model); for the float
format dequantize. Then the metadata, the writer of the format (:mod:`export.formats`), the
TensorRT rules for portable files (:func:`export.lint_rules.assert_clean`, target ``"trt"``), and the
files: all of them or none.

``fatq-export`` (:mod:`engines.export_cli`) parses its flags into this call and prints the result.
"""

from __future__ import annotations

import copy
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from export.deploy_graph import DeployGraph
from export.formats import DEPLOY_GRAPH, FORMATS, REFERENCE, OutputFormat, companion_path
from export.onnx_builder import DEFAULT_OPSET
from fatq.errors import FatqError
from fatq.io import staged_files

CALIB_BATCH_SIZE = 64


@dataclass(frozen=True)
class CalibrationSettings:
    """Calibration images: 8-bit ranges for quantizers the model keeps float (edge/residual inputs), and
    the lattice values the engine-exact moves avoid crossing (:mod:`export.lattice_visits`).

    Attributes:
        data: dataset directory or .tar.gz whose train split calibrates (None: a model with disabled
            quantizers cannot be exported to an int8 format, and the moves weigh every value alike).
        batches: batches of :data:`CALIB_BATCH_SIZE` images.
        method: minmax, percentile, entropy or mse (:mod:`fatq.calibrators`).
    """

    data: str | Path | None = None
    batches: int = 16
    method: str = "percentile"


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote and the objects it wrote them from.

    Attributes:
        output: the ONNX file.
        format: its :class:`~export.formats.OutputFormat`.
        onnx_model: the model written to ``output``.
        graph: the deploy graph it was written from (saved as ``deploy_graph_path``); ``meta``
            holds the file's metadata.
        model: the PyTorch model the file computes (eval mode; calibrated; on the engine grid
            unless exported as trained).
        checkpoint: the loaded checkpoint dict.
        uncalibrated: the model before calibration, when calibration changed it; else None.
        as_trained: the model before the engine-exact moves, when ``keep_as_trained`` asked for it.
        seconds: wall time of the export.
    """

    output: Path
    format: OutputFormat
    onnx_model: onnx.ModelProto
    graph: DeployGraph
    model: nn.Module
    checkpoint: dict
    uncalibrated: nn.Module | None = None
    as_trained: nn.Module | None = None
    seconds: float = 0.0
    companions: list[Path] = field(default_factory=list)

    @property
    def deploy_graph_path(self) -> Path:
        return companion_path(self.output, DEPLOY_GRAPH)

    @property
    def reference_path(self) -> Path | None:
        """The ``.reference.pt`` written beside an engine-exact int8 file, else None."""
        path = companion_path(self.output, REFERENCE)
        return path if path in self.companions else None

    def report(self) -> dict:
        """The export report fatq-export prints as JSON (``output``, ``deploy_graph``, timing, metadata)."""
        return {
            "output": str(self.output),
            "deploy_graph": str(self.deploy_graph_path),
            "export_seconds": self.seconds,
            **self.graph.meta,
        }


def deploy_graph(model: nn.Module, input_size: list[int], disabled_quantizers: str = "error") -> DeployGraph:
    """The graph integer engines run for ``model``: folded, then lowered when it is quantized.

    Args:
        model: a fatq model in eval mode.
        input_size: [C, H, W].
        disabled_quantizers: see :func:`export.fold.fold`.
    """
    from export.fold import fold
    from export.lower import lower

    folded = fold(model, list(input_size), disabled_quantizers=disabled_quantizers)
    return lower(folded) if folded.quantized else folded


def output_path(checkpoint: str | Path, fmt: OutputFormat, output: str | Path | None) -> Path:
    """``output``, or ``<checkpoint stem><format suffix>`` beside the checkpoint; checked writable."""
    checkpoint = Path(checkpoint)
    out = Path(output) if output else checkpoint.with_name(checkpoint.stem + fmt.suffix)
    if not out.parent.is_dir():
        raise FatqError(f"output directory {out.parent} does not exist.")
    if out.suffix != ".onnx":
        raise FatqError(f"output {out} must end in .onnx.")
    return out


def image_size(checkpoint: dict) -> int | None:
    """The image size to load a dataset at for ``checkpoint`` (None: the dataset's own, 32)."""
    size = checkpoint.get("input_size") or [3, 32, 32]
    return None if size[-1] == 32 else int(size[-1])


def normalized(images: torch.Tensor, checkpoint: dict) -> torch.Tensor:
    """``images`` in [0, 1] normalized as the checkpoint's model expects."""
    from fatq.data import normalize

    norm = checkpoint["normalization"]
    return normalize(images, norm["mean"], norm["std"])


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str = "onnx",
    *,
    output: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    calibration: CalibrationSettings | None = None,
    engine_exact: bool = True,
    keep_as_trained: bool = False,
    command: str | None = None,
    quiet: bool = False,
) -> ExportResult:
    """Export ``checkpoint`` in format ``fmt`` (a key of :data:`export.formats.FORMATS`).

    Args:
        checkpoint: a fatq checkpoint (.pt).
        fmt: the format name.
        output: the ONNX path (default beside the checkpoint, see :func:`output_path`).
        opset: ONNX opset.
        calibration: for quantizers the model keeps float (default: no data).
        engine_exact: move an int8 model onto the engine's grid and write ``.reference.pt``
            (False: export it exactly as trained).
        keep_as_trained: keep a copy of the model before the engine-exact moves in the result
            (``--check`` compares with it too).
        command: the command recorded as ``export_command`` (default: the equivalent fatq-export line).
        quiet: no progress bars.

    Returns:
        :class:`ExportResult`. FatqError on bad input; nothing is written then.
    """
    from export.edge_weights import fit_edge_weights_to_int8, refuse_wide_activations
    from export.engine_exact import make_engine_exact, residual_near_ties
    from export.fold import dequantized, fold
    from export.lattice_visits import LatticeVisits
    from export.lint_rules import assert_clean
    from export.lower import lower
    from fatq.checkpoint import load_fatq_checkpoint, model_from_checkpoint

    if fmt not in FORMATS:
        raise FatqError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}.")
    spec = FORMATS[fmt]
    calibration = calibration or CalibrationSettings()
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    out = output_path(checkpoint, spec, output)
    data = load_fatq_checkpoint(checkpoint)
    model = model_from_checkpoint(data).eval()
    _check_finite(model)
    uncalibrated, calibrated = None, None
    if spec.int8 and not model.spec.is_float:
        uncalibrated = copy.deepcopy(model)
        calibrated = _calibrate(model, data, calibration, quiet)
        uncalibrated = uncalibrated if calibrated else None
    edge_requantized = []
    if spec.int8:  # models imported from the FAT reference code (export.edge_weights): stated, never silent
        refuse_wide_activations(model)
        edge_requantized = fit_edge_weights_to_int8(model)
    # the float file drops activation quantization anyway: quantizers the model keeps float are fine
    folded = fold(model, list(data["input_size"]), disabled_quantizers="error" if spec.int8 else "skip")
    as_trained, projection = None, None
    if spec.int8:
        if not folded.quantized:
            raise FatqError(f"{checkpoint} holds an FP32 model; export it with --format onnx-fp32.")
        graph = lower(folded)
        if engine_exact:
            as_trained = copy.deepcopy(model) if keep_as_trained else None
            input_size = list(data["input_size"])
            # with calibration data the moves avoid the lattice values real images reach (export.lattice_visits)
            visits = None
            if calibration.data:
                images = _calibration_images(calibration, data)
                visits = LatticeVisits.measure(graph, images, spec.bias_arithmetic)
            graph, projection = make_engine_exact(
                model, lambda m: deploy_graph(m, input_size), graph, spec.bias_arithmetic, visits
            )
    else:
        graph = dequantized(folded)
    if command is None:
        command = _equivalent_command(checkpoint, fmt, output, opset, calibration, engine_exact)
    graph.meta.update(_metadata(data, checkpoint, graph, spec, opset, calibrated, command))
    graph.meta["edge_weight_requantization"] = edge_requantized or "none"
    if spec.int8:  # how the engines the file is for add biases: what the writer stores, the reference replays
        graph.meta["bias_arithmetic"] = spec.bias_arithmetic
    reference = companion_path(out, REFERENCE)
    if projection is not None:
        graph.meta["bias_projection"] = {"reference_checkpoint": reference.name, **projection}
    elif spec.int8:  # exported as trained: say how many residual sums an engine may round another way
        graph.meta["residual_near_ties"] = residual_near_ties(graph)
    onnx_model = spec.write(graph, opset, graph.meta)
    if spec.lint_target is not None:  # engine-specific files use one engine's own ops by design: no portable rules
        assert_clean(onnx_model, spec.lint_target)
    companions = [companion_path(out, DEPLOY_GRAPH)] + ([reference] if projection is not None else [])
    with staged_files([*companions, out]) as staged:  # no half export, even when killed: all files or none
        graph.save(staged[companions[0]])
        if projection is not None:
            _save_reference(model, data, staged[reference], graph.meta)
        staged[out].write_bytes(onnx_model.SerializeToString())
    return ExportResult(
        out, spec, onnx_model, graph, model, data, uncalibrated, as_trained, time.perf_counter() - started, companions
    )


def _equivalent_command(checkpoint, fmt, output, opset, calibration: CalibrationSettings, engine_exact) -> str:
    argv = ["fatq-export", str(checkpoint), "--format", fmt]
    argv += ["-o", str(output)] if output else []
    argv += ["--opset", str(opset)] if opset != DEFAULT_OPSET else []
    if calibration.data:
        argv += ["--calib-data", str(calibration.data), "--calib-batches", str(calibration.batches)]
        argv += ["--calib-method", calibration.method]
    argv += [] if engine_exact else ["--as-trained"]
    return shlex.join(argv)


def _check_finite(model: torch.nn.Module) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FatqError(f"checkpoint tensor {name} holds NaN or Inf values.")


def _calibrate(model, data: dict, settings: CalibrationSettings, quiet: bool) -> dict | None:
    """Give disabled quantizers 8-bit ranges from real data; returns what was done (or None)."""
    from fatq.calibration_pass import activation_quantizers

    disabled = [name for name, q in activation_quantizers(model).items() if not q.enabled]
    if not disabled:
        return None
    if not settings.data:
        raise FatqError(
            f"activation quantizer {disabled[0]!r} is disabled (the model keeps that input float; "
            f"{len(disabled)} in all); pass --calib-data DIR to calibrate it."
        )
    from fatq.calibration_pass import calibrate

    images = _calibration_images(settings, data)
    batches = list(images.split(CALIB_BATCH_SIZE))
    alphas = calibrate(model, batches, method=settings.method, quiet=quiet)
    return {"method": settings.method, "images": len(images), "split": "train", "quantizers": alphas}


def _calibration_images(settings: CalibrationSettings, data: dict) -> torch.Tensor:
    """The calibration images: ``settings.batches`` batches from the train split of ``settings.data``
    (chosen with seed 0), normalized like the checkpoint's inputs, float32 [N, C, H, W]."""
    if settings.batches < 1:
        raise FatqError("--calib-batches must be at least 1.")
    from fatq.data import load_split

    split = load_split(settings.data, "train", image_size=image_size(data))
    count = min(len(split), settings.batches * CALIB_BATCH_SIZE)
    chosen = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:count]
    return normalized(split.images[chosen], data)


def _metadata(
    data: dict, checkpoint: Path, graph, spec: OutputFormat, opset: int, calibration: dict | None, command: str
) -> dict:
    from fatq.provenance import __version__, git_commit, sha256_file

    quant_spec = data["spec"]
    return {
        "producer": "fatq-export",
        "format": spec.metadata_tag,
        "arch": data["arch"],
        "arch_options": data.get("arch_options", {}),
        "bits": f"w{quant_spec['weight_bits']}a{quant_spec['act_bits']}",
        "spec": quant_spec,
        "num_classes": data["num_classes"],
        "normalization": data["normalization"],
        "input_shape": ["batch", *graph.input_shape],
        "class_names": data.get("class_names"),
        "source_checkpoint": checkpoint.name,
        "source_checkpoint_sha256": sha256_file(checkpoint),
        "fatq_version": __version__,
        "git_commit": git_commit(),
        "calibration": calibration if calibration else "none",
        "opset": opset,
        "export_command": command,
    }


def _save_reference(model, data: dict, path: Path, meta: dict) -> None:
    """The checkpoint of the PyTorch model the int8 file computes (calibrated, on the engine grid)."""
    from fatq.checkpoint import save_checkpoint

    provenance = {k: meta[k] for k in ("source_checkpoint", "source_checkpoint_sha256", "export_command")}
    save_checkpoint(
        path,
        model,
        data["normalization"],
        data.get("class_names"),
        data["input_size"],  # the size the model trained at, not its architecture's registered one
        derived_from=provenance,
        calibration=meta["calibration"],
        bias_projection=meta["bias_projection"],
    )
