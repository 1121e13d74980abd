"""fatq: FAT quantization-aware training and export of CNNs to integer inference engines."""

from fatq.models import create_model, list_models, model_info, register_model
from fatq.provenance import __version__
from fatq.qconfig import QuantSpec

__all__ = ["QuantSpec", "__version__", "create_model", "list_models", "model_info", "register_model"]
