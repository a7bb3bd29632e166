"""Streaming per-channel statistics in float64 (after fvcore's precise_bn, with exact merging).

- ``ChannelMoments``: population moments (count, mean, M2) of every element of a channel; batches and
  shards combine exactly with Chan's parallel update, so the result does not depend on batch size, order
  or how the data was split across processes.
- ``BatchAverage``: PyTorch's ``momentum=None`` running statistics: the plain average over batches of the
  batch means and of the *unbiased* batch variances (equal weight per batch, whatever its size).
- ``interpolate``: the family between stored and re-estimated statistics that ``--val`` chooses from.
- ``transfer_change``: carry a change of statistics measured between two regimes on the same inputs over
  to stored statistics, relative to the spread.
- ``BnStatistics`` / ``Estimate``: what an estimator of vsonnx.methods returns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class BnStatistics:
    """New statistics of one BN plus how many elements (population) or batches (batch) they average, and how
    many values per channel the estimate saw (``values``; None when no data was seen: stored, data-free)."""

    name: str
    mean: np.ndarray
    var: np.ndarray
    count: int
    values: int | None = None


@dataclass
class Fitting:
    """How an optimising estimator ended (synthesized, distill): steps run, the mean loss of the first and of
    the last (up to 10) steps, the synthetic inputs it made (synthesized), its settings (distill)."""

    steps: int
    loss_first: float
    loss_last: float
    synthetic_samples: int = 0
    settings: dict = field(default_factory=dict)


@dataclass
class Estimate:
    """An estimator's answer: new statistics per BN, how they were obtained, and what else is written or
    reported with them."""

    method: str
    samples: int
    batches: int
    statistics: dict[str, BnStatistics]
    passes: int
    seconds: float
    provider: str
    notes: list[str] = field(default_factory=list)
    affine: dict[str, tuple] = field(default_factory=dict)  # folded Conv/Gemm -> (a, b) (named sites, distill)
    analysis: Any = None  # named sites: the vsonnx.sites.ScanReport of the analysis copy (Dropout inserted)
    refused: dict[str, str] = field(default_factory=dict)  # named sites: BN -> numbered refusal, not estimated
    site_notes: dict[str, str] = field(default_factory=dict)  # closed form: site -> what the formulas did
    fitting: Fitting | None = None


class ChannelMoments:
    """count, mean[C], M2[C] = sum of squared deviations; var = M2/count (population), M2/(count-1) unbiased."""

    def __init__(self, channels: int):
        self.count = 0
        self.mean = np.zeros(channels, np.float64)
        self.m2 = np.zeros(channels, np.float64)

    def update(self, count: int, mean, var) -> None:
        """Add a batch given its element count per channel, its mean and its biased (population) variance."""
        self._combine(int(count), np.asarray(mean, np.float64), np.asarray(var, np.float64) * count)

    def update_samples(self, elements: int, sample_mean, sample_m2) -> None:
        """Add a batch given per-sample moments [N, C]: each sample contributes ``elements`` values per
        channel with mean ``sample_mean`` and sum of squared deviations ``sample_m2``. Combining per-sample
        moments in float64 makes the result independent of how samples were batched."""
        sample_mean = np.asarray(sample_mean, np.float64)
        n = sample_mean.shape[0]
        if n == 0:
            return
        mean = sample_mean.mean(axis=0)
        m2 = np.asarray(sample_m2, np.float64).sum(axis=0) + elements * ((sample_mean - mean) ** 2).sum(axis=0)
        self._combine(n * elements, mean, m2)

    def update_array(self, x: np.ndarray, axis: int = 1) -> None:
        """Add a raw batch (reference path for tests; the calibrator streams moments from the graph)."""
        x = np.moveaxis(np.asarray(x, np.float64), axis, 0).reshape(x.shape[axis], -1)
        self.update(x.shape[1], x.mean(axis=1), x.var(axis=1))

    def merge(self, other: "ChannelMoments") -> "ChannelMoments":
        self._combine(other.count, other.mean, other.m2)
        return self

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if n_b == 0:
            return
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta * delta * (n_a * n_b / n)
        self.count = n

    @property
    def var(self) -> np.ndarray:
        """Population variance M2/count (what an inference-mode BN should divide by)."""
        return self.m2 / max(self.count, 1)

    @property
    def var_unbiased(self) -> np.ndarray:
        return self.m2 / max(self.count - 1, 1)


class BatchAverage:
    """Equal-weight average of per-batch means and unbiased per-batch variances (PyTorch momentum=None)."""

    def __init__(self, channels: int):
        self.batches = 0
        self.sum_mean = np.zeros(channels, np.float64)
        self.sum_var = np.zeros(channels, np.float64)

    def update(self, count: int, mean, var) -> None:
        """Add a batch: ``count`` elements per channel, its mean and its biased variance."""
        if count < 2:
            raise ValueError("a batch needs at least 2 elements per channel for an unbiased variance")
        self.batches += 1
        self.sum_mean += np.asarray(mean, np.float64)
        self.sum_var += np.asarray(var, np.float64) * (count / (count - 1))

    def merge(self, other: "BatchAverage") -> "BatchAverage":
        self.batches += other.batches
        self.sum_mean += other.sum_mean
        self.sum_var += other.sum_var
        return self

    @property
    def count(self) -> int:
        return self.batches

    @property
    def mean(self) -> np.ndarray:
        return self.sum_mean / max(self.batches, 1)

    @property
    def var(self) -> np.ndarray:
        return self.sum_var / max(self.batches, 1)


def transfer_change(mean, var, on: tuple, off: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Stored (mean, var) moved as the (mean, var) measured with dropout ``on`` moved to those measured
    ``off``: var' = var * v_off / v_on, mean' = mean + (m_off - m_on) * sqrt(var / v_on)."""
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    (m_on, v_on), (m_off, v_off) = on, off
    v_on = np.maximum(np.asarray(v_on, np.float64), 1e-12)
    return mean + (np.asarray(m_off) - m_on) * np.sqrt(var / v_on), var * np.asarray(v_off) / v_on


def interpolate(old: dict[str, BnStatistics], new: dict[str, BnStatistics], a: float) -> dict[str, BnStatistics]:
    """Statistics a fraction ``a`` of the way from the stored (m_s, v_s) to re-estimated (m_r, v_r) ones:
    m = m_s + a (m_r - m_s),  v = v_s (v_r / v_s)^a  (geometric in the variance, so a scale correction is
    taken a fraction a of the way in log scale; a = 1 gives the new statistics, a = 0 the stored ones).
    A channel whose stored or new variance is not positive moves linearly."""
    out = {}
    for n, s in new.items():
        m_s, v_s = np.asarray(old[n].mean, np.float64), np.asarray(old[n].var, np.float64)
        m_r, v_r = np.asarray(s.mean, np.float64), np.asarray(s.var, np.float64)
        positive = (v_s > 0) & (v_r > 0)
        ratio = np.where(positive, v_r, 1.0) / np.where(positive, v_s, 1.0)
        var = np.where(positive, v_s * ratio ** a, v_s + a * (v_r - v_s))
        out[n] = BnStatistics(n, m_s + a * (m_r - m_s), var, s.count, s.values)
    return out
