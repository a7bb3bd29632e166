"""``batch``: the paper's "Adjust", PyTorch-equivalent (DESIGN 5.2).

Dropout off; every recalibrated BN normalises with its *batch* mean s + mean_n(g1) and biased variance
mean_n(g2) - mean_n(g1)^2 during the pass (the BN node is fed these computed statistics; vsonnx.instrument);
new mean = average of batch means, new var = average of unbiased batch variances, equal weight per batch.
Equals PyTorch (BN modules in train mode, Dropout in eval, momentum=None) on the same batches.
A batch with fewer than 2 values per channel for a BN (the unbiased variance of one value is undefined:
a BatchNorm1d with batch size 1, or a final batch of one sample) is skipped for that BN with a note; a
2-D BN sees H x W values per sample, so batch size 1 works there (models with a batch of 1 baked in).
"""
from __future__ import annotations

from ..instrument import fetch_names, instrument_batch, per_sample
from ..runtime import make_session, run_pass
from ..stats import BatchAverage, BnStatistics, CalibrationResult, ChannelMoments
from . import EstimateRequest


def estimate(request: EstimateRequest) -> CalibrationResult:
    return batch_pass(request, dropout_active=False)


def batch_pass(request: EstimateRequest, dropout_active: bool) -> CalibrationResult:
    """One pass with batch-normalising BNs; Dropout simulated in training mode with ``dropout_active``."""
    work, outputs, shifts = instrument_batch(request.model, request.targets, dropout_active,
                                             request.report.channelwise_dropouts)
    session = make_session(work, device=request.device, threads=request.threads)
    estimators: dict[str, BatchAverage] = {}
    values: dict[str, int] = {}  # values per channel seen, per BN
    notes: list[str] = []

    def consume(b, n_samples, got):
        for name, trio in outputs.items():
            elements, sample_mean, sample_m2 = per_sample(got, trio, n_samples)
            if n_samples * elements < 2:
                notes.append(f"skipped batches of {n_samples} sample(s) for '{name}': fewer than 2 values per "
                             "channel")
                continue
            batch = ChannelMoments(sample_mean.shape[1])
            batch.update_samples(elements, sample_mean, sample_m2)
            estimators.setdefault(name, BatchAverage(batch.mean.size)).update(
                batch.count, batch.mean + shifts[name], batch.var)
            values[name] = values.get(name, 0) + batch.count

    label = "calibrating (batch, dropout on)" if dropout_active else "calibrating (batch)"
    samples, batches = run_pass(session, request.source, request.batch_size, fetch_names(outputs), label,
                                request.progress, consume)
    stats = {name: BnStatistics(name, e.mean, e.var, e.count, values[name]) for name, e in estimators.items()}
    return CalibrationResult("batch", samples, batches, stats, 1, 0.0, session.get_providers()[0], sorted(set(notes)))
