"""Pre-activation ResNets for CIFAR (He et al. 2016) and Wide ResNets (Zagoruyko & Komodakis 2016).

A Wide ResNet WRN-d-k is a pre-activation ResNet of basic blocks with widths 16k, 32k, 64k; its own dropout
sits between the two convolutions, i.e. placement ``b``.
"""
from __future__ import annotations

from torch import nn

from .common import CifarNet, DropoutConfig, conv1x1, conv3x3, init_weights


class PreActBlock(nn.Module):
    """The frame both blocks share: BN-ReLU first (its output also feeds a 1x1 projection shortcut when the
    shape changes), the residual branch through stochastic depth (placement ``depth``) before the Add."""

    def open_block(self, cin: int) -> None:
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)

    def close_block(self, cin: int, cout: int, stride: int, dropout: DropoutConfig) -> None:
        self.shortcut = conv1x1(cin, cout, stride) if stride != 1 or cin != cout else None
        self.drop_path = dropout.layer("depth")

    def enter(self, x):
        """(the pre-activated input, the shortcut)"""
        out = self.relu1(self.bn1(x))
        return out, x if self.shortcut is None else self.shortcut(out)

    def leave(self, branch, shortcut):
        return self.drop_path(branch) + shortcut


class BasicBlock(PreActBlock):
    """BN-ReLU-conv3x3-[a]-BN-ReLU-[b]-conv3x3, plus the identity (or a 1x1 projection of the
    pre-activation when the shape changes)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, dropout: DropoutConfig):
        super().__init__()
        self.open_block(cin)
        self.conv1 = conv3x3(cin, width, stride)
        self.drop_a = dropout.layer("a")
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.drop_b = dropout.layer("b")
        self.conv2 = conv3x3(width, width * self.expansion)
        self.close_block(cin, width * self.expansion, stride, dropout)

    def forward(self, x):
        out, shortcut = self.enter(x)
        out = self.relu2(self.bn2(self.drop_a(self.conv1(out))))
        return self.leave(self.conv2(self.drop_b(out)), shortcut)


class Bottleneck(PreActBlock):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3-[a]-BN-ReLU-[b]-conv1x1 (expansion 4), plus the shortcut."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, dropout: DropoutConfig):
        super().__init__()
        self.open_block(cin)
        self.conv1 = conv1x1(cin, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width, stride)
        self.drop_a = dropout.layer("a")
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.drop_b = dropout.layer("b")
        self.conv3 = conv1x1(width, width * self.expansion)
        self.close_block(cin, width * self.expansion, stride, dropout)

    def forward(self, x):
        out, shortcut = self.enter(x)
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        out = self.relu3(self.bn3(self.drop_a(out)))
        return self.leave(self.conv3(self.drop_b(out)), shortcut)


class PreActResNet(CifarNet):
    """CIFAR pre-activation ResNet: conv3x3(16) -> 3 stages (stride 1, 2, 2) -> BN-ReLU -> pool -> [final] -> fc;
    with placement ``depth`` each block's residual branch goes through stochastic depth before the Add.

    Args:
        depth: 6n+2 for basic blocks (20, 32, 56, 110), 9n+2 for bottlenecks (164); 6n+4 for Wide ResNets.
        num_classes: classifier outputs.
        dropout: where and how noise is injected.
        block: ``basic`` or ``bottleneck``.
        widen: width multiplier k of a Wide ResNet (1 for PreResNet).
        wide: True for the Wide ResNet depth rule (n = (depth - 4) / 6).
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, dropout: DropoutConfig = DropoutConfig(),
                 block: str = "basic", widen: int = 1, wide: bool = False):
        super().__init__()
        unit = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        per_block = 2 if block == "basic" else 3
        spare = 4 if wide else 2
        if (depth - spare) % (3 * per_block) or depth <= spare:
            raise ValueError(f"depth {depth} does not fit {block} blocks (need {3 * per_block}n+{spare})")
        n = (depth - spare) // (3 * per_block)
        self.conv = conv3x3(3, 16)
        layers, cin = [], 16
        for stage, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
            for i in range(n):
                layers.append(unit(cin, width, 2 if stage > 0 and i == 0 else 1, dropout))
                cin = width * unit.expansion
        self.blocks = nn.Sequential(*layers)
        self.add_classifier(cin, num_classes, dropout, pre_activation=True)
        init_weights(self)

    def forward(self, x):
        return self.classify(self.blocks(self.conv(x)))


def preresnet(depth: int = 20, num_classes: int = 10, dropout: DropoutConfig = DropoutConfig(),
              **_) -> PreActResNet:
    """PreResNet-depth: basic blocks up to depth 110 (6n+2), bottlenecks from 164 (9n+2)."""
    block = "bottleneck" if depth >= 164 else "basic"
    return PreActResNet(depth, num_classes, dropout, block=block)


def wide_resnet(depth: int = 16, num_classes: int = 10, dropout: DropoutConfig = DropoutConfig(),
                widen: int = 4, **_) -> PreActResNet:
    """WRN-depth-widen (depth = 6n+4)."""
    return PreActResNet(depth, num_classes, dropout, block="basic", widen=widen, wide=True)
