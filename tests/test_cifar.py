"""CIFAR loading: the python release, verified downloads, the image-folder listing."""
import pickle
from pathlib import Path

import numpy as np
import pytest

from vsonnx import VsonnxError
from vsonnx.data import cifar
from vsonnx.data.cifar import image_folder_files, load_cifar


def test_python_release_loader(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 4))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    data = load_cifar("cifar10", tmp_path)
    assert data["train"][0].shape == (20, 32, 32, 3) and data["test"][0].shape == (4, 32, 32, 3)
    with open(folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f)[b"data"][0]
    np.testing.assert_array_equal(data["train"][0][0], raw.reshape(3, 32, 32).transpose(1, 2, 0))
    assert data["classes"][3] == "c3"


def test_download_is_verified_before_use(tmp_path, monkeypatch):
    """A corrupted or foreign archive is rejected by its MD5 and removed, never unpickled."""
    import urllib.request

    def fake_download(url, target):
        Path(target).write_bytes(b"not the CIFAR archive")

    monkeypatch.setattr(urllib.request, "urlretrieve", fake_download)
    with pytest.raises(VsonnxError, match="MD5"):
        cifar.download_release("cifar10", tmp_path)
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()

    def offline(url, target):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(VsonnxError, match="could not be downloaded") as info:
        cifar.download_release("cifar10", tmp_path)
    assert "--data" in info.value.hint



def test_image_folder_files_are_sorted_with_class_labels(tmp_path):
    for cls, names in (("b", ["2.png", "1.jpg", "notes.txt"]), ("a", ["9.png"])):
        (tmp_path / cls).mkdir()
        for n in names:
            (tmp_path / cls / n).write_bytes(b"")
    files, labels, classes = image_folder_files(tmp_path)
    assert classes == ["a", "b"] and labels == [0, 1, 1]
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a/9.png", "b/1.jpg", "b/2.png"]
