"""The interface every inference engine implements (Polygraphy's runner shape).

A :class:`Runner` wraps one model on one engine::

    with OrtRunner("model.onnx", threads=2) as runner:
        meta = runner.input_metadata()          # {"input": TensorMeta(float32, ("batch", 3, 32, 32))}
        outputs = runner.infer({"input": x})    # {"logits": float32 [B, 10]}

``activate()`` loads the model (sessions, compiled models, engines), ``close()`` releases it;
both are idempotent. Engine packages are imported inside ``activate`` (or the constructor's
first use), so importing this package never needs onnxruntime, openvino or tensorrt; a missing
one raises :class:`fatq.errors.MissingExtraError` naming the pip extra.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from fatq.errors import FatqError


@dataclass(frozen=True)
class TensorMeta:
    """Type and shape of one input or output.

    Attributes:
        dtype: numpy dtype of the buffer the engine expects.
        shape: one entry per axis: an int for a fixed size, a string (the symbolic name) or
            None for a dynamic one.
    """

    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size when axis 0 is fixed, else None."""
        first = self.shape[0] if self.shape else None
        return first if isinstance(first, int) and first > 0 else None

    def sample_shape(self) -> tuple[int | str | None, ...]:
        """Shape without the batch axis."""
        return tuple(self.shape[1:])


@dataclass(frozen=True)
class RunnerInfo:
    """What a report says about the engine a runner uses.

    Attributes:
        engine: short engine name ("ort", "openvino", "trt", "torch").
        engine_version: version string of the engine package.
        device: human-readable device, e.g. "CPU (Intel Xeon ...)" or "NVIDIA H200 (sm_90)".
        precision: "int8", "fp16", "fp32" or "bf16": the arithmetic the run is labelled with.
        threads: CPU threads the engine may use (None where it does not apply, e.g. GPU).
        options: engine settings that explain the numbers (providers, precision hints, ...).
    """

    engine: str
    engine_version: str
    device: str
    precision: str
    threads: int | None
    options: dict


class Runner(abc.ABC):
    """One model on one engine; subclasses implement the ``_activate``/``_infer``/``_close`` hooks."""

    def __init__(self, name: str):
        self.name = name
        self._active = False

    # ----------------------------------------------------------------- lifecycle
    def activate(self) -> Runner:
        """Load the model; returns ``self`` so ``runner = Runner(...).activate()`` works."""
        if not self._active:
            self._activate()
            self._active = True
        return self

    def close(self) -> None:
        """Release sessions, engines and device memory (safe to call twice)."""
        if self._active:
            self._close()
            self._active = False

    @property
    def is_active(self) -> bool:
        return self._active

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- inference
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once.

        Args:
            feeds: {input name: array} with the dtype and (batch-compatible) shape of
                :meth:`input_metadata`.

        Returns:
            {output name: array} owned by the caller (never a buffer the engine reuses).
        """
        if not self._active:
            raise FatqError(f"runner {self.name} is not active; call activate() or use it as a context manager.")
        expected = self.input_metadata()
        missing = [name for name in expected if name not in feeds]
        if missing:
            raise FatqError(f"runner {self.name} needs inputs {missing}, got {sorted(feeds)}.")
        for name, meta in expected.items():
            _check_feed(self.name, name, feeds[name], meta)
        return self._infer(feeds)

    def input_metadata(self) -> dict[str, TensorMeta]:
        """{input name: TensorMeta}; available once active."""
        if not self._active:
            raise FatqError(f"runner {self.name} is not active; call activate() first.")
        return self._input_metadata()

    def last_timing(self) -> dict[str, float] | None:
        """Engine-side timing of the last :meth:`infer` in ms (``engine_ms``, ``h2d_ms``, ``d2h_ms``).

        Only engines that time themselves on the device (TensorRT) report this; the others
        return None and are timed by wall clock around :meth:`infer`.
        """
        return None

    def max_batch(self) -> int | None:
        """Largest batch the runner accepts, or None when the batch axis is unbounded.

        The base version reads a fixed batch axis from :meth:`input_metadata` (a fixed axis
        accepts exactly that batch); engines with optimization profiles override it.
        """
        fixed = [meta.fixed_batch for meta in self.input_metadata().values() if meta.fixed_batch]
        return min(fixed) if fixed else None

    def memory_bytes(self) -> int | None:
        """Device memory the engine reports for one execution context, or None if it reports none."""
        return None

    @abc.abstractmethod
    def info(self) -> RunnerInfo:
        """Engine, version, device, precision and threads of this runner."""

    @abc.abstractmethod
    def _activate(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def _input_metadata(self) -> dict[str, TensorMeta]: ...

    @abc.abstractmethod
    def _close(self) -> None: ...


def _check_feed(runner: str, name: str, array: np.ndarray, meta: TensorMeta) -> None:
    """Reject a feed whose dtype or fixed dimensions differ from what the model declares."""
    if not isinstance(array, np.ndarray):
        raise FatqError(f"runner {runner}: input {name} must be a numpy array, got {type(array).__name__}.")
    if array.dtype != meta.dtype:
        raise FatqError(f"runner {runner}: input {name} must be {meta.dtype}, got {array.dtype}.")
    if len(array.shape) != len(meta.shape) or any(
        isinstance(want, int) and want > 0 and want != got for want, got in zip(meta.shape, array.shape, strict=True)
    ):
        raise FatqError(
            f"runner {runner}: input {name} has shape {tuple(array.shape)}, the model expects {tuple(meta.shape)}."
        )
