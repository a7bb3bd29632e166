"""``batch``: the paper's "Adjust", PyTorch-equivalent (DESIGN 5.2).

Dropout off; every recalibrated BN normalises with its *batch* mean and biased variance during the pass
(onnxruntime's BN in training mode outputs them, or operators in the graph compute them:
vsonnx.taps.instrument_batch);
new mean = average of batch means, new var = average of unbiased batch variances, equal weight per batch.
Equals PyTorch (BN modules in train mode, Dropout in eval, momentum=None) on the same batches.
A batch with fewer than 2 values per channel for a BN (the unbiased variance of one value is undefined:
a BatchNorm1d with batch size 1, or a final batch of one sample) is skipped for that BN with a note; a
2-D BN sees H x W values per sample, so batch size 1 works there (models with a batch of 1 baked in).
"""
from __future__ import annotations

from ..taps import instrument_batch
from ..runtime import cpu_provider, make_session, run_pass, split_threads
from ..stats import BatchAverage, BnStatistics, Estimate
from . import EstimateRequest


def estimate(request: EstimateRequest) -> Estimate:
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
        threads = threads or request.threads
        work, self.outputs = instrument_batch(request.model, request.targets, dropout_active,
                                              request.report.channelwise_dropouts, cpu_provider(request.device),
                                              split_threads(threads, 1)[0])
        self.session = make_session(work, device=request.device, threads=threads)
        self.fetch = [name for out in self.outputs.values() for name in out.fetch()]
        self.label = "calibrating (batch, dropout on)" if dropout_active else "calibrating (batch)"
        self.estimators: dict[str, BatchAverage] = {}
        self.values: dict[str, int] = {}  # values per channel seen, per BN
        self.notes: list[str] = []

    def consume(self, b: int, n_samples: int, got: dict) -> None:
        for name, out in self.outputs.items():
            count, mean, var = out.batch(got, n_samples)
            if count < 2:
                self.notes.append(f"skipped batches of {n_samples} sample(s) for '{name}': fewer than 2 values "
                                  "per channel")
                continue
            self.estimators.setdefault(name, BatchAverage(mean.size)).update(count, mean, var)
            self.values[name] = self.values.get(name, 0) + count

    def result(self, samples: int, batches: int) -> Estimate:
        stats = {name: BnStatistics(name, e.mean, e.var, e.count, self.values[name])
                 for name, e in self.estimators.items()}
        return Estimate("batch", samples, batches, stats, 1, 0.0, self.session.get_providers()[0],
                                 sorted(set(self.notes)))
