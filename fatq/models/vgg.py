"""VGG networks for 32×32 inputs: VGG-Small ("vgg_7_bn" of the FAT/LQ-Nets papers) and VGG-16-BN.

Every conv is 3×3, padding 1, followed by BN and ReLU; "M" is a 2×2 max-pool. Module names
follow torchvision's VGG (``features.{i}``, ``classifier.{i}``).
"""

from __future__ import annotations

from torch import Tensor, nn

from fatq.models.registry import register_model
from fatq.models.weight_init import torchvision_init
from fatq.qconfig import LayerFactory

# METHOD.md §4: six convs + one linear ("vgg_7_bn").
VGG_SMALL = (128, 128, "M", 256, 256, "M", 512, 512, "M")
# Simonyan & Zisserman's configuration D (13 convs), as adapted to CIFAR.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """Conv-BN-ReLU stacks with max-pools, then (dropout and) one classifier layer.

    The first conv is the 8-bit edge layer, the classifier the 8-bit last layer, every other
    conv a FAT layer with an unsigned input (each follows a ReLU, possibly through a max-pool).

    Args:
        layers: the model's layer factory.
        config: channel counts, "M" for a 2×2 max-pool.
        num_classes: classifier outputs.
        feature_size: flattened size of the features for a 32×32 input (channels × H × W).
        dropout: dropout probability before the classifier (0: no dropout layer).

    Input [B, in_channels (3), 32, 32] (normalized image) -> logits [B, num_classes].
    """

    def __init__(
        self,
        layers: LayerFactory,
        config: tuple,
        num_classes: int,
        feature_size: int,
        dropout: float,
        in_channels: int = 3,
    ):
        super().__init__()
        features: list[nn.Module] = []
        in_ch = in_channels
        for item in config:
            if item == "M":
                features.append(nn.MaxPool2d(2, 2))
                continue
            make_conv = layers.first_conv if not features else layers.conv
            features += [make_conv(in_ch, item, 3, 1, 1), nn.BatchNorm2d(item), nn.ReLU(inplace=False)]
            in_ch = item
        self.features = nn.Sequential(*features)
        self.flatten = nn.Flatten(1)
        head: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        self.classifier = nn.Sequential(*head, layers.last_linear(feature_size, num_classes))
        # torchvision's VGG initialisation.
        torchvision_init(self, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.features(x)))


@register_model("vgg_small", input_size=(3, 32, 32), family="cifar")
def vgg_small(layers: LayerFactory, num_classes: int, in_channels: int = 3) -> VGG:
    """VGG-Small: three max-pools take 32×32 to 4×4, so the classifier sees 512 · 4 · 4 = 8192 features."""
    return VGG(layers, VGG_SMALL, num_classes, feature_size=512 * 4 * 4, dropout=0.5, in_channels=in_channels)


@register_model("vgg16_bn", input_size=(3, 32, 32), family="cifar")
def vgg16_bn(layers: LayerFactory, num_classes: int, in_channels: int = 3) -> VGG:
    """VGG-16-BN for CIFAR: five max-pools take 32×32 to 1×1, then Linear(512 -> classes)."""
    return VGG(layers, VGG16, num_classes, feature_size=512, dropout=0.0, in_channels=in_channels)
