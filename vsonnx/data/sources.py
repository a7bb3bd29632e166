"""Sources of batches: image folders (decoded in a thread pool under a memory budget), arrays
(.npy/.npz, memory-mapped) and Python readers; ``open_source`` picks one for a spec."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import VsonnxError, warn
from .cifar import IMAGE_SUFFIXES, decode_rgb, image_folder_files, luma
from .inputs import (ARRAY_SUFFIXES, LABEL_KEYS, InputSpec, _check_array, _check_channels, _numeric,
                     input_channels)
from .preprocess import Preprocess, array_notes, model_class_names


@dataclass
class Batch:
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    samples: int | None = None  # for a batch without feeds (vsonnx.methods.population's later stages)

    def __len__(self) -> int:
        return self.samples if self.samples is not None else len(next(iter(self.feeds.values())))


class Source:
    """Base class: ``batches(batch_size)`` yields Batch objects; ``describe()`` names the source."""

    has_labels: bool = False
    spec: str = ""
    size: int | None = None  # samples it will yield, when known in advance
    replays: bool = False  # every pass yields the same batches, cheaply (no decoding, no user code)

    def batches(self, batch_size: int) -> Iterator[Batch]:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:
        return self.spec


def _order(n: int, shuffle: bool, seed: int, limit: int | None) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    return order[:limit] if limit is not None else order


DECODE_BUDGET = 512 << 20  # bytes that image decodes in flight may hold together


def available_memory() -> int:
    """Bytes of memory available now (Linux MemAvailable; else the physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class MemoryBudget:
    """Bytes that concurrent holders may hold together; a holder alone always proceeds, so one item larger
    than the budget still runs, but never beside another."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.condition = threading.Condition()

    @contextmanager
    def hold(self, n: int):
        with self.condition:
            self.condition.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            with self.condition:
                self.used -= n
                self.condition.notify_all()


class ImageFolderSource(Source):
    def __init__(self, root: Path, inputs: list[InputSpec], pre: Preprocess, *, shuffle: bool, seed: int,
                 limit: int | None, workers: int = 4, class_names: list[str] | None = None):
        skipped: dict[str, int] = {}
        files, labels, classes = image_folder_files(root, skipped, class_names)
        if classes:
            self.has_labels = True
        else:
            entries = sorted(root.iterdir())
            files = [f for f in entries if f.suffix.lower() in IMAGE_SUFFIXES]
            if len(files) < len(entries):
                skipped["files that are not images"] = len(entries) - len(files)
        for reason, n in skipped.items():
            warn(f"'{root}': skipped {n} {reason}.")
        if not files:
            raise VsonnxError(f"no images in '{root}'.", "pass a folder of class folders of images, a flat folder "
                                                       "of images, or a .npy/.npz file.")
        if len(inputs) != 1:
            raise VsonnxError(f"the model has {len(inputs)} inputs; image folders feed models with one input.",
                              "pass .npz files keyed by input name, or a Python reader FILE.py:FUNC.")
        if pre.size is None:
            raise VsonnxError("the model's input size is not static and no size was given.",
                              "pass --size H,W (and --mean/--std/--layout if the model expects them).")
        order = _order(len(files), shuffle, seed, limit)
        self.files = [str(files[i]) for i in order]  # str: a third of the memory of a Path per image
        self.labels = np.asarray(labels, np.int64)[order] if self.has_labels else None
        covered = len(np.unique(self.labels)) if self.labels is not None else 0
        if not shuffle and 0 < covered < len(classes):
            warn(f"'{root}': the {len(order)} images taken (--limit without shuffling) cover {covered} of "
                 f"{len(classes)} classes: statistics of them are biased (shuffle, the default, or raise --limit).")
        self.size = len(self.files)
        self.input, self.pre, self.workers = inputs[0], pre, workers
        self.budget = MemoryBudget(DECODE_BUDGET)
        self.spec = str(root)
        self.classes = classes
        self.channels = 1 if input_channels(self.input, pre.layout) == 1 else 3  # grayscale models get luma
        _check_channels(self.input, self.channels, pre.layout, f"images in '{root}' (RGB)")
        if pre.resize is not None and pre.resize < min(pre.size):
            raise VsonnxError(f"--resize {pre.resize} is below the {pre.size[0]} x {pre.size[1]} crop.",
                              "pass a --resize of at least the input size (e.g. 256 for a 224 x 224 model).")
        for key in ("mean", "std"):
            if self.channels == 1 and len(getattr(pre, key) or ()) == 3:
                raise VsonnxError(f"{key} has 3 values, but the model takes 1-channel (grayscale) images.",
                                  f"pass one --{key} value.")

    def _load(self, files: list[str]) -> np.ndarray:
        h, w = self.pre.size
        out = np.empty((len(files), h, w, self.channels), np.uint8)
        for i, f in enumerate(files):
            rgb = decode_rgb(f, (h, w), self.budget.hold, self.pre.resize)
            out[i] = rgb if self.channels == 3 else luma(rgb)[..., None]
        return out

    def batches(self, batch_size: int) -> Iterator[Batch]:
        h, w = self.pre.size
        need = 2 * batch_size * h * w * self.channels * (1 + 2 * 4)  # two batches in flight: uint8, two float32
        if need > available_memory() // 2:
            raise VsonnxError(f"a batch of {batch_size} images of {h} x {w} needs {need / 2**30:.1f} GiB, more than "
                              f"half of the {available_memory() / 2**30:.1f} GiB of memory available.",
                              "pass a smaller --batch-size or --size.")
        chunks = [self.files[i:i + batch_size] for i in range(0, len(self.files), batch_size)]
        with ThreadPoolExecutor(self.workers) as pool:
            def submit(chunk):  # split a batch across workers
                step = max(1, -(-len(chunk) // self.workers))
                return [pool.submit(self._load, chunk[j:j + step]) for j in range(0, len(chunk), step)]
            pending = submit(chunks[0]) if chunks else None
            for k, chunk in enumerate(chunks):
                images = np.concatenate([f.result() for f in pending])
                pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else None  # prefetch the next batch
                x = self.pre.apply(images).astype(self.input.dtype, copy=False)
                labels = None if self.labels is None else self.labels[k * batch_size:k * batch_size + len(chunk)]
                yield Batch({self.input.name: x}, labels)


class ArraySource(Source):
    """Preprocessed arrays: .npy (memory-mapped), .npz, or a folder of them, concatenated in name order."""

    replays = True  # the order is drawn once; a pass only gathers rows

    def __init__(self, files: list[Path], inputs: list[InputSpec], *, shuffle: bool, seed: int,
                 limit: int | None, spec: str, parts: list | None = None):
        self.spec = spec
        self.inputs = inputs
        parts = parts if parts is not None else [self._read(f, inputs) for f in files]
        has = [p[1] is not None for p in parts]
        self.has_labels = all(has)
        sizes = [len(next(iter(p[0].values()))) for p in parts]
        self.parts, self.offsets = parts, np.cumsum([0] + sizes)
        total = int(self.offsets[-1])
        if total == 0:
            raise VsonnxError(f"'{spec}' holds no samples.", "check the arrays' first axis (samples).")
        self.order = _order(total, shuffle, seed, limit)
        self.size = len(self.order)

    @classmethod
    def from_arrays(cls, model: onnx.ModelProto, x: np.ndarray, y: np.ndarray | None, *, shuffle: bool = True,
                    seed: int = 0, limit: int | None = None, name: str = "<arrays>") -> "ArraySource":
        """In-memory preprocessed inputs for a one-input model (labels optional)."""
        inputs = InputSpec.all_of(model)
        _check_array(x, inputs[0], name)
        return _checked_values(cls([], inputs, shuffle=shuffle, seed=seed, limit=limit, spec=name,
                                   parts=[({inputs[0].name: x}, y)]), model)

    @staticmethod
    def _read(path: Path, inputs: list[InputSpec]):
        try:
            if path.suffix == ".npy":
                arrays, labels = {inputs[0].name: np.load(path, mmap_mode="r", allow_pickle=False)}, None
                if len(inputs) != 1:
                    raise VsonnxError(f"'{path}' is one array but the model has {len(inputs)} inputs.",
                                      "use an .npz keyed by input name.")
            else:
                with np.load(path, allow_pickle=False) as z:
                    keys = set(z.files)
                    names = [i.name for i in inputs]
                    if all(n in keys for n in names):
                        arrays = {n: z[n] for n in names}
                    elif "x" in keys and len(inputs) == 1:
                        arrays = {names[0]: z["x"]}
                    else:
                        raise VsonnxError(f"'{path}' has arrays {sorted(keys)}; expected 'x' or the model's "
                                          f"input names {names}.", "save the inputs under 'x' (and labels under 'y').")
                    label_key = next((k for k in LABEL_KEYS if k in keys), None)
                    labels = _numeric(z[label_key], f"'{path}', labels '{label_key}'").astype(np.int64) if label_key else None
        except VsonnxError:
            raise
        except Exception as exc:
            raise VsonnxError(f"cannot read '{path}' ({type(exc).__name__}: {exc}).",
                              "pass a .npy/.npz written by numpy.save/numpy.savez.") from None
        for spec in inputs:
            _check_array(arrays[spec.name], spec, str(path))
        n = len(next(iter(arrays.values())))
        if labels is not None and len(labels) != n:
            raise VsonnxError(f"'{path}' has {n} samples but {len(labels)} labels.", "store one label per sample.")
        return arrays, labels

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(self.order), batch_size):
            idx = self.order[start:start + batch_size]
            part = np.searchsorted(self.offsets, idx, side="right") - 1
            feeds = {s.name: np.empty((len(idx),) + self.parts[0][0][s.name].shape[1:], s.dtype) for s in self.inputs}
            labels = np.empty(len(idx), np.int64) if self.has_labels else None
            for p in np.unique(part):
                sel = np.nonzero(part == p)[0]
                local = idx[sel] - self.offsets[p]
                arrays, lab = self.parts[p]
                sort = np.argsort(local)  # sorted reads are kinder to memory maps
                for s in self.inputs:
                    feeds[s.name][sel[sort]] = np.asarray(arrays[s.name][local[sort]], dtype=s.dtype)
                if labels is not None:
                    labels[sel] = lab[local]
            yield Batch(feeds, labels)


class ReaderSource(Source):
    """Feed dicts from user code, re-batched to the requested batch size."""

    def __init__(self, spec: str, inputs: list[InputSpec], *, limit: int | None):
        self.spec, self.inputs, self.limit = spec, inputs, limit
        self.size = None
        self.factory = _load_callable(spec)
        first = self._dicts()
        try:
            self._peek = next(first)
        except StopIteration:
            raise VsonnxError(f"reader '{spec}' yielded no data.", "return at least one feed dict.") from None
        self._rest = first
        self.has_labels = any(k in self._peek for k in LABEL_KEYS)

    def _dicts(self) -> Iterator[dict]:
        """The reader's feed dicts; whatever the user code raises or returns that is not that is a user error."""
        obj = self._call(self.factory, "raised")
        if hasattr(obj, "get_next"):
            items = iter(lambda: self._call(obj.get_next, "raised in get_next()"), None)
        else:
            try:
                items = iter(obj)
            except TypeError:
                raise VsonnxError(f"reader '{self.spec}' returned {type(obj).__name__}, not an iterable of feed dicts "
                                  "nor an object with get_next().", "return a list or generator of {input: array}.") from None
        while True:
            item = self._call(lambda: next(items, None), "raised while iterating")
            if item is None:
                return
            if not isinstance(item, dict):
                raise VsonnxError(f"reader '{self.spec}' yielded {type(item).__name__}, not a feed dict.",
                                  "yield dicts {input name: array}.")
            yield item

    def _call(self, fn, what: str):
        try:
            return fn()
        except VsonnxError:
            raise
        except Exception as exc:
            raise VsonnxError(f"reader '{self.spec}' {what}: {type(exc).__name__}: {str(exc)[:200]}",
                              "fix the reader function.") from None

    def batches(self, batch_size: int) -> Iterator[Batch]:
        stream = self._chain()
        names = [s.name for s in self.inputs]
        buffer: dict[str, list[np.ndarray]] = {n: [] for n in names}
        labels: list[np.ndarray] = []
        held = taken = 0
        for item in stream:
            missing = [n for n in names if n not in item]
            if missing:
                raise VsonnxError(f"reader '{self.spec}' gave a dict without {missing}.",
                                  f"yield dicts keyed by the model's input names {names}.")
            arrays = {s.name: _numeric(item[s.name], f"reader '{self.spec}', input '{s.name}'") for s in self.inputs}
            n = len(arrays[names[0]])
            if self.limit is not None:
                n = min(n, self.limit - taken)
            for s in self.inputs:
                arr = arrays[s.name][:n].astype(s.dtype, copy=False)
                _check_array(arr, s, f"reader '{self.spec}'")
                buffer[s.name].append(arr)
            if self.has_labels:
                key = next(k for k in LABEL_KEYS if k in item)
                labels.append(_numeric(item[key], f"reader '{self.spec}', labels '{key}'").astype(np.int64)[:n])
            held += n
            taken += n
            while held >= batch_size:
                yield self._pop(buffer, labels, batch_size)
                held -= batch_size
            if self.limit is not None and taken >= self.limit:
                break
        if held:
            yield self._pop(buffer, labels, held)

    def _chain(self) -> Iterator[dict]:
        if self._peek is not None:  # the first pass reuses the item read to detect labels
            peek, rest, self._peek = self._peek, self._rest, None
            yield peek
            yield from rest
        else:
            yield from self._dicts()

    def _pop(self, buffer, labels, n) -> Batch:
        return _take(buffer, labels if self.has_labels else [], n)


def _load_callable(spec: str):
    target, _, func = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.exists():
                raise VsonnxError(f"reader file '{path}' does not exist.", "pass FILE.py:FUNC with an existing file.")
            module_spec = importlib.util.spec_from_file_location(f"vsonnx_reader_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except VsonnxError:
        raise
    except Exception as exc:
        raise VsonnxError(f"cannot import '{target}' ({type(exc).__name__}: {exc}).",
                          "check FILE.py:FUNC or module:FUNC.") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise VsonnxError(f"'{target}' has no function '{func}'.", "pass FILE.py:FUNC naming a function.")
    return fn


def open_source(spec: str | Path, model: onnx.ModelProto, *, shuffle: bool = True, seed: int = 0,
                limit: int | None = None, preprocess: dict | None = None, workers: int = 4) -> Source:
    """Open any supported data source for ``model`` (see module docstring)."""
    if isinstance(spec, Source):
        return spec
    inputs = InputSpec.all_of(model)
    text = str(spec)
    if limit is not None and limit <= 0:
        raise VsonnxError(f"--limit must be positive, got {limit}.", "pass --limit N with N >= 1.")
    path = Path(text)
    if ":" in text and not path.exists():
        return ReaderSource(text, inputs, limit=limit)
    if not path.exists():
        raise VsonnxError(f"data source '{text}' does not exist.",
                          "pass an image folder, a .npy/.npz file or folder, or FILE.py:FUNC.")
    if path.is_file():
        if path.suffix not in ARRAY_SUFFIXES:
            raise VsonnxError(f"'{path}' is not a .npy or .npz file.", "pass an image folder, .npy/.npz, or FILE.py:FUNC.")
        return _checked_values(ArraySource([path], inputs, shuffle=shuffle, seed=seed, limit=limit, spec=text), model)
    entries = sorted(path.iterdir())
    arrays = [f for f in entries if f.is_file() and f.suffix in ARRAY_SUFFIXES]
    if arrays:
        return _checked_values(ArraySource(arrays, inputs, shuffle=shuffle, seed=seed, limit=limit, spec=text), model)
    if not entries:
        raise VsonnxError(f"data folder '{path}' is empty.", "pass a folder with images or .npy/.npz files.")
    pre = Preprocess.resolve(model, inputs, **(preprocess or {}))
    for note in pre.notes:
        warn(note)
    return ImageFolderSource(path, inputs, pre, shuffle=shuffle, seed=seed, limit=limit, workers=workers,
                             class_names=model_class_names(model))


def _checked_values(source: ArraySource, model: onnx.ModelProto) -> ArraySource:
    """``source``, after the warnings array_notes gives for its first part, if any."""
    for note in array_notes(model, source.inputs, source.parts[0][0], source.spec):
        warn(note)
    return source


def source_identity(spec, hashed: bool = True) -> dict[str, str]:
    """What identifies a data source in a written model's provenance without its path: the last path
    component (``FILE.py:FUNC`` keeps the file's name and the function), and (``hashed``) a SHA-256 (16 hex
    digits) of a file's bytes, or of a folder's sorted relative file names and sizes (contents of 50,000 images
    are not read again). A Source object passed from Python is named by its class."""
    if isinstance(spec, Source):
        return {"calibration_source": type(spec).__name__}
    text = str(spec)
    path = Path(text)
    if ":" in text and not path.exists():  # a reader
        file, _, func = text.rpartition(":")
        path, name = Path(file), f"{Path(file).name}:{func}"
    else:
        name = path.name
    if not hashed:
        return {"calibration_source": name}
    digest = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    elif path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0{file.stat().st_size}\n".encode())
    else:  # a module:FUNC reader: the name is all there is
        return {"calibration_source": name}
    return {"calibration_source": name, "calibration_sha256": digest.hexdigest()[:16]}


def check_finite(batch: Batch, source: Source) -> None:
    for name, x in batch.feeds.items():
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise VsonnxError(f"data from '{source.describe()}' has NaN or Inf values in input '{name}'.",
                              "clean the data (or its preprocessing) first.")


def _take(feeds: dict[str, list], labels: list, n: int) -> Batch:
    """The first ``n`` buffered samples as a Batch; the rest stay buffered."""
    out = {}
    for name, chunks in feeds.items():
        joined = np.concatenate(chunks)
        out[name], feeds[name] = joined[:n], [joined[n:]]
    lab = None
    if labels:
        joined = np.concatenate(labels)
        lab, labels[:] = joined[:n], [joined[n:]]
    return Batch(out, lab)
