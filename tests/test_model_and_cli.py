import json
import os

import onnx
import pytest
from click.testing import CliRunner

from vsonnx.cli import main
from vsonnx.errors import VsonnxError
from vsonnx.model import get_metadata, load_model, max_ir_version, save_model

from conftest import cnn_with_sites, save


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


@pytest.fixture
def model_file(tmp_path):
    return save(cnn_with_sites(), tmp_path / "m.onnx")


def test_help_and_version():
    assert run("--help").exit_code == 0
    assert run("scan", "-h").exit_code == 0


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
    data = open(model_file, "rb").read()
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


def test_save_is_atomic_keeps_metadata_and_lowers_ir(tmp_path):
    model = cnn_with_sites()
    model.ir_version = onnx.IR_VERSION
    onnx.helper.set_model_props(model, {"author": "me"})
    out = save_model(model, tmp_path / "o.onnx", provenance={"method": "test"})
    loaded = load_model(out)
    meta = get_metadata(loaded)
    assert meta["author"] == "me" and meta["vsonnx.method"] == "test"
    assert loaded.ir_version <= max_ir_version()
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_save_refuses_to_overwrite_input_unless_in_place(tmp_path, model_file):
    before = open(model_file, "rb").read()
    with pytest.raises(VsonnxError, match="never overwrites"):
        save_model(load_model(model_file), model_file, input_path=model_file)
    assert open(model_file, "rb").read() == before
    save_model(load_model(model_file), model_file, input_path=model_file, in_place=True)


def test_external_data_model_loads(tmp_path):
    model = cnn_with_sites()
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    loaded = load_model(path)
    assert len(loaded.graph.initializer) == len(model.graph.initializer)
    assert run("scan", path).exit_code == 0


def test_save_refuses_missing_output_folder(tmp_path):
    with pytest.raises(VsonnxError, match="does not exist"):
        save_model(cnn_with_sites(), tmp_path / "nope" / "o.onnx")


def test_python_dash_m_and_fast_help():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "vsonnx", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "scan" in proc.stdout
    assert "onnxruntime" not in proc.stderr and "torch" not in proc.stderr  # heavy imports stay lazy
