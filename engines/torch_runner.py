"""PyTorch runner: a fatq checkpoint's model on CPU or CUDA, in one of two modes.

- ``eval``: the model as trained, in eval mode: the FP32 network for a 32-bit checkpoint, the
  fake-quant network (integers * scales in float arithmetic) for a quantized one. This is the
  reference every engine's agreement is measured against.
- ``deploy``: the export stage's deploy reference module (the folded integers and scales
  replayed with engine semantics), so an engine can be compared with exactly what was exported.

CUDA runs (``device="cuda"``) were not exercised in this project's CI (no GPU there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from engines.host import cpu_device, gpu_info
from engines.runner import Runner, RunnerInfo, TensorMeta
from fatq.checkpoint import load_fatq_checkpoint, model_from_checkpoint
from fatq.errors import FatqError
from fatq.qconfig import QuantSpec

MODES = ("eval", "deploy")
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def build_checkpoint_module(data: dict, mode: str) -> nn.Module:
    """The module a checkpoint describes, in eval mode, for ``mode`` "eval" or "deploy".

    Args:
        data: a fatq checkpoint dict (:func:`fatq.checkpoint.load_fatq_checkpoint`).
        mode: "eval" (the trained model) or "deploy" (export's deploy reference).
    """
    if mode not in MODES:
        raise FatqError(f"torch mode must be one of {MODES}, got {mode!r}.")
    model = model_from_checkpoint(data).eval()
    if mode == "eval":
        return model
    # The export stage owns the engine semantics: fold, lower to integer ops, replay.
    from export.pipeline import deploy_graph
    from export.reference import DeployReference

    return DeployReference(deploy_graph(model, list(data["input_size"]))).eval()


class TorchRunner(Runner):
    """A torch module taking one image batch and returning logits.

    Args:
        module: the model; float32 input [B, C, H, W] -> logits [B, num_classes].
        input_size: (C, H, W) the model expects.
        precision: label for reports ("fp32", "fp16" for a half-precision CUDA run, "int8" for
            a quantized model, whose arithmetic is simulated in float).
        device: "cpu" or "cuda".
        threads: ``torch.set_num_threads`` while active (process-wide: torch has one pool).
        mode: "eval" or "deploy", recorded in reports.
        name: label used in errors and reports.
    """

    def __init__(
        self,
        module: nn.Module,
        input_size: tuple[int, int, int],
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
        mode: str = "eval",
        name: str = "torch",
    ):
        super().__init__(name)
        if device not in ("cpu", "cuda"):
            raise FatqError(f"torch device must be cpu or cuda, got {device!r}.")
        if device == "cuda" and not torch.cuda.is_available():
            raise FatqError("torch cannot see a CUDA GPU here; use the cpu device.")
        if precision == "fp16" and device != "cuda":
            raise FatqError("fp16 torch runs need a CUDA device.")
        if threads is not None and threads < 1:
            raise FatqError(f"threads must be at least 1, got {threads}.")
        self.module = module.eval()
        self.input_size = tuple(input_size)
        self.precision = precision
        self.device = device
        self.threads = threads
        self.mode = mode
        self._previous_threads: int | None = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        mode: str = "eval",
        device: str = "cpu",
        threads: int | None = None,
        half: bool = False,
        name: str | None = None,
    ) -> TorchRunner:
        """Runner for a fatq checkpoint (see the module docstring for ``mode``)."""
        data = load_fatq_checkpoint(path)
        module = build_checkpoint_module(data, mode)
        quantized = not checkpoint_is_float(data)
        if half and quantized:
            raise FatqError("fp16 applies to FP32 checkpoints only; a quantized model runs its own precision.")
        precision = "int8" if quantized else ("fp16" if half else "fp32")
        return cls(module, tuple(data["input_size"]), precision, device, threads, mode, name or Path(path).name)

    def _activate(self) -> None:
        if self.threads is not None:
            self._previous_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        self.module.to(device=self.device, dtype=dtype)

    def _input_metadata(self) -> dict[str, TensorMeta]:
        return {INPUT_NAME: TensorMeta(np.dtype(np.float32), ("batch", *self.input_size))}

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        with torch.inference_mode():
            x = torch.from_numpy(feeds[INPUT_NAME]).to(device=self.device, dtype=dtype)
            logits = self.module(x)
            # .cpu() synchronizes a CUDA stream, so wall-clock timing covers the whole run.
            return {OUTPUT_NAME: logits.float().cpu().numpy()}

    def _close(self) -> None:
        if self._previous_threads is not None:
            torch.set_num_threads(self._previous_threads)
            self._previous_threads = None

    def memory_bytes(self) -> int | None:
        """Peak CUDA memory torch allocated (CUDA runs only)."""
        return int(torch.cuda.max_memory_allocated()) if self.device == "cuda" else None

    def info(self) -> RunnerInfo:
        if self.device == "cuda":
            gpu = gpu_info()
            device = gpu.describe() if gpu else torch.cuda.get_device_name()
        else:
            device = cpu_device()
        return RunnerInfo(
            engine="torch" if self.device == "cpu" else "torch-cuda",
            engine_version=torch.__version__,
            device=device,
            precision=self.precision,
            threads=self.threads if self.device == "cpu" else None,
            options={"mode": self.mode, "fake_quant": self.mode == "eval" and self.precision == "int8"},
        )


def checkpoint_is_float(data: dict) -> bool:
    """Whether a fatq checkpoint holds an FP32 (32-bit) model."""
    return QuantSpec.from_dict(data["spec"]).is_float
