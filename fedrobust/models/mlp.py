"""A multilayer perceptron: the fully connected family of the digits surrogate zoo.

Its input is average-pooled to 8x8 first (the identity on 8x8 digits), so it
also builds for larger images without knowing their size.
"""

from torch import nn


class MLP(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, hidden: tuple[int, ...] = (256, 256), side: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(side), nn.Flatten()]
        cin = in_channels * side * side
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            cin = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))
