"""MobileNetV2 (Sandler et al. 2018), width 1.0, in torchvision's layout and module names.

``features.0`` is the 3×3/2 stem, ``features.1..17`` the inverted residual blocks (each with a
``conv`` Sequential), ``features.18`` the 1×1 conv to 1280 channels, ``classifier`` = dropout +
linear; state dicts of torchvision's ``mobilenet_v2`` load into the FP32 model unchanged.

Signedness of the quantized inputs follows what feeds them: a block's output is a *linear*
bottleneck (BN, no activation, plus the residual), so the expansion 1×1 conv of every block but
the first, and ``features.18``, get signed input quantizers; depthwise and projection convs
follow a ReLU6 and stay unsigned. Depthwise convs (groups = channels) are FAT-quantized too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fatq.models.registry import register_model
from fatq.models.weight_init import torchvision_init
from fatq.qconfig import LayerFactory

# (expansion t, output channels c, repeats n, first stride s), from the paper's Table 2.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS, LAST_CHANNELS = 32, 1280


class ConvBNReLU6(nn.Sequential):
    """conv (padding (k-1)/2) + BN + ReLU6, as torchvision's ``Conv2dNormActivation``."""

    def __init__(
        self,
        layers: LayerFactory,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        signed_input: bool = False,
    ):
        conv = layers.conv(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, signed_input=signed_input)
        super().__init__(conv, nn.BatchNorm2d(out_ch), nn.ReLU6(inplace=False))


class InvertedResidual(nn.Module):
    """1×1 expansion (ReLU6) -> 3×3 depthwise (ReLU6) -> 1×1 linear projection + BN (+ input).

    Args:
        layers: the model's layer factory.
        in_ch: input channels.
        out_ch: output channels.
        stride: stride of the depthwise conv.
        expand_ratio: hidden channels = in_ch · expand_ratio; 1 omits the expansion conv.
        signed_input: whether the block input can be negative (the previous block's linear
            bottleneck) rather than a ReLU6 output (the stem).

    With stride 1 and in_ch == out_ch the block is residual and both Add inputs get an 8-bit
    signed quantizer (``branch_quantizer``, ``shortcut_quantizer``), Identity in FP32; under
    TensorRT's placement (QuantSpec target "trt") only the shortcut is quantized. Under the CPU
    engines' (target "cpu") the shortcut reads the block input as the expansion conv's input
    quantizer quantizes it and has no quantizer of its own: one quantizer per block input, so the
    conv that writes it runs once, not once per quantizer.
    """

    def __init__(
        self, layers: LayerFactory, in_ch: int, out_ch: int, stride: int, expand_ratio: int, signed_input: bool
    ):
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_res_connect = stride == 1 and in_ch == out_ch
        blocks: list[nn.Module] = []
        if expand_ratio != 1:
            blocks.append(ConvBNReLU6(layers, in_ch, hidden, 1, signed_input=signed_input))
        # Without expansion the block input feeds the depthwise conv directly.
        depthwise_signed = signed_input and expand_ratio == 1
        blocks += [
            ConvBNReLU6(layers, hidden, hidden, 3, stride, groups=hidden, signed_input=depthwise_signed),
            layers.conv(hidden, out_ch, 1, 1, 0),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*blocks)
        # target "cpu": the shortcut reads the expansion conv's input integers
        self.shares_input = self.use_res_connect and expand_ratio != 1 and layers.shares_block_input
        if self.use_res_connect:
            self.branch_quantizer = layers.residual_quantizer(signed=True, branch=True)
            self.shortcut_quantizer = (
                nn.Identity() if self.shares_input else layers.residual_quantizer(signed=signed_input)
            )

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_ch, H, W] -> [B, out_ch, H / stride, W / stride]."""
        if not self.use_res_connect:  # fixed at construction: no data-dependent control flow
            return self.conv(x)
        # the same quantizer on the same x gives the shortcut the expansion conv's integers (export folds
        # the two calls into one tensor)
        shortcut = self.conv[0][0].input_quantizer(x) if self.shares_input else self.shortcut_quantizer(x)
        return self.branch_quantizer(self.conv(x)) + shortcut


class MobileNetV2(nn.Module):
    """MobileNetV2, width 1.0.

    Input [B, in_channels (3), H, W] (normalized image, H = W = 224 nominal; any multiple of 32 works)
    -> logits [B, num_classes].
    """

    def __init__(self, layers: LayerFactory, num_classes: int, dropout: float = 0.2, in_channels: int = 3):
        super().__init__()
        features: list[nn.Module] = [
            nn.Sequential(
                layers.first_conv(in_channels, STEM_CHANNELS, 3, 2, 1),
                nn.BatchNorm2d(STEM_CHANNELS),
                nn.ReLU6(inplace=False),
            )
        ]
        in_ch, signed = STEM_CHANNELS, False  # the stem ends in ReLU6
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                features.append(InvertedResidual(layers, in_ch, c, s if i == 0 else 1, t, signed_input=signed))
                in_ch, signed = c, True  # every block ends in a linear bottleneck
        features.append(ConvBNReLU6(layers, in_ch, LAST_CHANNELS, 1, signed_input=signed))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(dropout), layers.last_linear(LAST_CHANNELS, num_classes))
        # torchvision's initialisation.
        torchvision_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@register_model("mobilenetv2", input_size=(3, 224, 224), family="imagenet")
def mobilenetv2(layers: LayerFactory, num_classes: int, in_channels: int = 3) -> MobileNetV2:
    return MobileNetV2(layers, num_classes, in_channels=in_channels)
