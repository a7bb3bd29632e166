"""CIFAR-10/100 loading for training and the demo: image folder trees, the official python release,
or a checksum-verified download into a cache. Arrays are uint8 NHWC plus int64 labels.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import VsonnxError, warn

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
RELEASES = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                "cifar-10-batches-py"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                 "cifar-100-python"),
}
MAX_PIXELS = 50_000_000  # per decoded image (150 MB as RGB)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def default_cache() -> Path:
    return Path(os.environ.get("VSONNX_CACHE", Path.home() / ".cache" / "vsonnx"))


def image_folder_files(root: Path, skipped: dict[str, int] | None = None, class_names: list[str] | None = None
                       ) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names) of an ImageFolder tree root/<class>/<image>, classes sorted; labels number
    them in that order, or in ``class_names``'s (the model's output order, ``labels_in_model_order``). What is
    left out is counted by reason in ``skipped``: images at the root beside class folders, folders nested in a
    class folder, files that are not images."""
    skipped = {} if skipped is None else skipped
    entries = sorted(root.iterdir())
    classes = [d.name for d in entries if d.is_dir()]
    if classes:
        _count(skipped, "images at the top level beside class folders",
               sum(f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES for f in entries))
    files, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.is_dir():
                _count(skipped, "folders nested inside a class folder (only one level is read)", 1)
            elif f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(label)
            else:
                _count(skipped, "files that are not images", 1)
    return files, labels_in_model_order(root, labels, classes, class_names), classes


def labels_in_model_order(root: Path, labels: list[int], classes: list[str],
                          class_names: list[str] | None) -> list[int]:
    """Class-folder labels (sorted folder names: 0, 1, ...) renumbered to the model's output order where
    every class folder is one of the model's class names; else the sorted order, with a warning when the
    model names its classes."""
    if not class_names:
        return labels
    unknown = [c for c in classes if c not in class_names]
    if unknown:
        warn(f"'{root}': class folder(s) {', '.join(unknown[:3])} are not among the model's class names "
             f"(vsonnx.class_names metadata: {', '.join(class_names[:3])}, ...); labels follow the sorted folder "
             "names.")
        return labels
    order = np.array([class_names.index(c) for c in classes], np.int64)
    return list(order[np.asarray(labels, np.int64)])


def _count(counts: dict[str, int], reason: str, n: int) -> None:
    if n:
        counts[reason] = counts.get(reason, 0) + n


def luma(rgb: np.ndarray) -> np.ndarray:
    """uint8 grayscale of uint8 RGB pixels (..., 3) as PIL's convert("L") computes it (ITU-R 601-2 luma,
    L = (19595 R + 38470 G + 7471 B + 2^15) >> 16): a gray image decoded to RGB comes back unchanged."""
    weights = np.array([19595, 38470, 7471], np.uint32)
    return ((rgb.astype(np.uint32) @ weights + 0x8000) >> 16).astype(np.uint8)


def resized_then_cropped(width: int, height: int, short: int, target: tuple[int, int]) -> tuple[tuple[int, int], tuple]:
    """torchvision's Resize(short) then CenterCrop(target): the resized (W, H), the shorter side made ``short``
    and the longer ``int(short * long / short_before)``, and the crop box (left, top, right, bottom) of
    ``target`` = (H, W) centred with ``int(round((size - crop) / 2))``."""
    if width <= height:
        size = (short, int(short * height / width))
    else:
        size = (int(short * width / height), short)
    top, left = int(round((size[1] - target[0]) / 2.0)), int(round((size[0] - target[1]) / 2.0))
    return size, (left, top, left + target[1], top + target[0])


def decode_rgb(path: Path, target: tuple[int, int] | None = None, hold=None, resize: int | None = None) -> np.ndarray:
    """uint8 RGB pixels of an image file. Images of more than 8 bits per channel (16-bit PNG/TIFF: PIL modes
    I;16*, I and F) are scaled to 0..255 (value / 257 for 16-bit data), not saturated as PIL's RGB
    conversion does.

    ``target`` = (H, W): the image is resized to it (bilinear) right after decoding; with ``resize``, its
    shorter side is resized to ``resize`` and the centre ``target`` cropped (``resized_then_cropped``).
    Memory: a JPEG is decoded reduced (by up to 8x, never below the target); an image that would still exceed
    ``MAX_PIXELS`` once decoded is refused before decoding; ``hold(bytes)``, when given, is a context manager
    entered around the decode and resize with the bytes they need (a shared memory budget)."""
    from contextlib import nullcontext

    from PIL import Image

    try:
        with Image.open(path) as im:
            box = None
            if target is not None and resize is not None:
                (w, h), box = resized_then_cropped(im.width, im.height, resize, target)
                target = (h, w)
            if target is not None and im.format == "JPEG":
                im.draft("RGB", (target[1], target[0]))
            if im.width * im.height > MAX_PIXELS:
                raise VsonnxError(f"image '{path}' is {im.width} x {im.height} pixels, over the budget of "
                                  f"{MAX_PIXELS // 1_000_000} million pixels per decoded image.",
                                  "downscale it (or leave it out): calibration images are resized to the model's "
                                  "input anyway.")
            with hold(2 * 4 * im.width * im.height) if hold else nullcontext():  # decoded + converted copy
                if im.mode.startswith("I") or im.mode == "F":
                    rgb = Image.fromarray(_wide_to_rgb(np.asarray(im), im.mode))
                else:
                    rgb = im if im.mode == "RGB" else im.convert("RGB")
                if target is not None and rgb.size != (target[1], target[0]):
                    rgb = rgb.resize((target[1], target[0]), Image.BILINEAR)
                return np.asarray(rgb if box is None else rgb.crop(box))
    except VsonnxError:
        raise
    except Exception as exc:
        raise VsonnxError(f"cannot read image '{path}' ({type(exc).__name__}).",
                          "remove or replace the corrupt file.") from None


def _wide_to_rgb(values: np.ndarray, mode: str) -> np.ndarray:
    """Grayscale of more than 8 bits -> uint8 RGB: 16-bit ranges (I;16 and I, which PIL uses for 16-bit PNGs)
    divided by 257; floats taken as 0..1 when they stay within it, else as 0..255."""
    values = values.astype(np.float64)
    if mode == "F":
        values = values * 255 if values.size and values.max() <= 1 else values
    else:
        values = values / 257
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def load_image_split(root: Path, limit: int | None = None, workers: int = 4) -> tuple[np.ndarray, np.ndarray, list[str]]:
    files, labels, classes = image_folder_files(root)
    if limit is not None:  # an evenly spread subset keeps every class
        keep = np.linspace(0, len(files) - 1, num=min(limit, len(files))).round().astype(int)
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    with ThreadPoolExecutor(workers) as pool:
        images = list(pool.map(decode_rgb, files, chunksize=256))
    return np.stack(images), np.asarray(labels, np.int64), classes


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def load_python_release(folder: Path, dataset: str) -> dict:
    """The official python release: cifar-10-batches-py (data_batch_1..5, test_batch) or cifar-100-python."""
    def to_nhwc(raw) -> np.ndarray:
        return np.asarray(raw, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    if dataset == "cifar10":
        parts = [_unpickle(folder / f"data_batch_{i}") for i in range(1, 6)]
        test = _unpickle(folder / "test_batch")
        meta = _unpickle(folder / "batches.meta")
        classes = [c.decode() for c in meta[b"label_names"]]
        train_x = np.concatenate([to_nhwc(p[b"data"]) for p in parts])
        train_y = np.concatenate([np.asarray(p[b"labels"], np.int64) for p in parts])
        return {"train": (train_x, train_y), "test": (to_nhwc(test[b"data"]), np.asarray(test[b"labels"], np.int64)),
                "classes": classes}
    train, test, meta = _unpickle(folder / "train"), _unpickle(folder / "test"), _unpickle(folder / "meta")
    return {"train": (to_nhwc(train[b"data"]), np.asarray(train[b"fine_labels"], np.int64)),
            "test": (to_nhwc(test[b"data"]), np.asarray(test[b"fine_labels"], np.int64)),
            "classes": [c.decode() for c in meta[b"fine_label_names"]]}


def find_cifar(dataset: str, data: Path | None) -> tuple[str, Path]:
    """Locate CIFAR data: ('folder', root with train/ and test/) or ('python', release folder).

    Looks in ``data`` when given, else in the cache; downloads the official release into the cache when
    missing (verifying its MD5 before anything is unpickled)."""
    if dataset not in RELEASES:
        raise VsonnxError(f"unknown dataset '{dataset}'.", "use cifar10 or cifar100.")
    url, md5, folder_name = RELEASES[dataset]
    candidates = [data] if data is not None else [default_cache()]
    for base in candidates:
        if base is None or not base.exists():
            continue
        if (base / "train").is_dir() and (base / "test").is_dir():
            return "folder", base
        if (base / folder_name).is_dir():
            return "python", base / folder_name
        if base.name == folder_name:
            return "python", base
    if data is not None:
        raise VsonnxError(f"no {dataset} data in '{data}' (expected train/ and test/ image folders or "
                          f"{folder_name}/).", "pass --data pointing at the dataset folder.")
    return "python", download_release(dataset, default_cache())


def download_release(dataset: str, cache: Path) -> Path:
    url, md5, folder_name = RELEASES[dataset]
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / url.rsplit("/", 1)[1]
    if not archive.exists():
        try:
            tmp = archive.with_suffix(".part")
            urllib.request.urlretrieve(url, tmp)
            tmp.replace(archive)
        except OSError as exc:
            raise VsonnxError(f"{dataset} is not in the cache and could not be downloaded ({exc}).",
                              "pass --data with a folder holding train/ and test/ image folders or the "
                              "python release.") from None
    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    if digest != md5:
        archive.unlink()
        raise VsonnxError(f"downloaded {archive.name} has MD5 {digest}, expected {md5}.", "try again.")
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    return cache / folder_name


def load_cifar(dataset: str, data: Path | None, limit_train: int | None = None, limit_test: int | None = None,
               workers: int = 4) -> dict:
    """{'train': (x, y), 'test': (x, y), 'classes': [...]}, x uint8 NHWC."""
    kind, root = find_cifar(dataset, data)
    if kind == "folder":
        train = load_image_split(root / "train", limit_train, workers)
        test = load_image_split(root / "test", limit_test, workers)
        return {"train": train[:2], "test": test[:2], "classes": train[2]}
    result = load_python_release(root, dataset)
    for split, limit in (("train", limit_train), ("test", limit_test)):
        x, y = result[split]
        if limit is not None:
            keep = np.linspace(0, len(x) - 1, num=min(limit, len(x))).round().astype(int)
            result[split] = (x[keep], y[keep])
    return result
