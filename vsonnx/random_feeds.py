"""Uniform draws for simulated dropout, made by numpy and fed to onnxruntime.

onnxruntime's RandomUniformLike runs on one thread at about 3.8 ns per value: 42 of the 102 ms of a
dropout-on PreResNet-20 batch of 128 at 2 threads (onnxruntime's profiler). numpy's PCG64 makes 16-bit
draws at about 0.6 ns per value. So a simulated Dropout (vsonnx.simulate.simulate_dropouts) whose input
shape is known up to the batch reads its draws from a graph input named ``RANDOM_PREFIX<k>`` (uint16, shape
[batch, ...]) instead of drawing them itself, and drops where u < 65536 * ratio: P(drop) = ceil(65536 r) /
65536, exact for ratios such as 0.5 and 0.25 and within 1.5e-5 of r otherwise (0.3 -> 0.300003; ratios above
65535/65536 drop with probability 65535/65536).

``make_session`` wraps a session whose graph has such inputs in ``RandomFeeding``: each run draws fresh
values for all of them from one generator seeded once (deterministic for a seed and a sequence of batch
sizes), resolving their symbolic dimensions from the shapes of the real inputs fed; ``get_inputs`` lists
only the real inputs, so callers feed a RandomFeeding like any session.
"""
from __future__ import annotations

import numpy as np

DROPOUT_SEED = 0  # the default seed of every simulated dropout
RANDOM_PREFIX = "vsonnx_random"
LEVELS = 65536  # values of a uint16 draw


def uniform16(bits: np.random.PCG64, count: int) -> np.ndarray:
    """``count`` uniform 16-bit draws: each 64-bit output of ``bits`` gives four (2x faster than
    Generator.integers)."""
    return bits.random_raw(-(-count // 4)).view(np.uint16)[:count]


def drop_threshold(ratio: float) -> int:
    """Draws below this are dropped: ceil(65536 r), at most 65535."""
    return min(int(np.ceil(LEVELS * ratio)), LEVELS - 1)


def scaled_keep_mask(bits: np.random.PCG64, shape: tuple, ratio: float) -> np.ndarray:
    """Inverted-dropout multipliers of ``shape``: 1 / (1 - r) where a uint16 draw is kept, 0 where dropped
    (float32, one pass from the draws)."""
    draws = uniform16(bits, int(np.prod(shape))).reshape(shape)
    return np.multiply(draws >= drop_threshold(ratio), np.float32(1 / (1 - ratio)), dtype=np.float32)


class RandomFeeding:
    """An onnxruntime session whose ``RANDOM_PREFIX`` inputs are drawn afresh on every run (module docstring)."""

    def __init__(self, session, seed: int):
        self.session = session
        self._bits = np.random.PCG64(seed)
        inputs = session.get_inputs()
        self._inputs = [i for i in inputs if not i.name.startswith(RANDOM_PREFIX)]
        self.random_inputs = [(i.name, list(i.shape)) for i in inputs if i.name.startswith(RANDOM_PREFIX)]

    def get_inputs(self):
        return self._inputs

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, fetch, feeds: dict, run_options=None):
        known = self._symbols(feeds)
        shapes = [self._shape(dims, known) for _, dims in self.random_inputs]
        sizes = [int(np.prod(s)) for s in shapes]
        draws = uniform16(self._bits, sum(sizes))  # one call for all sites
        offsets = np.cumsum([0] + sizes)
        random = {name: draws[offsets[k]:offsets[k + 1]].reshape(shape)
                  for k, ((name, _), shape) in enumerate(zip(self.random_inputs, shapes))}
        return self.session.run(fetch, {**feeds, **random}, run_options)

    def _symbols(self, feeds: dict) -> dict[str, int]:
        """{symbolic dimension of a real input: its size in ``feeds``}."""
        known: dict[str, int] = {}
        for meta in self._inputs:
            if meta.name in feeds:
                for symbol, size in zip(meta.shape, np.shape(feeds[meta.name])):
                    if isinstance(symbol, str):
                        known.setdefault(symbol, int(size))
        return known

    @staticmethod
    def _shape(dims: list, known: dict[str, int]) -> tuple[int, ...]:
        """``dims`` with each symbolic dimension resolved."""
        missing = [d for d in dims if not isinstance(d, int) and d not in known]
        if missing:
            raise ValueError(f"random input dimensions {missing} are not dimensions of any input fed")
        return tuple(d if isinstance(d, int) else known[d] for d in dims)
