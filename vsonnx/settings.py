"""Run settings every command shares, checked in one place."""
from __future__ import annotations


import numpy as np

from .errors import VsonnxError




def check_settings(*, batch_size: int | None = None, seed: int | None = None, threads: int | None = None) -> None:
    """The run settings every command shares: batch size >= 1, seed >= 0, threads >= 0 (0: onnxruntime's
    default); a user error otherwise."""
    for name, value, low, hint in (("--batch-size", batch_size, 1, "pass --batch-size 128 (or another count >= 1)."),
                                   ("--seed", seed, 0, "pass --seed 0 (or another integer >= 0)."),
                                   ("--threads", threads, 0, "pass --threads N with N >= 1, or leave it out.")):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < low):
            raise VsonnxError(f"{name} must be an integer >= {low}, got {value}.", hint)
