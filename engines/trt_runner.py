"""TensorRT runner: a serialized plan (built by :mod:`engines.trt_builder`) on one CUDA GPU.

**Not run in this project.** Written from the TensorRT 10/11 Python API documentation
(name-based I/O: ``num_io_tensors``, ``get_tensor_name``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``) and cuda-python's runtime bindings
(``cuda.bindings.runtime``, each call returning an ``(err, value...)`` tuple). It runs only
where ``tensorrt``, ``cuda-python`` and a GPU are present (``tests/gpu/test_trt_gpu.py``, marker ``trt``).

Before deserializing, the plan's sidecar is checked against the running TensorRT version and
GPU (:func:`engines.trt_builder.check_plan`): a mismatch is refused with the reason.

Every ``set_input_shape``, ``set_tensor_address`` and ``execute_async_v3`` result is checked (each
returns False on failure rather than raising).

Timing: four CUDA events per call split it into host->device copies, engine execution and
device->host copies; :meth:`TrtRunner.last_timing` reports the three in milliseconds, so
benchmarks quote engine-only latency and transfers separately (as trtexec does). Host arrays
are ordinary (pageable) numpy memory: copies are correct but not overlapped with compute.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engines.runner import Runner, RunnerInfo, TensorMeta
from engines.trt_builder import check_plan, require_gpu
from fatq.errors import FatqError
from fatq.extras import import_cudart, import_extra


def _check(cudart, result, what: str):
    """Unpack a cuda-python ``(err, *values)`` tuple, raising on an error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, message = cudart.cudaGetErrorString(err)
        raise RuntimeError(
            f"CUDA {what} failed: {message.decode(errors='replace') if isinstance(message, bytes) else message}"
        )
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class TrtRunner(Runner):
    """A TensorRT plan file on the first CUDA device.

    Args:
        plan_path: serialized engine with its ``.json`` sidecar.
        name: label used in errors and reports (default: the file name).
    """

    def __init__(self, plan_path: str | Path, name: str | None = None):
        super().__init__(name or Path(plan_path).name)
        self.plan_path = Path(plan_path)
        self.sidecar: dict | None = None
        self._trt = self._cudart = None
        self._runtime = self._engine = self._context = None
        self._stream = None
        self._events: list = []
        self._buffers: dict[str, tuple[int, int]] = {}  # tensor name -> (device pointer, capacity in bytes)
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._timing: dict[str, float] | None = None
        self._gpu = None

    def _activate(self) -> None:
        trt = import_extra("tensorrt")
        cudart = import_cudart()
        gpu = require_gpu()
        self.sidecar = check_plan(self.plan_path, trt.__version__, gpu)
        self._gpu = gpu
        logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self._engine is None:
            raise FatqError(f"TensorRT could not deserialize {self.plan_path.name} (see its log above).")
        self._context = self._engine.create_execution_context()
        self._stream = _check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._events = [_check(cudart, cudart.cudaEventCreate(), "cudaEventCreate") for _ in range(4)]
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._trt, self._cudart = trt, cudart

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(name)))

    def _input_metadata(self) -> dict[str, TensorMeta]:
        return {
            name: TensorMeta(
                self._dtype(name), tuple(d if d >= 0 else None for d in self._engine.get_tensor_shape(name))
            )
            for name in self._inputs
        }

    def max_batch(self) -> int | None:
        """Largest batch of the optimization profile (or the fixed batch)."""
        if not self._active:
            return None
        limits = []
        for name in self._inputs:
            shape = self._engine.get_tensor_shape(name)
            if shape[0] >= 0:
                limits.append(shape[0])
            else:
                _, _, largest = self._engine.get_tensor_profile_shape(name, 0)
                limits.append(largest[0])
        return min(limits) if limits else None

    def _device_buffer(self, name: str, nbytes: int) -> int:
        pointer, capacity = self._buffers.get(name, (0, 0))
        if capacity < nbytes:
            if pointer:
                _check(self._cudart, self._cudart.cudaFree(pointer), "cudaFree")
            pointer = int(_check(self._cudart, self._cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
            self._buffers[name] = (pointer, nbytes)
        return pointer

    def _bind(self, name: str, nbytes: int) -> None:
        """Give tensor ``name`` a device buffer of at least ``nbytes``; TensorRT's False is an error.

        ``IExecutionContext::setTensorAddress`` returns false for an unknown name or a misaligned
        pointer (TensorRT C++ API); ignoring it would run the engine on a stale address.
        """
        if not self._context.set_tensor_address(name, self._device_buffer(name, nbytes)):
            raise FatqError(f"{self.name}: TensorRT refused the device address of tensor {name!r}.")

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, context, stream = self._cudart, self._context, self._stream
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        hosts = {}
        for name in self._inputs:
            array = np.ascontiguousarray(feeds[name])
            if not context.set_input_shape(name, array.shape):
                raise FatqError(f"{self.name}: input {name} shape {array.shape} is outside the engine's profile.")
            hosts[name] = array
            self._bind(name, array.nbytes)
        for name in self._outputs:
            array = np.empty(tuple(context.get_tensor_shape(name)), dtype=self._dtype(name))
            hosts[name] = array
            self._bind(name, array.nbytes)
        start, copied_in, executed, copied_out = self._events
        _check(cudart, cudart.cudaEventRecord(start, stream), "cudaEventRecord")
        for name in self._inputs:
            pointer = self._buffers[name][0]
            _check(
                cudart,
                cudart.cudaMemcpyAsync(pointer, hosts[name].ctypes.data, hosts[name].nbytes, h2d, stream),
                "cudaMemcpyAsync (host to device)",
            )
        _check(cudart, cudart.cudaEventRecord(copied_in, stream), "cudaEventRecord")
        if not context.execute_async_v3(int(stream)):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.name}.")
        _check(cudart, cudart.cudaEventRecord(executed, stream), "cudaEventRecord")
        for name in self._outputs:
            pointer = self._buffers[name][0]
            _check(
                cudart,
                cudart.cudaMemcpyAsync(hosts[name].ctypes.data, pointer, hosts[name].nbytes, d2h, stream),
                "cudaMemcpyAsync (device to host)",
            )
        _check(cudart, cudart.cudaEventRecord(copied_out, stream), "cudaEventRecord")
        _check(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        self._timing = {
            "h2d_ms": float(_check(cudart, cudart.cudaEventElapsedTime(start, copied_in), "cudaEventElapsedTime")),
            "engine_ms": float(
                _check(cudart, cudart.cudaEventElapsedTime(copied_in, executed), "cudaEventElapsedTime")
            ),
            "d2h_ms": float(_check(cudart, cudart.cudaEventElapsedTime(executed, copied_out), "cudaEventElapsedTime")),
        }
        return {name: hosts[name] for name in self._outputs}

    def last_timing(self) -> dict[str, float] | None:
        return self._timing

    def memory_bytes(self) -> int | None:
        """Device memory one execution context needs (``device_memory_size_v2`` where available)."""
        if self._engine is None:
            return None
        size = getattr(self._engine, "device_memory_size_v2", None)
        return int(size if size is not None else self._engine.device_memory_size)

    def _close(self) -> None:
        cudart = self._cudart
        for pointer, _ in self._buffers.values():
            cudart.cudaFree(pointer)
        self._buffers.clear()
        for event in self._events:
            cudart.cudaEventDestroy(event)
        self._events = []
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = self._engine = self._runtime = None

    def info(self) -> RunnerInfo:
        sidecar = self.sidecar or {}
        trt = self._trt or import_extra("tensorrt")
        device = self._gpu
        return RunnerInfo(
            engine="trt",
            engine_version=trt.__version__,
            device=device.describe() if device else sidecar.get("gpu_name", "CUDA GPU"),
            precision=sidecar.get("precision", "unknown"),
            threads=None,
            options={
                "typing": sidecar.get("typing"),
                "builder_flags": sidecar.get("builder_flags"),
                "profile": sidecar.get("profile"),
                "plan": self.plan_path.name,
                "timing": "cuda-events (engine only; transfers separate)",
            },
        )
