"""CIFAR ResNet (He et al. 2016): 3x3 stem with stride 1 and no max-pool; and a narrow ResNet-8 for 8x8 digits."""

import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks_per_stage: list[int], in_channels: int, num_classes: int,
                 widths: tuple[int, ...] = (64, 128, 256, 512)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks_per_stage)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(cin, width, stride=2 if (i > 0 and j == 0) else 1))
                cin = width
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet18(in_channels: int, num_classes: int) -> ResNet:
    return ResNet([2, 2, 2, 2], in_channels, num_classes)


def resnet34(in_channels: int, num_classes: int) -> ResNet:
    return ResNet([3, 4, 6, 3], in_channels, num_classes)


def resnet8(in_channels: int, num_classes: int) -> ResNet:
    """A narrow ResNet for 8x8 inputs: one block per stage, widths 16-32-64 (1 + 3 x 2 + 1 = 8 layers)."""
    return ResNet([1, 1, 1], in_channels, num_classes, widths=(16, 32, 64))
