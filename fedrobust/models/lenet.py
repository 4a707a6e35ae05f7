"""Networks sized for 28x28 grey images (MNIST, Fashion-MNIST).

``lenet`` has LeNet-5's layers (LeCun et al. 1998: 5x5 convolutions with 6
and 16 channels, each followed by pooling, then 120 and 84 hidden units),
with batch norm and ReLU in place of the scaled tanh, so that the
learning-rate grid up to 0.4 trains instead of diverging, and "same"
padding, so that it also builds on 8x8 digits. 62k parameters, about 0.04 ms per
image forward on 2 cores: the default member for 28x28 data, cheap enough to
be attacked with 1,000 Square queries on 1,000 images in minutes.

``convnet`` is the two-convolution network of the PyTorch and Keras MNIST
examples (3x3 convolutions with 32 and 64 channels, each followed by 2x2
pooling, then 128 hidden units), with batch norm: a second convolutional
family for the 28x28 surrogate zoo, wider and ten times slower than LeNet.

Both build on any image size: the last pooling is adaptive, to LeNet-5's
5x5 map and to the 7x7 map the convnet has on 28x28 inputs.
"""

from torch import nn


def _conv(cin: int, cout: int, k: int, padding: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class LeNet5(nn.Module):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv(in_channels, 6, 5, padding=2), nn.MaxPool2d(2),
            *_conv(6, 16, 5, padding=2), nn.AdaptiveMaxPool2d(5), nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.BatchNorm1d(120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.BatchNorm1d(84), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(84, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class ConvNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, int] = (32, 64), hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv(in_channels, widths[0], 3, padding=1), nn.MaxPool2d(2),
            *_conv(widths[0], widths[1], 3, padding=1), nn.AdaptiveMaxPool2d(7), nn.Flatten(),
            nn.Linear(widths[1] * 7 * 7, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))
