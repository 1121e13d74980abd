"""Model definitions; importing this package registers them all."""

from fatq.models import mobilenetv2, resnet_cifar, resnet_imagenet, vgg  # noqa: F401  (registration)
from fatq.models.registry import create_model, list_models, model_info, register_model

__all__ = ["create_model", "list_models", "model_info", "register_model"]
