"""ImageNet ResNet-18/34 (He et al. 2016) with torchvision's module names.

``conv1`` (7×7/2) + ``bn1`` + ``relu`` + ``maxpool``, ``layer1..4`` of BasicBlocks whose
``downsample`` is a 1×1 conv + BN where the shape changes, ``avgpool``, ``fc``. State dicts of
torchvision's ``resnet18``/``resnet34`` load into the FP32 model unchanged. The global average
pool makes any input size work (224×224 nominal; tests use 64×64).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fatq.models.registry import register_model
from fatq.models.residual import QuantizedBasicBlock
from fatq.models.weight_init import network_layers, reset_batchnorm
from fatq.qconfig import LayerFactory


class BasicBlock(QuantizedBasicBlock):
    """torchvision's BasicBlock; ``downsample`` is a 1×1 conv + BN, or None for an identity shortcut."""

    def __init__(self, layers: LayerFactory, in_planes: int, planes: int, stride: int):
        identity = stride == 1 and in_planes == planes
        super().__init__(layers, in_planes, planes, stride, shortcut_signed=not identity)
        self.downsample = (
            None if identity else nn.Sequential(layers.conv(in_planes, planes, 1, stride, 0), nn.BatchNorm2d(planes))
        )

    def shortcut_path(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)


class ImageNetResNet(nn.Module):
    """ResNet with BasicBlocks for ImageNet-sized inputs.

    Args:
        layers: the model's layer factory.
        blocks_per_stage: blocks in layer1..4, e.g. (2, 2, 2, 2) for ResNet-18.
        num_classes: classifier outputs.

    Input [B, in_channels (3), H, W] (normalized image, H = W = 224 nominal) -> logits [B, num_classes].
    """

    def __init__(
        self,
        layers: LayerFactory,
        blocks_per_stage: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
    ):
        super().__init__()
        self.conv1 = layers.first_conv(in_channels, 64, 7, 2, 3)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages, in_planes = [], 64
        for planes, stride, count in zip((64, 128, 256, 512), (1, 2, 2, 2), blocks_per_stage, strict=True):
            blocks = []
            for i in range(count):
                blocks.append(BasicBlock(layers, in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = layers.last_linear(512, num_classes)
        # torchvision's initialisation (the classifier keeps nn.Linear's default).
        for m in network_layers(self):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        reset_batchnorm(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("resnet18", input_size=(3, 224, 224), family="imagenet")
def resnet18(layers: LayerFactory, num_classes: int, in_channels: int = 3) -> ImageNetResNet:
    return ImageNetResNet(layers, (2, 2, 2, 2), num_classes, in_channels)


@register_model("resnet34", input_size=(3, 224, 224), family="imagenet")
def resnet34(layers: LayerFactory, num_classes: int, in_channels: int = 3) -> ImageNetResNet:
    return ImageNetResNet(layers, (3, 4, 6, 3), num_classes, in_channels)
