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
    """One pass with batch-normalising BNs, dropout off."""
    batch = BatchPass(request, dropout_active=False)
    samples, batches = run_pass(batch.session, request.source, request.batch_size, batch.fetch, batch.label,
                                request.progress, batch.consume)
    return batch.result(samples, batches)


class BatchPass:
    """The session of one batch pass (``threads``: onnxruntime's, default the request's) and what it
    accumulates; ``consume`` takes each batch's fetched outputs, ``result`` gives the statistics. Several
    passes can share one pass over the data (vsonnx.runtime.run_passes)."""

    def __init__(self, request: EstimateRequest, dropout_active: bool, threads: int | None = None):
        work, self.outputs, self.shifts = instrument_batch(request.model, request.targets, dropout_active,
                                                           request.report.channelwise_dropouts)
        self.session = make_session(work, device=request.device, threads=threads or request.threads)
        self.fetch = fetch_names(self.outputs)
        self.label = "calibrating (batch, dropout on)" if dropout_active else "calibrating (batch)"
        self.estimators: dict[str, BatchAverage] = {}
        self.values: dict[str, int] = {}  # values per channel seen, per BN
        self.notes: list[str] = []

    def consume(self, b: int, n_samples: int, got: dict) -> None:
        for name, trio in self.outputs.items():
            elements, sample_mean, sample_m2 = per_sample(got, trio, n_samples)
            if n_samples * elements < 2:
                self.notes.append(f"skipped batches of {n_samples} sample(s) for '{name}': fewer than 2 values "
                                  "per channel")
                continue
            batch = ChannelMoments(sample_mean.shape[1])
            batch.update_samples(elements, sample_mean, sample_m2)
            self.estimators.setdefault(name, BatchAverage(batch.mean.size)).update(
                batch.count, batch.mean + self.shifts[name], batch.var)
            self.values[name] = self.values.get(name, 0) + batch.count

    def result(self, samples: int, batches: int) -> CalibrationResult:
        stats = {name: BnStatistics(name, e.mean, e.var, e.count, self.values[name])
                 for name, e in self.estimators.items()}
        return CalibrationResult("batch", samples, batches, stats, 1, 0.0, self.session.get_providers()[0],
                                 sorted(set(self.notes)))
