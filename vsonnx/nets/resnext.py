"""ResNeXt-29 for CIFAR (Xie et al. 2017): 3 stages x 3 post-activation bottlenecks with grouped 3x3 conv."""
from __future__ import annotations

from torch import nn

from .common import CifarNet, DropoutConfig, conv1x1, conv3x3, init_weights


class ResNeXtBlock(nn.Module):
    """conv1x1-BN-ReLU-gconv3x3-BN-ReLU-[b]-conv1x1-[a]-BN, plus shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, inner: int, cardinality: int, stride: int, dropout: DropoutConfig):
        super().__init__()
        self.conv1 = conv1x1(cin, inner)
        self.bn1 = nn.BatchNorm2d(inner)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(inner, inner, stride, groups=cardinality)
        self.bn2 = nn.BatchNorm2d(inner)
        self.relu2 = nn.ReLU(inplace=True)
        self.drop_b = dropout.layer("b")
        self.conv3 = conv1x1(inner, cout)
        self.drop_a = dropout.layer("a")
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu3 = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu1(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu2(out)
        out = self.drop_b(out)
        out = self.conv3(out)
        out = self.drop_a(out)
        out = self.bn3(out)
        out = out + self.shortcut(x)
        return self.relu3(out)


class ResNeXt(CifarNet):
    """ResNeXt-depth (9n+2) CxWd for CIFAR.

    Args:
        depth: 29 in the paper (n = 3 blocks per stage).
        cardinality: groups C of the 3x3 convolution (8 in ResNeXt-29 8x64d).
        base_width: width per group W in the first stage (64); doubles each stage.
        dropout: where and how noise is injected.
        width: stem channels (64); the stages output 4, 8 and 16 times it.
    """

    def __init__(self, depth: int = 29, num_classes: int = 10, dropout: DropoutConfig = DropoutConfig(),
                 cardinality: int = 8, base_width: int = 64, width: int = 64):
        super().__init__()
        if (depth - 2) % 9:
            raise ValueError(f"ResNeXt depth must be 9n+2, got {depth}")
        n = (depth - 2) // 9
        self.conv = conv3x3(3, width)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], width
        for stage in range(3):
            inner = cardinality * base_width * 2**stage
            cout = 4 * width * 2**stage
            for i in range(n):
                layers.append(ResNeXtBlock(cin, cout, inner, cardinality, 2 if stage > 0 and i == 0 else 1, dropout))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.add_classifier(cin, num_classes, dropout, pre_activation=False)
        init_weights(self)

    def forward(self, x):
        return self.classify(self.blocks(self.relu(self.bn(self.conv(x)))))


def resnext(depth: int = 29, num_classes: int = 10, dropout: DropoutConfig = DropoutConfig(),
            cardinality: int = 8, base_width: int = 64, width: int | None = None, **_) -> ResNeXt:
    return ResNeXt(depth, num_classes, dropout, cardinality, base_width, width or 64)
