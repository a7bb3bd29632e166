"""DenseNet-BC for CIFAR (Huang et al. 2017): dense blocks of bottleneck layers, compression 0.5."""
from __future__ import annotations

import torch
from torch import nn

from .common import CifarNet, DropoutConfig, conv1x1, conv3x3, init_weights


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1(4k)-[a]-BN-ReLU-[b]-conv3x3(k), concatenated to its input."""

    def __init__(self, cin: int, growth: int, dropout: DropoutConfig):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv1x1(cin, 4 * growth)
        self.drop_a = dropout.layer("a")
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.drop_b = dropout.layer("b")
        self.conv2 = conv3x3(4 * growth, growth)

    def forward(self, x):
        out = self.bn1(x)
        out = self.relu1(out)
        out = self.conv1(out)
        out = self.drop_a(out)
        out = self.bn2(out)
        out = self.relu2(out)
        out = self.drop_b(out)
        out = self.conv2(out)
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 (compression) - 2x2 average pooling."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = conv1x1(cin, cout)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        out = self.bn(x)
        out = self.relu(out)
        out = self.conv(out)
        return self.pool(out)


class DenseNetBC(CifarNet):
    """DenseNet-BC-depth-growth.

    Args:
        depth: 6n+4 (100 in the paper: n = 16 layers per block).
        growth: channels each layer adds (k = 12 in the paper).
        dropout: where and how noise is injected.
    """

    def __init__(self, depth: int = 100, num_classes: int = 10, dropout: DropoutConfig = DropoutConfig(),
                 growth: int = 12):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = 2 * growth
        self.conv = conv3x3(3, channels)
        stages = []
        for stage in range(3):
            for _ in range(n):
                stages.append(DenseLayer(channels, growth, dropout))
                channels += growth
            if stage < 2:
                stages.append(Transition(channels, channels // 2))
                channels //= 2
        self.blocks = nn.Sequential(*stages)
        self.add_classifier(channels, num_classes, dropout, pre_activation=True)
        init_weights(self)

    def forward(self, x):
        return self.classify(self.blocks(self.conv(x)))


def densenet(depth: int = 100, num_classes: int = 10, dropout: DropoutConfig = DropoutConfig(),
             growth: int = 12, **_) -> DenseNetBC:
    return DenseNetBC(depth, num_classes, dropout, growth)
