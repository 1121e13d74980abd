"""ONNX Runtime runner: CPU with a fixed thread count; CUDA and TensorRT EPs with onnxruntime-gpu.

CPU sessions use ``intra_op_num_threads = threads``, ``inter_op_num_threads = 1``, sequential
execution and every graph optimization (at level >= EXTENDED ORT fuses QDQ groups into
QLinearConv/QLinearMatMul; DEPLOY.md). Intra-op threads spin between ops as ONNX Runtime does
by default (what users get; without spinning the int8 ResNet-20, with its many small Q/DQ/Clip
ops, ran 5–10 % slower at batch 64 in two measurements); fatq-bench gives every runner an
untimed call at the start of each turn (:func:`engines.timing.time_interleaved`), so the
spinning tail of the session that ran before does not land in the timed calls.
The CUDA and TensorRT execution providers need the
onnxruntime-gpu wheel and a GPU; they were not run in this project's CI (no GPU there).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from engines.host import cpu_device, gpu_info, saturating_u8s8
from engines.model_files import ModelFile, onnx_model_file
from engines.runner import Runner, RunnerInfo, TensorMeta
from export.ort_writer import PRECISION_KEY as ORT_PRECISION_KEY
from fatq.errors import FatqError, MissingExtraError
from fatq.extras import import_extra
from fatq.io import cache_dir

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
# ONNX tensor type strings as ORT reports them -> numpy dtypes
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


def ort_reason(exc: BaseException) -> str:
    """ONNX Runtime's message on one line, without its ``[ONNXRuntimeError] : 10 : INVALID_GRAPH :`` prefix."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text).rstrip(".") or type(exc).__name__


class OrtRunner(Runner):
    """An ONNX model in an ONNX Runtime InferenceSession.

    Args:
        model: ONNX file (QDQ int8 or float), its :class:`~engines.model_files.ModelFile`, or
            an ``onnx.ModelProto`` / its bytes (loaded from memory).
        threads: intra-op threads (CPU provider); None lets ORT choose (all cores).
        provider: "cpu", "cuda" or "trt" (the TensorRT EP; the last two need onnxruntime-gpu and a GPU).
        name: label used in errors and reports (default: the file name).
        trt_cache_dir: engine/timing cache directory of the TensorRT EP (default under the fatq
            cache directory).
    """

    def __init__(
        self,
        model: str | Path | ModelFile | bytes,
        threads: int | None = None,
        provider: str = "cpu",
        name: str | None = None,
        trt_cache_dir: str | Path | None = None,
    ):
        model_file = onnx_model_file(model)
        super().__init__(name or model_file.path.name)
        if provider not in PROVIDERS:
            raise FatqError(f"unknown ONNX Runtime provider {provider!r}; use one of {sorted(PROVIDERS)}.")
        if threads is not None and threads < 1:
            raise FatqError(f"threads must be at least 1, got {threads}.")
        self.model_file = model_file
        self.threads = threads
        self.provider = provider
        self.trt_cache_dir = Path(trt_cache_dir) if trt_cache_dir else None
        self._session = None
        self._ort = None

    def _provider_list(self, ort) -> list:
        available = ort.get_available_providers()
        wanted = PROVIDERS[self.provider]
        if wanted not in available:
            if self.provider == "cpu":
                raise FatqError(f"this onnxruntime build has no CPU provider (it has {available}).")
            raise MissingExtraError("onnxruntime-gpu", "gpu")
        if self.provider == "cpu":
            return ["CPUExecutionProvider"]
        if self.provider == "cuda":
            return [("CUDAExecutionProvider", {}), "CPUExecutionProvider"]
        cache = self.trt_cache_dir or (cache_dir() / "ort-trt")
        cache.mkdir(parents=True, exist_ok=True)
        # A QDQ graph carries its own scales, so INT8 needs no calibration table (DEPLOY.md).
        trt_options = {
            "trt_int8_enable": self.model_file.precision == "int8",
            "trt_fp16_enable": self.model_file.precision == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
        }
        return [("TensorrtExecutionProvider", trt_options), ("CUDAExecutionProvider", {}), "CPUExecutionProvider"]

    def _activate(self) -> None:
        ort = import_extra("onnxruntime")
        options = ort.SessionOptions()
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: ORT warns about every unused initializer
        # Worker threads spin during a call (ORT's default) but stop when it returns: otherwise a session's
        # spinning tail runs into the next runner's calls when fatq-bench interleaves them, and slows most
        # the files with the most (small) ops (ONNX Runtime 1.32, 2 threads: a W4A4 ResNet-20 0.91x its
        # peer interleaved with spinning tails, 1.00x timed alone or with this option, docs/performance.md)
        options.add_session_config_entry("session.force_spinning_stop", "1")
        if saturating_u8s8():
            # keep a QDQ file's int8 Q/DQ pairs int8 (ORT turns them into uint8 on x86 by default): its s8 x s8
            # kernels stay within int16 (2 * 127 * 127 < 2^15) where the u8 x s8 ones saturate (engines/host.py)
            options.add_session_config_entry("session.qdqisint8allowed", "1")
            if json.loads(self.model_file.metadata.get(ORT_PRECISION_KEY, "[]")):
                # an onnx-ort file's u8 x s8 convs that can leave int16 (export.ort_writer.saturates_u8s8):
                # ORT then stores their weights as uint8 and runs u8 x u8, exact (Avx2WeightS8ToU8Transformer)
                options.add_session_config_entry("session.x64quantprecision", "1")
        try:
            self._session = ort.InferenceSession(self.model_file.source, options, providers=self._provider_list(ort))
        except FatqError:
            raise
        except Exception as exc:  # ORT 1.32's InvalidGraph/Fail/NotImplemented derive from Exception only
            raise FatqError(f"ONNX Runtime cannot load {self.model_file.path.name}: {ort_reason(exc)}.") from None
        self._ort = ort

    def _input_metadata(self) -> dict[str, TensorMeta]:
        return {
            i.name: TensorMeta(np.dtype(_ORT_DTYPES.get(i.type, np.float32)), tuple(i.shape))
            for i in self._session.get_inputs()
        }

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self._session.get_outputs()]
        try:
            outputs = self._session.run(names, {k: feeds[k] for k in self._input_metadata()})
        except Exception as exc:  # a kernel that fails on these inputs (shapes the graph cannot take)
            raise FatqError(f"ONNX Runtime cannot run {self.model_file.path.name}: {ort_reason(exc)}.") from None
        return dict(zip(names, outputs, strict=True))

    def _close(self) -> None:
        self._session = None

    def info(self) -> RunnerInfo:
        version = self._ort.__version__ if self._ort else import_extra("onnxruntime").__version__
        if self.provider == "cpu":
            device = cpu_device()
        else:
            gpu = gpu_info()
            device = gpu.describe() if gpu else "CUDA GPU"
        providers = self._session.get_providers() if self._session else [PROVIDERS[self.provider]]
        return RunnerInfo(
            engine="ort" if self.provider == "cpu" else f"ort-{self.provider}",
            engine_version=version,
            device=device,
            precision=self.model_file.precision,
            threads=self.threads,
            options={"providers": providers, "graph_optimization_level": "ORT_ENABLE_ALL", "inter_op_threads": 1},
        )
