"""ImageNet-size networks after torchvision's published architectures, with Dropout-(a) before the last BN
of every block (the networks users deploy, at 224 x 224; random weights: for scans, fixes and timings).

- ``resnet50``: ResNet-50 v1.5 (He et al. 2016; stride on the 3x3 conv), Bottleneck conv1x1-BN-ReLU-
  conv3x3-BN-ReLU-conv1x1-[a]-BN, plus the (projected) identity, then ReLU; 16 sites.
- ``mobilenet_v2``: MobileNetV2 (Sandler et al. 2018), inverted residuals expand 1x1-BN-ReLU6, depthwise
  3x3-BN-ReLU6, project 1x1-[a]-BN (linear bottleneck); classifier Dropout(0.2)-Linear; 17 sites.
- ``efficientnet_b0``: EfficientNet-B0 (Tan & Le 2019), MBConv expand-BN-SiLU, depthwise-BN-SiLU,
  squeeze-excitation, project 1x1-[a]-BN (stochastic depth left out); classifier Dropout(0.2)-Linear; 16 sites.
- ``densenet121``: DenseNet-121 (Huang et al. 2017), dense layers BN-ReLU-conv1x1-[a]-BN-ReLU-conv3x3
  (growth 32, bottleneck 4), transitions BN-ReLU-conv1x1-avgpool; 58 sites.
``IMAGENET_SITES`` gives the sites each one has with placement (a).
"""
from __future__ import annotations

import torch
from torch import nn

from .common import DropoutConfig, conv1x1, conv3x3

IMAGENET_SITES = {"resnet50": 16, "mobilenet_v2": 17, "efficientnet_b0": 16, "densenet121": 58}


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act()] if act else []))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, dropout: DropoutConfig):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = conv1x1(cin, width), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3, self.drop_a, self.bn3 = conv1x1(width, cout), dropout.layer("a"), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = (nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.drop_a(self.conv3(out)))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet50(num_classes: int = 1000, dropout: DropoutConfig = DropoutConfig()) -> nn.Module:
    layers, cin = [], 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1, dropout))
            cin = width * 4
    return nn.Sequential(_conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1), *layers,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


class InvertedResidual(nn.Module):
    """MobileNetV2's block, or with ``se`` and SiLU EfficientNet's MBConv."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, dropout: DropoutConfig, kernel: int = 3,
                 act: type = nn.ReLU6, se: bool = False):
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn(cin, hidden, 1, act=act)] if expand != 1 else []
        layers.append(_conv_bn(hidden, hidden, kernel, stride, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcitation(hidden, max(1, cin // 4)))
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), dropout.layer("a"), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1), nn.SiLU()

    def forward(self, x):
        scale = torch.sigmoid(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * scale


def mobilenet_v2(num_classes: int = 1000, dropout: DropoutConfig = DropoutConfig()) -> nn.Module:
    layers, cin = [_conv_bn(3, 32, 3, 2, act=nn.ReLU6)], 32
    for expand, cout, repeats, stride in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                                          (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(repeats):
            layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand, dropout))
            cin = cout
    return nn.Sequential(*layers, _conv_bn(cin, 1280, 1, act=nn.ReLU6), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(1280, num_classes))


def efficientnet_b0(num_classes: int = 1000, dropout: DropoutConfig = DropoutConfig()) -> nn.Module:
    layers, cin = [_conv_bn(3, 32, 3, 2, act=nn.SiLU)], 32
    for expand, kernel, stride, cout, repeats in ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                                                  (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)):
        for i in range(repeats):
            layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand, dropout, kernel, nn.SiLU, se=True))
            cin = cout
    return nn.Sequential(*layers, _conv_bn(cin, 1280, 1, act=nn.SiLU), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(1280, num_classes))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, dropout: DropoutConfig):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), conv1x1(cin, 4 * growth), dropout.layer("a"),
                                  nn.BatchNorm2d(4 * growth), nn.ReLU(), conv3x3(4 * growth, growth))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


def densenet121(num_classes: int = 1000, dropout: DropoutConfig = DropoutConfig()) -> nn.Module:
    layers, cin, growth = [_conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)], 64, 32
    for k, blocks in enumerate((6, 12, 24, 16)):
        for _ in range(blocks):
            layers.append(DenseLayer(cin, growth, dropout))
            cin += growth
        if k < 3:
            layers += [nn.BatchNorm2d(cin), nn.ReLU(), conv1x1(cin, cin // 2), nn.AvgPool2d(2, 2)]
            cin //= 2
    return nn.Sequential(*layers, nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(cin, num_classes))


IMAGENET_ARCHITECTURES = {"resnet50": resnet50, "mobilenet_v2": mobilenet_v2, "efficientnet_b0": efficientnet_b0,
                          "densenet121": densenet121}


def build_imagenet(arch: str, num_classes: int = 1000, dropout: DropoutConfig = DropoutConfig("a", 0.2)) -> nn.Module:
    """A torchvision-architecture network with Dropout-(a) ``dropout``, in eval mode, BN statistics at their
    initial values (mean 0, var 1) unless the caller gathers others."""
    if arch not in IMAGENET_ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(IMAGENET_ARCHITECTURES)}")
    return IMAGENET_ARCHITECTURES[arch](num_classes, dropout).eval()
