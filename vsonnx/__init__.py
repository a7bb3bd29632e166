"""vsonnx: find and repair the Dropout->BatchNorm variance shift in ONNX models, train-free.

Public API (heavy dependencies are imported when a function is first called, not at import time):
scan, fix, evaluate, compare, export.
"""
from __future__ import annotations

__all__ = ["scan", "fix", "evaluate", "compare", "export", "VsonnxError", "__version__"]

from ._version import __version__
from .errors import VsonnxError


def scan(model, **kwargs):
    """Find Dropout->BN sites and what fix would do with each BN; see vsonnx.measure.scan."""
    from .measure import scan as _scan

    return _scan(model, **kwargs)


def export(module, example_input, path, **kwargs):
    """Export a PyTorch module keeping Dropout and unfolded BN; see vsonnx.torch_export.export."""
    from .torch_export import export as _export

    return _export(module, example_input, path, **kwargs)


def fix(model, calib=None, **kwargs):
    """Re-estimate BN statistics on calibration data (a calibrated method of vsonnx.methods), or without
    data (data_free=True), or at named dropout sites (dropout_sites=...); ``model``: a path or a ModelProto
    (then ``output=`` is needed); see vsonnx.recalibrate.fix."""
    from .recalibrate import fix as _fix

    return _fix(model, calib, **kwargs)


def evaluate(model, data, **kwargs):
    """ORT top-1/top-5 accuracy on labelled data; see vsonnx.accuracy.evaluate."""
    from .accuracy import evaluate as _evaluate

    return _evaluate(model, data, **kwargs)


def compare(model_a, model_b, data, **kwargs):
    """Evaluate two models on the same data; see vsonnx.accuracy.compare."""
    from .accuracy import compare as _compare

    return _compare(model_a, model_b, data, **kwargs)
