"""Several passes over one source: a replay decoded once, and a seeded split into a calibration part and
a held-out part."""
from __future__ import annotations

import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import VsonnxError


from .sources import Batch, Source, _take


class ReplaySource(Source):
    """Decodes once: the preprocessed batches of the first pass are kept for later passes of the same batch
    size, the first ``memory`` bytes in memory and the rest in a scratch folder ($TMPDIR/vsonnx-replay-PID-*,
    one ``.npy`` per input and batch, read back a batch at a time), so memory holds about one batch whatever
    the size of the data set. These are model inputs, not activations. A pass that stops early keeps
    nothing; another batch size reads the wrapped source again."""

    replays = True

    def __init__(self, source: Source, memory: int = 64 << 20):
        self.source, self.memory = source, memory
        self.has_labels, self.spec, self.size = source.has_labels, source.spec, source.size
        self._kept: tuple[int, list] | None = None
        self._folder: Path | None = None
        self._names: list[str] = []

    def batches(self, batch_size: int) -> Iterator[Batch]:
        if self._kept is not None and self._kept[0] == batch_size:
            yield from (self._load(k) if isinstance(k, int) else k for k in self._kept[1])
            return
        kept: list = []
        used = 0
        for batch in self.source.batches(batch_size):
            nbytes = sum(a.nbytes for a in batch.feeds.values())
            if used + nbytes <= self.memory:
                kept.append(batch)
                used += nbytes
            else:
                kept.append(self._spill(batch, len(kept)))
            yield batch
        self._kept = (batch_size, kept)

    def _spill(self, batch: Batch, k: int) -> int:
        if self._folder is None:
            from ..model import new_scratch

            self._folder = new_scratch("replay")
            weakref.finalize(self, shutil.rmtree, self._folder, True)
        self._names = list(batch.feeds)
        for i, array in enumerate(batch.feeds.values()):
            np.save(self._folder / f"{k}.{i}.npy", array)
        if batch.labels is not None:
            np.save(self._folder / f"{k}.labels.npy", batch.labels)
        return k

    def _load(self, k: int) -> Batch:
        names = self._names
        feeds = {name: np.load(self._folder / f"{k}.{i}.npy") for i, name in enumerate(names)}
        labels = np.load(self._folder / f"{k}.labels.npy") if (self._folder / f"{k}.labels.npy").exists() else None
        return Batch(feeds, labels)

    def describe(self) -> str:
        return self.source.describe()


class SplitSource(Source):
    """One part of a seeded split of ``source`` (``--val-split F``): the i-th sample the source yields is held
    out when u_i < F, u_i drawn from ``default_rng(seed)``; both parts read the same (replayed) source in
    chunks of ``SPLIT_CHUNK`` and re-batch, so they are disjoint and together hold every sample."""

    replays = True

    def __init__(self, source: Source, fraction: float, seed: int, held_out: bool):
        self.source, self.fraction, self.seed, self.held_out = replayable(source), fraction, seed, held_out
        self.has_labels = source.has_labels
        self.spec = f"{source.describe()} ({'held-out' if held_out else 'kept'} part of a {fraction:g} split)"

    def batches(self, batch_size: int) -> Iterator[Batch]:
        rng = np.random.default_rng(self.seed)
        feeds: dict[str, list] = {}
        labels: list = []
        held = 0
        for batch in self.source.batches(SPLIT_CHUNK):
            rows = (rng.random(len(batch)) < self.fraction) == self.held_out
            for name, x in batch.feeds.items():
                feeds.setdefault(name, []).append(x[rows])
            if batch.labels is not None:
                labels.append(batch.labels[rows])
            held += int(rows.sum())
            while held >= batch_size:
                yield _take(feeds, labels, batch_size)
                held -= batch_size
        if held:
            yield _take(feeds, labels, held)

    def describe(self) -> str:
        return self.spec


SPLIT_CHUNK = 256


def split_source(source: Source, fraction: float, seed: int) -> tuple[Source, Source]:
    """(kept, held out) parts of ``source`` (see SplitSource); a fraction outside (0, 1) is a user error."""
    if not 0 < fraction < 1:
        raise VsonnxError(f"--val-split must be between 0 and 1 (exclusive), got {fraction:g}.",
                          "e.g. --val-split 0.2 holds out a fifth of the calibration data.")
    source = replayable(source)
    return SplitSource(source, fraction, seed, False), SplitSource(source, fraction, seed, True)


def replayable(source: Source) -> Source:
    """``source`` wrapped for several passes (decoded once), unless its passes already replay (arrays, a
    replay, or a part of a split, which reads one)."""
    return source if source.replays else ReplaySource(source)
