"""TensorRT's legacy implicit INT8 calibration: an ``IInt8EntropyCalibrator2`` fed with fatq's images.

Legacy path, TensorRT 10.x only: implicit INT8 calibration (``IBuilderConfig.int8_calibrator``
with ``BuilderFlag.INT8``) is deprecated since 10.1 and removed in TensorRT 11, where the only
INT8 path is an explicit Q/DQ network (fatq-export's QDQ ONNX). It is kept to compare
TensorRT's own calibration with fatq's calibrators on the same images: the cache it writes is
the text format of :mod:`calibration.trt_cache`, and a cache made from fatq's ranges can be
handed back through ``read_calibration_cache`` instead of calibrating.

``tensorrt`` and ``pycuda`` are imported inside :func:`make_entropy_calibrator` (the class must
subclass ``tensorrt.IInt8EntropyCalibrator2``, so it is defined there too). Nothing here can run
without an NVIDIA GPU and the ``trt`` extra; ``tests/calibration/test_trt_calibrator.py`` (marked ``trt``)
exercises it where both exist and skips elsewhere. It has not been run on TensorRT in this
workplace.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from calibration.trt_cache import parse_cache, write_cache
from fatq.errors import FatqError
from fatq.extras import import_extra

SUPPORTED_MAJOR = 10


def _import_tensorrt():
    trt = import_extra("tensorrt")
    major = int(trt.__version__.split(".")[0])
    if major > SUPPORTED_MAJOR or not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise FatqError(
            f"TensorRT {trt.__version__} has no implicit INT8 calibration (removed in TensorRT 11); "
            "build from fatq-export's QDQ ONNX instead."
        )
    if major < SUPPORTED_MAJOR:
        raise FatqError(f"the legacy calibrator supports TensorRT 10.x only, found {trt.__version__}.")
    return trt


def _import_pycuda():
    import_extra("pycuda.autoinit")  # creates the CUDA context the device buffers live in
    import pycuda.driver as cuda

    return cuda


def make_entropy_calibrator(
    batches: Iterable,
    batch_size: int,
    cache_path: str | Path | None = None,
    use_cache: bool = True,
):
    """An ``IInt8EntropyCalibrator2`` for a single-input network.

    Args:
        batches: iterable of normalized float32 arrays or CPU tensors [batch_size, C, H, W]
            (e.g. :class:`calibration.ptq.NormalizedBatches`); a final short batch is dropped,
            because TensorRT expects exactly ``batch_size`` images per call.
        batch_size: images per batch (the network's calibration batch).
        cache_path: where ``write_calibration_cache`` stores TensorRT's cache (atomically).
        use_cache: hand an existing cache at ``cache_path`` to TensorRT (it then skips calibration).

    Returns:
        The calibrator; set it as ``config.int8_calibrator`` with ``BuilderFlag.INT8`` on a weakly
        typed network. Its ``batches_served`` counts the batches TensorRT consumed.
    """
    trt = _import_tensorrt()
    cuda = _import_pycuda()

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)  # pybind11 base classes must be initialised explicitly
            self._batches = iter(batches)
            self._device = None
            self._nbytes = 0
            self.batches_served = 0

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]):
            if len(names) != 1:
                raise FatqError(f"the calibrator feeds single-input networks, this one has inputs {names}.")
            batch = next(self._batches, None)
            if batch is None:
                return None
            array = np.ascontiguousarray(np.asarray(batch, dtype=np.float32))
            if array.shape[0] != batch_size:
                return None  # a final short batch: stop rather than feed a wrong shape
            if self._device is None or array.nbytes != self._nbytes:
                self._device, self._nbytes = cuda.mem_alloc(array.nbytes), array.nbytes
            cuda.memcpy_htod(self._device, array)
            self.batches_served += 1
            return [int(self._device)]

        def read_calibration_cache(self):
            if use_cache and cache_path is not None and Path(cache_path).is_file():
                data = Path(cache_path).read_bytes()
                parse_cache(data)  # refuse a corrupt file with a clear error instead of TensorRT's
                return data
            return None

        def write_calibration_cache(self, cache) -> None:
            if cache_path is not None:
                write_cache(cache_path, bytes(cache))

    return EntropyCalibrator()
