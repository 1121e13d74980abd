"""One import guard for every optional package fatq uses, with one message policy.

``import_extra("openvino")`` returns the module or raises :class:`fatq.errors.MissingExtraError`,
whose sentence names the pip package and the fatq extra that installs it (``pip install
'fatq[openvino]'``), or says to reinstall fatq for a core dependency (onnxruntime). Engine
packages are imported only through here, inside the functions that need them, so importing any
fatq module never needs them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from fatq.errors import MissingExtraError

# module to import -> (pip package, fatq extra; None = a core dependency of fatq)
EXTRAS: dict[str, tuple[str, str | None]] = {
    "onnxruntime": ("onnxruntime", None),
    "openvino": ("openvino", "openvino"),
    "tensorrt": ("tensorrt", "trt"),
    "cuda.bindings.runtime": ("cuda-python", "trt"),
    "pycuda.autoinit": ("pycuda", "trt"),  # creates the CUDA context (then pycuda.driver imports)
    "matplotlib": ("matplotlib", "plot"),
}


def import_extra(module: str) -> ModuleType:
    """``import module`` (a key of :data:`EXTRAS`), or MissingExtraError naming what to install."""
    package, extra = EXTRAS[module]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(package, extra) from None


def import_cudart() -> ModuleType:
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        return import_extra("cuda.bindings.runtime")
    except MissingExtraError:
        try:
            return importlib.import_module("cuda.cudart")
        except ImportError:
            raise MissingExtraError(*EXTRAS["cuda.bindings.runtime"]) from None
