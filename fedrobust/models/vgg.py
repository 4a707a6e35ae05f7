"""VGG with batch norm (Simonyan & Zisserman 2015), CIFAR head: one linear layer after global pooling.

VGG-16, and a VGG-7 (six convolutions, widths 32-128) for 8x8 digits.
"""

from torch import nn

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
_VGG7 = [32, 32, "M", 64, 64, "M", 128, 128, "M"]  # six convolutions and the linear head, for 8x8 inputs


class VGG(nn.Module):
    def __init__(self, spec: list, in_channels: int, num_classes: int) -> None:
        super().__init__()
        layers, cin = [], in_channels
        for v in spec:
            if v == "M":
                # ceil_mode keeps a 1x1 map at 1x1, so small images pass all five pools.
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def vgg16_bn(in_channels: int, num_classes: int) -> VGG:
    return VGG(_VGG16, in_channels, num_classes)


def vgg7_bn(in_channels: int, num_classes: int) -> VGG:
    return VGG(_VGG7, in_channels, num_classes)
