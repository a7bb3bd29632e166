"""A plain VGG-style CIFAR CNN (no shortcuts), optionally with an MLP head whose hidden layer is
Linear -> [a] -> BatchNorm1d -> ReLU: the dropout sites of networks without residual Adds or concats.

    stage s (widths w, 2w, 4w): n x ([b] -> conv3x3 -> [a] -> BN -> ReLU), then 2 x 2 max pooling
    head ``linear``: global average pool -> [final] -> fc
    head ``mlp``:    global average pool -> Linear(4w, 4w) -> [a] -> BN1d -> ReLU -> [final] -> fc
"""
from __future__ import annotations

from torch import nn

from .common import DropoutConfig, conv3x3, init_weights


class ConvUnit(nn.Module):
    """[b]-conv3x3-[a]-BN-ReLU."""

    def __init__(self, cin: int, cout: int, dropout: DropoutConfig):
        super().__init__()
        self.drop_b = dropout.layer("b")
        self.conv = conv3x3(cin, cout)
        self.drop_a = dropout.layer("a")
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.drop_a(self.conv(self.drop_b(x)))))


class PlainCNN(nn.Module):
    """VGG-style CNN of ``depth`` = 3n conv layers in three stages (width, 2 width, 4 width).

    Args:
        depth: number of conv layers, a multiple of 3.
        width: channels of the first stage.
        head: ``linear`` (pool -> fc) or ``mlp`` (pool -> Linear -> [a] -> BatchNorm1d -> ReLU -> fc).
    """

    def __init__(self, depth: int = 6, num_classes: int = 10, dropout: DropoutConfig = DropoutConfig(),
                 width: int = 32, head: str = "linear"):
        super().__init__()
        if depth % 3 or depth <= 0:
            raise ValueError(f"depth {depth} does not fit three stages of conv layers (need 3n)")
        if head not in ("linear", "mlp"):
            raise ValueError(f"head must be linear or mlp, got {head!r}")
        layers, cin = [], 3
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for _ in range(depth // 3):
                layers.append(ConvUnit(cin, cout, dropout))
                cin = cout
            if stage < 2:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Sequential(nn.Linear(cin, cin), dropout.layer("a", feature_map=False), nn.BatchNorm1d(cin),
                                  nn.ReLU(inplace=True)) if head == "mlp" else nn.Identity()
        self.drop_final = dropout.layer("final", feature_map=False)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x):
        out = self.flatten(self.pool(self.features(x)))
        return self.fc(self.drop_final(self.head(out)))


def plain_cnn(depth: int = 6, num_classes: int = 10, dropout: DropoutConfig = DropoutConfig(),
              width: int | None = None, head: str = "linear", **_) -> PlainCNN:
    """VGG-style CNN of ``depth`` conv layers (3n), first-stage ``width`` (32), ``head`` linear or mlp."""
    return PlainCNN(depth, num_classes, dropout, width=width or 32, head=head)
