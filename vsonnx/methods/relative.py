"""``relative``: the change dropout makes, measured on the data, carried over to the stored statistics.

Two ``batch`` passes over the same batches in one pass over the data, side by side (each session with half
the threads; one after the other with a single thread), with Dropout active as in training (explicit seeded
mask operations that onnxruntime runs optimised; vsonnx.simulate.simulate_dropouts) and off; per BN the
stored (mean, var) move as the measured ones moved (vsonnx.stats.transfer_change):
    var' = var * v_off / v_on,    mean' = mean + (m_off - m_on) * sqrt(var / v_on).
What the stored statistics describe beyond the dropout noise (e.g. augmented training images) is kept.
Refuses constant dropout ratios outside [0, 1); batches as in ``batch``.
"""
from __future__ import annotations

from ..graph import GraphIndex
from ..runtime import run_passes, split_threads
from ..stats import BnStatistics, Estimate, transfer_change
from . import EstimateRequest
from .batch import BatchPass


def estimate(request: EstimateRequest) -> Estimate:
    threads, side_by_side = split_threads(request.threads, 2)
    passes = [BatchPass(request, dropout_active=True, threads=threads),
              BatchPass(request, dropout_active=False, threads=threads)]
    samples, batches = run_passes([(p.session, p.fetch, p.consume) for p in passes], request.source,
                                  request.batch_size, "calibrating (relative: dropout on and off)", request.progress,
                                  concurrent=side_by_side)
    on, off = (p.result(samples, batches) for p in passes)
    stats = {}
    for name, stored in GraphIndex(request.model).stored_statistics(list(off.statistics)).items():
        before, after = on.statistics[name], off.statistics[name]
        stats[name] = BnStatistics(name, *transfer_change(stored.mean, stored.var, (before.mean, before.var),
                                                          (after.mean, after.var)), after.count, after.values)
    return Estimate("relative", off.samples, off.batches, stats, 1, 0.0, off.provider,
                             sorted(set(on.notes + off.notes)))
