"""``relative``: the change dropout makes, measured on the data, carried over to the stored statistics.

Two ``batch`` passes over the same samples (decoded once), with Dropout active as in training (explicit
seeded mask operations that onnxruntime runs optimised; vsonnx.instrument.simulate_dropouts) and off; per
BN the stored (mean, var) move
as the measured ones moved (vsonnx.stats.transfer_change):
    var' = var * v_off / v_on,    mean' = mean + (m_off - m_on) * sqrt(var / v_on).
What the stored statistics describe beyond the dropout noise (e.g. augmented training images) is kept.
Refuses constant dropout ratios outside [0, 1); batches as in ``batch``.
"""
from __future__ import annotations

from dataclasses import replace

from ..data import replayable
from ..graph import GraphIndex
from ..stats import BnStatistics, CalibrationResult, transfer_change
from . import EstimateRequest
from .batch import batch_pass


def estimate(request: EstimateRequest) -> CalibrationResult:
    request = replace(request, source=replayable(request.source))
    on = batch_pass(request, dropout_active=True)
    off = batch_pass(request, dropout_active=False)
    stats = {}
    for name, stored in GraphIndex(request.model).stored_statistics(list(off.statistics)).items():
        before, after = on.statistics[name], off.statistics[name]
        stats[name] = BnStatistics(name, *transfer_change(stored.mean, stored.var, (before.mean, before.var),
                                                          (after.mean, after.var)), after.count, after.values)
    return CalibrationResult("relative", off.samples, off.batches, stats, 2, 0.0, off.provider,
                             sorted(set(on.notes + off.notes)))
