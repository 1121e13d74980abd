"""Build TensorRT engines from (QDQ) ONNX files and save them with a JSON sidecar.

**Not run in this project.** No machine here has both a CUDA GPU and the tensorrt wheels
(DEPLOY.md), so this module was written from the TensorRT 10/11 Python API documentation and
is exercised only by ``tests/test_trt.py`` (marker ``trt``) on a machine that has both. The
pure parts (typing choice, builder flags, sidecar checks) are tested everywhere.

Typing (how precision is chosen), decided by :func:`choose_typing` and recorded in the sidecar:

- **strong** (default): ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; layers run in the
  types the ONNX graph states: int8 where Q/DQ nodes say so, the graph's float type elsewhere.
  This is NVIDIA's current path for Q/DQ models and the only one in TensorRT 11, where the flag
  is accepted and ignored (every network is strongly typed).
- **weak** (TensorRT 10.x only): builder flags ``INT8`` + ``FP16`` for a QDQ graph (TensorRT may
  also run the float layers in fp16), ``FP16`` for an fp16 engine from the onnx-fp32 file.
  An fp16 engine from an fp32 graph needs this path; on TensorRT 11 it is refused with the
  remedy (convert the ONNX to fp16 first, e.g. with ModelOpt AutoCast).

The sidecar ``<plan>.json`` records how the plan was made and where it may run: format,
tensorrt_version, gpu_name, compute_capability, precision, typing, builder_flags,
network_flags, int8_scales, profile, build_settings, source_onnx (+ its sha256 and
metadata_props, which carry the input normalization), plan_sha256, fatq_version, git_commit,
created_utc, command. :func:`check_plan` refuses a plan whose TensorRT version, GPU or bytes
differ from the running ones.

Q/DQ graphs carry their scales, so no calibration is needed. Implicit INT8 calibration
(deprecated since 10.1, removed in 11) remains an opt-in legacy path on 10.x only:
``build_engine(..., int8_calibrator=...)`` with an fp32 graph (weakly typed).

Every build sets a workspace limit, an optimization profile for the dynamic batch (min/opt/max)
and a persistent timing cache.
"""

from __future__ import annotations

import datetime
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from engines.host import GpuInfo, gpu_info
from engines.model_files import ONNX, inspect_model, plan_sidecar_path
from fatq.errors import FatqError
from fatq.extras import import_extra
from fatq.io import cache_dir, write_bytes_atomic
from fatq.provenance import __version__, git_commit, sha256_file

SIDECAR_FORMAT = "fatq-trt-plan"
SIDECAR_VERSION = 1
TYPINGS = ("auto", "strong", "weak")
BUILD_PRECISIONS = ("int8", "fp16", "fp32")


def require_gpu() -> GpuInfo:
    """The first CUDA device, or a clear error when there is none (or no cuda-python)."""
    import_extra("cuda.bindings.runtime")
    gpu = gpu_info(0)
    if gpu is None:
        raise FatqError("TensorRT needs a CUDA GPU, and none is visible here (no driver or no device).")
    return gpu


def major_version(version: str) -> int:
    """10 for "10.14.1.48"."""
    return int(version.split(".")[0])


@dataclass(frozen=True)
class BuildSettings:
    """How to build one engine.

    Attributes:
        precision: "int8" (from a QDQ graph), "fp16" or "fp32" (from a float graph).
        min_batch, opt_batch, max_batch: the optimization profile of a dynamic batch axis.
        typing: "auto", "strong" or "weak" (see the module docstring).
        workspace_mib: ``MemoryPoolType.WORKSPACE`` limit in MiB.
        timing_cache: timing-cache file (default: ``<fatq cache>/trt/timing.cache``), read before
            and written after the build so later builds skip kernel timing.
    """

    precision: str
    min_batch: int = 1
    opt_batch: int = 64
    max_batch: int = 64
    typing: str = "auto"
    workspace_mib: int = 1024
    timing_cache: str | None = None

    def __post_init__(self):
        if self.precision not in BUILD_PRECISIONS:
            raise FatqError(f"TensorRT precision must be one of {BUILD_PRECISIONS}, got {self.precision!r}.")
        if self.typing not in TYPINGS:
            raise FatqError(f"TensorRT typing must be one of {TYPINGS}, got {self.typing!r}.")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise FatqError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min_batch}/{self.opt_batch}/"
                f"{self.max_batch}."
            )
        if self.workspace_mib < 1:
            raise FatqError(f"workspace must be at least 1 MiB, got {self.workspace_mib}.")


def choose_typing(
    trt_version: str, precision: str, graph_precision: str, requested: str = "auto", calibrated: bool = False
) -> str:
    """ "strong" or "weak" for building ``precision`` from a graph of ``graph_precision``.

    Args:
        trt_version: ``tensorrt.__version__``.
        precision: the engine precision asked for ("int8", "fp16", "fp32").
        graph_precision: the ONNX graph's own ("int8" for QDQ, "fp32", "fp16").
        requested: "auto", "strong" or "weak".
        calibrated: an implicit INT8 calibrator is given (legacy path: int8 from an fp32 graph,
            weakly typed, TensorRT 10.x only).

    Raises:
        FatqError: for combinations that cannot produce the asked precision.
    """
    major = major_version(trt_version)
    if calibrated:
        if major >= 11:
            raise FatqError(
                f"TensorRT {trt_version} has no implicit INT8 calibration (removed in 11); use a QDQ graph."
            )
        if precision != "int8" or graph_precision != "fp32" or requested == "strong":
            raise FatqError("an INT8 calibrator builds a weakly typed int8 engine from an fp32 graph, nothing else.")
        return "weak"
    if precision == "int8" and graph_precision != "int8":
        raise FatqError("an int8 TensorRT engine needs a QDQ graph (fatq-export --format onnx); this one has no Q/DQ.")
    if precision != "int8" and graph_precision == "int8":
        raise FatqError(f"a QDQ graph builds an int8 engine, not {precision}; use the onnx-fp32 twin for baselines.")
    needs_weak = precision == "fp16" and graph_precision == "fp32"
    if requested == "weak" or (requested == "auto" and needs_weak):
        if major >= 11:
            raise FatqError(
                f"TensorRT {trt_version} has no weak typing (removed in 11); "
                + (
                    "build fp16 from an fp16 ONNX (convert the fp32 graph first, e.g. with ModelOpt AutoCast)."
                    if needs_weak
                    else "use the strongly typed path."
                )
            )
        return "weak"
    if needs_weak:
        raise FatqError("a strongly typed network runs an fp32 graph in fp32; use --trt-typing weak for fp16.")
    return "strong"


def builder_flags(typing: str, precision: str) -> list[str]:
    """Names of ``tensorrt.BuilderFlag`` members to set (none on the strongly typed path)."""
    if typing == "strong":
        return []
    return {"int8": ["INT8", "FP16"], "fp16": ["FP16"], "fp32": []}[precision]


def format_parser_error(error) -> str:
    """One line per ONNX parser error, naming the node (TensorRT 10 ``IParserError``)."""
    return f"node {error.node()} '{error.node_name()}' ({error.node_operator()}): {error.desc()}"


def _default_timing_cache() -> Path:
    return cache_dir() / "trt" / "timing.cache"


def build_engine(onnx_path: str | Path, plan_path: str | Path, settings: BuildSettings, int8_calibrator=None) -> dict:
    """Build a TensorRT engine from ``onnx_path`` and write ``plan_path`` plus its sidecar.

    Not run in this project (see the module docstring).

    Args:
        onnx_path: QDQ ONNX (int8 engine) or onnx-fp32 file (fp32/fp16 engines).
        plan_path: where the serialized engine goes; the sidecar goes to ``<plan_path>.json``.
        settings: precision, batch profile, typing, workspace, timing cache.
        int8_calibrator: legacy implicit INT8 calibration (TensorRT 10.x only, deprecated since
            10.1): an ``IInt8Calibrator`` such as
            :func:`calibration.trt_calibrator.make_entropy_calibrator`, with an fp32 graph and
            ``precision="int8"``; it is set as ``config.int8_calibrator`` and the batch profile
            doubles as the calibration profile.

    Returns:
        The sidecar dict (also written next to the plan).
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    onnx_info = inspect_model(onnx_path)
    if onnx_info.kind != ONNX:
        raise FatqError(f"{onnx_path} is not an ONNX model; TensorRT engines are built from ONNX files.")
    if not plan_path.parent.is_dir():
        raise FatqError(f"directory {plan_path.parent} does not exist (for {plan_path.name}).")
    trt = import_extra("tensorrt")
    gpu = require_gpu()
    calibrated = int8_calibrator is not None
    typing = choose_typing(trt.__version__, settings.precision, onnx_info.precision, settings.typing, calibrated)
    flags = builder_flags(typing, settings.precision)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network_flags = 0
    if typing == "strong":
        network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):  # the path resolves external weights
        errors = [format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise FatqError(f"TensorRT cannot parse {onnx_path.name}: {'; '.join(errors[:5]) or 'no details'}.")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile_shapes = _add_batch_profile(builder, network, config, settings, calibration=calibrated)
    if calibrated:
        config.int8_calibrator = int8_calibrator

    cache_path = Path(settings.timing_cache) if settings.timing_cache else _default_timing_cache()
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    timing_cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(timing_cache, False)  # False: refuse a cache from another device/version

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise FatqError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above).")
    write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    write_bytes_atomic(plan_path, bytes(plan))

    int8_scales = None
    if settings.precision == "int8":
        int8_scales = "legacy implicit INT8 calibrator" if calibrated else "Q/DQ nodes of the graph"
    sidecar = {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "tensorrt_version": trt.__version__,
        "gpu_name": gpu.name,
        "compute_capability": gpu.compute_capability,
        "precision": settings.precision,
        "typing": typing,
        "builder_flags": flags,
        "network_flags": ["STRONGLY_TYPED"] if typing == "strong" else [],
        "int8_scales": int8_scales,
        "profile": profile_shapes,
        "build_settings": asdict(settings),
        "source_onnx": onnx_path.name,
        "source_onnx_sha256": sha256_file(onnx_path),
        "source_metadata": onnx_info.metadata,
        "plan_sha256": sha256_file(plan_path),
        "fatq_version": __version__,
        "git_commit": git_commit(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    write_bytes_atomic(plan_sidecar_path(plan_path), (json.dumps(sidecar, indent=2) + "\n").encode())
    return sidecar


def _add_batch_profile(builder, network, config, settings: BuildSettings, calibration: bool = False) -> dict:
    """An optimization profile with the batch axis dynamic; other axes must be fixed.

    With ``calibration`` the same profile is the calibration profile (implicit INT8 calibration
    of a dynamic-shape network needs one).
    """
    profile = builder.create_optimization_profile()
    shapes, dynamic = {}, False
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise FatqError(f"input {tensor.name} has dynamic non-batch axes {shape}; export with a fixed image size.")
        if shape[0] >= 0:
            if not shape[0] >= settings.max_batch:
                raise FatqError(
                    f"input {tensor.name} has a fixed batch of {shape[0]}, smaller than the largest batch "
                    f"{settings.max_batch}; export with a dynamic batch."
                )
            shapes[tensor.name] = {"min": list(shape), "opt": list(shape), "max": list(shape)}
            continue
        dynamic = True
        rest = shape[1:]
        lo, opt, hi = (settings.min_batch, *rest), (settings.opt_batch, *rest), (settings.max_batch, *rest)
        profile.set_shape(tensor.name, lo, opt, hi)
        shapes[tensor.name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
    if dynamic:
        config.add_optimization_profile(profile)
        if calibration:
            config.set_calibration_profile(profile)
    return shapes


def read_sidecar(plan_path: str | Path) -> dict:
    """The JSON sidecar of a plan; FatqError when it is missing or not fatq's."""
    path = plan_sidecar_path(plan_path)
    if not path.is_file():
        raise FatqError(
            f"{plan_path} has no sidecar {path.name}; rebuild the plan with fatq (it records how it was built)."
        )
    try:
        sidecar = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise FatqError(f"{path} is not readable JSON ({exc}).") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise FatqError(f"{path} is not a fatq TensorRT sidecar.")
    return sidecar


def sidecar_mismatches(sidecar: dict, trt_version: str, gpu: GpuInfo, plan_sha256: str | None) -> list[str]:
    """Why a plan cannot be used here: TensorRT version, GPU, compute capability, plan bytes.

    Plans are specific to the TensorRT version and the GPU they were tuned on; TensorRT's own
    error for a mismatch is opaque, so fatq compares the sidecar first.
    """
    problems = []
    if sidecar.get("tensorrt_version") != trt_version:
        problems.append(f"built with TensorRT {sidecar.get('tensorrt_version')}, running {trt_version}")
    if sidecar.get("compute_capability") != gpu.compute_capability:
        problems.append(
            f"built for compute capability {sidecar.get('compute_capability')}, this GPU has {gpu.compute_capability}"
        )
    if sidecar.get("gpu_name") != gpu.name:
        problems.append(f"built on {sidecar.get('gpu_name')}, this GPU is {gpu.name}")
    if plan_sha256 is not None and sidecar.get("plan_sha256") != plan_sha256:
        problems.append("the plan file changed after its sidecar was written")
    return problems


def check_plan(plan_path: str | Path, trt_version: str, gpu: GpuInfo) -> dict:
    """Read and validate a plan's sidecar against the running TensorRT and GPU; returns it."""
    sidecar = read_sidecar(plan_path)
    problems = sidecar_mismatches(sidecar, trt_version, gpu, sha256_file(plan_path))
    if problems:
        raise FatqError(f"refusing {Path(plan_path).name}: {'; '.join(problems)}; rebuild it here.")
    return sidecar


def build_engine_cached(onnx_path: str | Path, settings: BuildSettings) -> Path:
    """A plan for ``onnx_path`` under the fatq cache, built once per ONNX content, settings and GPU.

    Returns:
        The plan path (its sidecar beside it).
    """
    trt = import_extra("tensorrt")
    gpu = require_gpu()
    onnx_path = Path(onnx_path)
    key = "-".join(
        [
            onnx_path.name.split(".")[0],
            sha256_file(onnx_path)[:12],
            settings.precision,
            settings.typing,
            f"b{settings.min_batch}-{settings.opt_batch}-{settings.max_batch}",
            f"trt{trt.__version__}",
            f"sm{gpu.compute_capability.replace('.', '')}",
        ]
    )
    folder = cache_dir() / "trt"
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / f"{key}.plan"
    if plan.is_file() and plan_sidecar_path(plan).is_file():
        sidecar = read_sidecar(plan)
        if not sidecar_mismatches(sidecar, trt.__version__, gpu, sha256_file(plan)):
            return plan
    build_engine(onnx_path, plan, settings)
    return plan
