import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vsonnx.cli import main

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


@pytest.mark.skipif(not (CIFAR / "train").is_dir(), reason="needs ../shared/data/cifar10")
def test_demo_on_the_image_folders():
    r = CliRunner().invoke(main, ["demo", "--data", str(CIFAR), "--calib-limit", "256", "--test-limit", "512",
                                  "--synthetic", "8", "--synthetic-steps", "2", "--steps", "3", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output[r.output.index("{"):])
    assert [x["model"] for x in d["results"]] == ["original", "fixed (batch)", "fixed (relative)",
                                                  "fixed (distill)", "fixed (data-free)"]
    assert d["calib_samples"] == 256 and all(x["samples"] == 512 for x in d["results"])
    assert d["sites"] == 9 and d["total_seconds"] >= sum(d["fix_seconds"].values())


def test_demo_on_the_python_release(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, 8))}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    r = CliRunner().invoke(main, ["demo", "--data", str(tmp_path), "--batch-size", "8", "--synthetic", "0",
                                  "--steps", "2"])
    assert r.exit_code == 0 and "fixed (distill)" in r.output and "Traceback" not in r.output
    assert "total time:" in r.output


def test_demo_without_data_names_the_flag(tmp_path):
    r = CliRunner().invoke(main, ["demo", "--data", str(tmp_path / "missing")])
    assert r.exit_code == 3 and "--data" in r.output
