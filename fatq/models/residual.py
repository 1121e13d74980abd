"""The ResNet BasicBlock shared by the CIFAR and ImageNet ResNets.

Both families use conv3x3-BN-ReLU-conv3x3-BN, add a shortcut, then ReLU. They differ only in
the shortcut (CIFAR: ``shortcut``, an Identity, option-A pad or 1×1 conv + BN; ImageNet:
torchvision's ``downsample``, a 1×1 conv + BN or None), so subclasses own that module and
say how to apply it; the main branch and the quantized Add live here once.
"""

from __future__ import annotations

from torch import Tensor, nn

from fatq.qconfig import LayerFactory


class QuantizedBasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN + shortcut, then ReLU; both Add inputs quantized.

    Both inputs of the Add pass through an 8-bit quantizer (``branch_quantizer`` on the main
    branch, signed since it is a BN output; ``shortcut_quantizer`` on the shortcut) so integer
    engines see the whole block quantized; in the FP32 model both are Identity. Under
    TensorRT's placement (QuantSpec target "trt") the branch quantizer is Identity: the conv
    branch stays float into the Add. Under the CPU engines' (target "cpu") an identity-like shortcut
    reads the block input as conv1's input quantizer quantizes it, and has no quantizer of its own.

    Args:
        layers: the model's layer factory.
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first conv (and of the shortcut).
        shortcut_signed: whether the shortcut's output can be negative (a conv + BN); an
            identity or zero-padded shortcut carries the previous block's ReLU output.
    """

    def __init__(self, layers: LayerFactory, in_planes: int, planes: int, stride: int, shortcut_signed: bool):
        super().__init__()
        self.conv1 = layers.conv(in_planes, planes, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = layers.conv(planes, planes, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.branch_quantizer = layers.residual_quantizer(signed=True, branch=True)
        self.shortcut_quantizer = layers.residual_quantizer(signed=shortcut_signed)
        # target "cpu": an identity-like shortcut reads conv1's input integers (one quantizer per block input)
        self.shares_input = layers.shares_block_input and not shortcut_signed

    def shortcut_path(self, x: Tensor) -> Tensor:
        """The shortcut applied to the block input (subclasses own the module)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_planes, H, W] -> [B, planes, H / stride, W / stride]."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.branch_quantizer(self.bn2(self.conv2(out)))
        # conv1 quantizes x inside itself; the same quantizer on the same x gives the shortcut the same
        # integers (export folds the two calls into one tensor) at the cost of one more elementwise pass
        shortcut_input = self.conv1.input_quantizer(x) if self.shares_input else x
        return self.relu(out + self.shortcut_quantizer(self.shortcut_path(shortcut_input)))
