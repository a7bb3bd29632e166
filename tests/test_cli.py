"""The command line: help, scan output, user errors as exit 3 with Error/Hint and no traceback."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import cnn_with_sites, run, save


@pytest.fixture
def model_file(tmp_path):
    return save(cnn_with_sites(), tmp_path / "m.onnx")


def test_help_and_version():
    import vsonnx

    r = run("--help")
    assert r.exit_code == 0 and all(c in r.output for c in ("scan", "fix", "eval", "compare"))
    r = run("scan", "-h")
    assert r.exit_code == 0 and "--json" in r.output
    r = run("--version")
    assert r.exit_code == 0 and vsonnx.__version__ in r.output


def test_fix_help_lists_its_options_in_groups():
    text = run("fix", "--help").output
    titles = ["Data:", "Method:", "Choice among candidates:", "Distill:", "Image preprocessing:", "Output:",
              "Runtime:"]
    positions = [text.index(t) for t in titles]
    assert positions == sorted(positions)
    for title, option in zip(titles, ["--calib", "--method", "--val-split", "--steps", "--mean", "--output",
                                      "--threads"]):
        section = text[text.index(title):]
        later = [text.index(t) for t in titles if text.index(t) > text.index(title)]
        assert option in section[:(later[0] - text.index(title)) if later else None], (title, option)


def test_scan_table_and_json(model_file):
    r = run("scan", model_file)
    assert r.exit_code == 0 and "bn_direct" in r.output and "SITE" in r.output
    r = run("scan", model_file, "--json")
    d = json.loads(r.output)
    kinds = {b["name"]: b["path"] for b in d["batchnorms"]}
    assert kinds == {"bn_direct": "direct", "bn_weight": "weight"}


@pytest.mark.parametrize("content,needle", [
    (None, "does not exist"), (b"", "is empty"), (b"not a model at all \x00\x01\x02", "not a readable ONNX"),
])
def test_scan_bad_files_exit_3(tmp_path, content, needle):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    r = run("scan", path)
    assert r.exit_code == 3 and needle in r.output and "Hint:" in r.output


def test_truncated_model_exit_3(tmp_path, model_file):
    data = Path(model_file).read_bytes()
    path = tmp_path / "trunc.onnx"
    path.write_bytes(data[: len(data) // 2])
    r = run("scan", path)
    assert r.exit_code == 3 and "Error:" in r.output


@pytest.mark.parametrize("opset,needle", [(5, "opset 5"), (99, "newer than")])
def test_unsupported_opset_exit_3(tmp_path, opset, needle):
    model = cnn_with_sites()
    model.opset_import[0].version = opset
    path = tmp_path / "old.onnx"
    path.write_bytes(model.SerializeToString())
    r = run("scan", path)
    assert r.exit_code == 3 and needle in r.output


def test_unsupported_ir_exit_3(tmp_path):
    model = cnn_with_sites()
    model.ir_version = 2
    path = tmp_path / "ir.onnx"
    path.write_bytes(model.SerializeToString())
    assert run("scan", path).exit_code == 3


def test_python_dash_m_and_fast_help():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "vsonnx", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "scan" in proc.stdout
    assert "onnxruntime" not in proc.stderr and "torch" not in proc.stderr  # heavy imports stay lazy



@pytest.mark.parametrize("extra,needle", [
    (["--val-limit", "10"], "apply only when choosing"),
    (["--force"], "apply only when choosing"),
    (["--val-masks", "4"], "apply only when choosing"),
    (["--val-split", "0.25", "--val-limit", "10"], "--val-limit is ignored with --val-split"),
])
def test_choice_options_without_their_mode_are_named(tmp_path, model_file, extra, needle):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32))
    r = run("fix", model_file, "--calib", tmp_path / "x.npy", "-o", tmp_path / "o.onnx", "--steps", "2", *extra)
    assert r.exit_code in (0, 1) and needle in r.output, r.output
    plain = run("fix", model_file, "--calib", tmp_path / "x.npy", "-o", tmp_path / "p.onnx")
    assert plain.exit_code == 0 and "warning" not in plain.output


def test_scan_says_what_data_the_model_expects(tmp_path):
    """Input shape, the vsonnx.preprocess metadata (or what to pass without it) and the class names, in the
    table and in the JSON."""
    from vsonnx.model import set_metadata

    model = cnn_with_sites()
    plain = save(model, tmp_path / "plain.onnx")
    set_metadata(model, {"vsonnx.preprocess": '{"mean": [0.5], "std": [0.25], "channels": "bgr"}',
                         "vsonnx.class_names": json.dumps([f"c{i}" for i in range(5)])})
    described = save(model, tmp_path / "meta.onnx")
    r = run("scan", plain)
    assert "input 'x': N x 3 x 8 x 8 float32" in r.output and "no vsonnx.preprocess metadata" in r.output
    r = run("scan", described)
    assert "image preprocessing (vsonnx.preprocess metadata): channels bgr, mean [0.5], std [0.25]" in r.output
    assert "5 class names (vsonnx.class_names): c0, c1, c2, c3, c4" in r.output
    data = json.loads(run("scan", described, "--json").output)["data"]
    assert data == {"inputs": [{"name": "x", "shape": [None, 3, 8, 8], "dtype": "float32"}],
                    "preprocess": {"mean": [0.5], "std": [0.25], "channels": "bgr"},
                    "class_names": ["c0", "c1", "c2", "c3", "c4"]}
