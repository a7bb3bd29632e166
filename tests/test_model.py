"""Model I/O: atomic writes that keep metadata, IR lowering, refusals to overwrite, external data."""
import os

import onnx
import pytest

from vsonnx.errors import VsonnxError
from vsonnx.model import get_metadata, load_model, max_ir_version, save_model

from conftest import cnn_with_sites, run, save


@pytest.fixture
def model_file(tmp_path):
    return save(cnn_with_sites(), tmp_path / "m.onnx")


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


