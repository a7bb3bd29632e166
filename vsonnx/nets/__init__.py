"""PyTorch reference architectures with the paper's dropout placements (needs torch).

``build(arch, depth, num_classes, dropout, **arch_options)`` makes any of them by name.
"""
from __future__ import annotations

from .common import NOISES, PLACEMENTS, DropoutConfig, StochasticDepth, Uout
from .densenet import DenseNetBC, densenet
from .plain import PlainCNN, plain_cnn
from .preresnet import PreActResNet, preresnet, wide_resnet
from .resnext import ResNeXt, resnext

ARCHITECTURES = {"preresnet": preresnet, "wrn": wide_resnet, "resnext": resnext, "densenet": densenet,
                 "plain": plain_cnn}

__all__ = ["ARCHITECTURES", "NOISES", "PLACEMENTS", "DenseNetBC", "DropoutConfig", "PlainCNN", "PreActResNet", "ResNeXt",
           "StochasticDepth", "Uout", "build"]


def build(arch: str, depth: int, num_classes: int = 10, dropout: DropoutConfig = DropoutConfig(), **options):
    """Build a reference network; ``options`` are architecture specific (widen, cardinality, base_width,
    growth, width, head)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    if dropout.placement == "depth" and arch not in ("preresnet", "wrn"):
        raise ValueError("stochastic depth (placement depth) is built into preresnet and wrn only")
    return ARCHITECTURES[arch](depth=depth, num_classes=num_classes, dropout=dropout, **options)
