"""CIFAR ResNet-20/32/44/56/110 (He et al. 2016) with both shortcut variants.

Option A (the public checkpoints in ../shared/pretrained): where the shape changes, the
identity is subsampled and zero-padded; no parameters. Option B (the FAT paper's code): a
1×1 conv + BN. Module names match the public checkpoints (``conv1``, ``bn1``,
``layer{1,2,3}.{i}.conv{1,2}``, ``linear``) so they load after stripping ``module.``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fatq.models.registry import register_model
from fatq.models.residual import QuantizedBasicBlock
from fatq.models.weight_init import network_layers
from fatq.qconfig import LayerFactory


class SubsamplePad(nn.Module):
    """Option-A shortcut: x[:, :, ::2, ::2] zero-padded with ``pad`` channels on each side."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C + 2*pad, ceil(H/2), ceil(W/2)]."""
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(QuantizedBasicBlock):
    """CIFAR BasicBlock; ``shortcut`` is an Identity, option A (subsample + pad) or option B (1×1 conv + BN)."""

    def __init__(self, layers: LayerFactory, in_planes: int, planes: int, stride: int, shortcut: str):
        identity = stride == 1 and in_planes == planes
        # Only the conv + BN shortcut can be negative; the others carry the previous ReLU output.
        super().__init__(layers, in_planes, planes, stride, shortcut_signed=not identity and shortcut == "B")
        if identity:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = SubsamplePad(planes // 4)
        else:
            self.shortcut = nn.Sequential(layers.conv(in_planes, planes, 1, stride, 0), nn.BatchNorm2d(planes))

    def shortcut_path(self, x: Tensor) -> Tensor:
        return self.shortcut(x)


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs: 3 stages of ``depth // 6 // ... `` blocks, 16/32/64 channels.

    Input [B, in_channels (3), 32, 32] (normalized image) -> logits [B, num_classes].
    """

    def __init__(
        self, layers: LayerFactory, blocks_per_stage: int, num_classes: int, shortcut: str, in_channels: int = 3
    ):
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.conv1 = layers.first_conv(in_channels, 16, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=False)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(layers, in_planes, planes, stride if i == 0 else 1, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = layers.last_linear(64, num_classes)
        for m in network_layers(self):
            nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.flatten(self.pool(out)))


def _register(depth: int) -> None:
    @register_model(f"resnet{depth}", input_size=(3, 32, 32), family="cifar", shortcut="A")
    def build(layers: LayerFactory, num_classes: int, shortcut: str, in_channels: int = 3) -> CifarResNet:
        return CifarResNet(layers, (depth - 2) // 6, num_classes, shortcut, in_channels)


for _depth in (20, 32, 44, 56, 110):
    _register(_depth)
