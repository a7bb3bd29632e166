"""Calibration and evaluation data: one interface over image folders, arrays and Python readers.

A source is opened with ``open_source(spec, inputs, ...)`` and yields ``Batch(feeds, labels)`` of at most
``batch_size`` samples, streaming: images are decoded in a thread pool one batch ahead, ``.npy`` files are
memory-mapped, nothing holds the whole data set in memory.

Kinds of ``spec``:
- a folder of class folders ``DIR/<class>/<image>`` (labels = sorted class index, as ImageFolder), or a flat
  folder of images (no labels);
- a ``.npy`` file (preprocessed inputs, first axis = samples), a ``.npz`` with ``x`` (or the model's input
  names) and optional ``y``, or a folder of such files (sorted by name);
- ``FILE.py:FUNC`` or ``module:FUNC``: a function returning an iterable of feed dicts
  ``{input_name: ndarray}`` (labels, if any, under ``label``/``labels``/``y``) or an object with ``get_next()``
  (onnxruntime's CalibrationDataReader).
Shuffling (seeded) happens before ``limit``; Python readers are used in their own order.

Modules: inputs (the input contract), preprocess (images), sources (folders, arrays, readers, open_source),
replay (several passes, splits); run settings are checked in vsonnx.settings.
"""

from ..settings import check_settings
from .inputs import ARRAY_SUFFIXES, LABEL_KEYS, InputSpec, resolve_batch_size, static_batch
from .preprocess import Preprocess, data_contract
from .replay import ReplaySource, SplitSource, replayable, split_source
from .sources import (DECODE_BUDGET, ArraySource, Batch, ImageFolderSource, MemoryBudget, ReaderSource, Source,
                      available_memory, check_finite, open_source, source_identity)

__all__ = ["ARRAY_SUFFIXES", "DECODE_BUDGET", "LABEL_KEYS", "ArraySource", "Batch", "ImageFolderSource", "InputSpec",
           "MemoryBudget", "Preprocess", "ReaderSource", "ReplaySource", "Source", "SplitSource", "available_memory",
           "check_finite", "check_settings", "data_contract", "open_source", "replayable", "resolve_batch_size",
           "source_identity", "split_source", "static_batch"]
