"""A disk spill: arrays written once, read back later, their storage recycled once released.

The staged population pass (vsonnx.methods.population) writes each stage's tensors batch by batch and later
stages read them back. Writing into fresh file space is slow (block allocation: about 15 ms per 8 MB on an
overlay filesystem, measured), rewriting space a file already has is fast (under 1 ms per 8 MB), so a
released file is not deleted but kept for a later write of at most its size (``os.pwrite`` at offset 0, no
truncation). Reads copy the array out (``np.fromfile``), so a recycled file never changes an array already
read. ``put`` may run on one thread while ``get`` runs on another; ``release`` runs between passes.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]


class Spill:
    """Arrays by key in files under ``folder`` (the caller removes the folder)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._entries: dict[object, _Entry] = {}
        self._free: list[tuple[int, Path]] = []  # (capacity in bytes, file) of released files
        self._files = 0
        self._lock = threading.Lock()

    def put(self, key, array: np.ndarray) -> None:
        """Store ``array`` under ``key`` (a new key); raises OSError when the disk refuses it."""
        array = np.ascontiguousarray(array)
        with self._lock:
            fitting = [f for f in self._free if f[0] >= array.nbytes]
            if fitting:
                free = min(fitting)
                self._free.remove(free)
                path = free[1]
            else:
                path = self.folder / f"spill{self._files}.bin"
                self._files += 1
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            view, done = memoryview(array).cast("B"), 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], done)
        finally:
            os.close(fd)
        with self._lock:
            self._entries[key] = _Entry(path, array.dtype, array.shape)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key) -> np.ndarray:
        with self._lock:
            entry = self._entries[key]
        return np.fromfile(entry.path, entry.dtype, int(np.prod(entry.shape))).reshape(entry.shape)

    def keys(self) -> list:
        with self._lock:
            return list(self._entries)

    def release(self, keys) -> None:
        """Forget ``keys``; their files wait for later writes."""
        with self._lock:
            for key in keys:
                entry = self._entries.pop(key)
                self._free.append((entry.path.stat().st_size, entry.path))
