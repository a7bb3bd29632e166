"""Dropout configuration shared by the reference networks (DESIGN 2: the paper's placements)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

PLACEMENTS = ("none", "a", "b", "final", "depth")
NOISES = ("dropout", "dropout2d", "uout")


@dataclass(frozen=True)
class DropoutConfig:
    """Where and how the network injects noise.

    Args:
        placement: ``none``; ``a`` right before the last BN of every block (the paper's Dropout-(a));
            ``b`` before the last conv of every block (Dropout-(b), Wide ResNet's own position);
            ``final`` one dropout after all BN layers, before the classifier; ``depth`` stochastic depth
            (Huang et al. 2016): each block's residual branch dropped per sample before the Add, so the
            next block's first BN sees the noise.
        ratio: drop probability (dropout) or beta (uout).
        noise: ``dropout`` (inverted Bernoulli), ``dropout2d`` (whole channels of a feature map; elementwise
            on a flat (N, C) input) or ``uout`` (X = x + x*r, r ~ U(-beta, beta)).
    """

    placement: str = "none"
    ratio: float = 0.5
    noise: str = "dropout"

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {self.noise!r}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.placement == "depth" and self.noise not in ("dropout", "dropout2d"):
            raise ValueError("stochastic depth (placement depth) drops branches: noise must be dropout")

    def layer(self, where: str, feature_map: bool = True) -> nn.Module:
        """The noise layer for position ``where`` (``a``, ``b``, ``final`` or ``depth``), Identity elsewhere;
        ``feature_map`` False for a flat (N, C) input, where channel dropout is elementwise dropout."""
        if self.placement != where or self.ratio == 0:
            return nn.Identity()
        if where == "depth":
            return StochasticDepth(self.ratio)
        if self.noise == "uout":
            return Uout(self.ratio)
        return nn.Dropout2d(self.ratio) if self.noise == "dropout2d" and feature_map else nn.Dropout(self.ratio)

    def to_dict(self) -> dict:
        return asdict(self)


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth(p, mode="row") / timm's DropPath: in training, each sample's input is
    zeroed with probability p and kept ones are scaled by 1/(1-p); the identity in eval mode."""

    def __init__(self, p: float, mode: str = "row"):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        shape = (x.shape[0],) + (1,) * (x.dim() - 1) if self.mode == "row" else (1,) * x.dim()
        keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Uout(nn.Module):
    """The paper's variance-stable noise: X = x + x*r, r ~ U(-beta, beta) in training; identity in eval."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.beta == 0:
            return x
        r = torch.empty_like(x).uniform_(-self.beta, self.beta)
        return x + x * r


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def init_weights(model: nn.Module) -> None:
    """He-normal convolutions, BN gamma 1 / beta 0, zero classifier bias (common CIFAR setup)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class CifarNet(nn.Module):
    """Base of the reference networks: the CIFAR classifier they share, registered as attributes of the
    network in this order (module names are what exports and the reference models call them):
    [bn -> relu, with ``pre_activation``] -> pool -> flatten -> [final] -> fc."""

    def add_classifier(self, channels: int, num_classes: int, dropout: DropoutConfig, pre_activation: bool) -> None:
        self.pre_activation = pre_activation
        if pre_activation:
            self.bn = nn.BatchNorm2d(channels)
            self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.drop_final = dropout.layer("final", feature_map=False)
        self.fc = nn.Linear(channels, num_classes)

    def classify(self, features):
        out = self.relu(self.bn(features)) if self.pre_activation else features
        return self.fc(self.drop_final(self.flatten(self.pool(out))))
