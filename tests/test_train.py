import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vsonnx.datasets import load_cifar

ROOT = Path(__file__).resolve().parents[1]


def load_train_module():
    spec = importlib.util.spec_from_file_location("train_tool", ROOT / "tools" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def image_tree(root: Path, per_class: int = 6, classes: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(25 * c, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


def test_training_smoke_run_writes_model_and_card(tmp_path):
    data = image_tree(tmp_path / "data")
    out = tmp_path / "run"
    train = load_train_module()
    result = train.main(["--arch", "preresnet", "--depth", "8", "--dropout", "0.5", "--placement", "a",
                         "--data", str(data), "--epochs", "2", "--batch-size", "16", "--out", str(out),
                         "--seed", "1", "--no-progress"])
    for name in ("model.onnx", "card.json", "card.md", "config.json", "log.csv", "log.json", "checkpoint.pt"):
        assert (out / name).exists(), name
    card = json.loads((out / "card.json").read_text())
    assert card["epochs"] == 2 and 0 <= card["pytorch_test_acc"] <= 100 and card["test_samples"] == 20
    import vsonnx
    report = vsonnx.scan(out / "model.onnx")
    assert len(report.sites) == 3 and {b.path for b in report.sites} == {"direct"}
    assert result["dropout"] == {"placement": "a", "ratio": 0.5, "noise": "dropout"}
    resumed = train.main(["--arch", "preresnet", "--depth", "8", "--dropout", "0.5", "--placement", "a",
                          "--data", str(data), "--epochs", "3", "--batch-size", "16", "--out", str(out),
                          "--seed", "1", "--no-progress", "--resume", "--no-export"])
    assert len(json.loads((out / "log.json").read_text())) == 3 and resumed["epochs"] == 3


def test_missing_data_names_the_flag(tmp_path):
    import vsonnx
    with pytest.raises(vsonnx.VsonnxError, match="--data"):
        load_cifar("cifar10", tmp_path / "nothing")


@pytest.mark.slow
def test_two_process_gloo_ddp(tmp_path):
    data = image_tree(tmp_path / "data", per_class=4)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "tools" / "train.py"), "--depth", "8", "--placement", "b", "--dropout", "0.3",
           "--data", str(data), "--epochs", "1", "--batch-size", "8", "--out", str(out), "--no-progress",
           "--threads", "1", "--sync-bn"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = json.loads((out / "card.json").read_text())
    assert card["world_size"] == 2 and (out / "model.onnx").exists()


def test_train_script_user_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--data", str(tmp_path / "none"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and "--data" in proc.stderr and "Traceback" not in proc.stderr


