"""Model definitions; importing this package registers them all."""

from fatq.models import resnet_cifar  # noqa: F401  (registers resnet20..110)
from fatq.models.registry import create_model, list_models, model_info, register_model

__all__ = ["create_model", "list_models", "model_info", "register_model"]
