"""Model I/O: atomic writes that keep metadata, IR lowering, refusals to overwrite, external data."""
import os
from pathlib import Path

import numpy as np
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
    before = Path(model_file).read_bytes()
    with pytest.raises(VsonnxError, match="never overwrites"):
        save_model(load_model(model_file), model_file, input_path=model_file)
    assert Path(model_file).read_bytes() == before
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




def test_models_over_the_protobuf_limit_are_refused_where_they_would_run(tmp_path, monkeypatch):
    """onnxruntime sessions and shape inference take the model serialized: over 2 GB (here a limit just below
    this model's size) fix, eval and scan --calib refuse it with exit 3; a plain scan still reads it."""
    import vsonnx.model

    path = tmp_path / "ext.onnx"
    onnx.save_model(cnn_with_sites(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    np.save(tmp_path / "x.npy", np.zeros((16, 3, 8, 8), np.float32))
    np.savez(tmp_path / "xy.npz", x=np.zeros((16, 3, 8, 8), np.float32), y=np.zeros(16, np.int64))
    size = load_model(path).ByteSize()  # external data loaded
    monkeypatch.setattr(vsonnx.model, "PROTOBUF_LIMIT_BYTES", size - 1)
    for args in (["fix", path, "--calib", tmp_path / "x.npy"], ["eval", path, "--data", tmp_path / "xy.npz"],
                 ["scan", path, "--calib", tmp_path / "x.npy"]):
        r = run(*args)
        assert r.exit_code == 3 and "over 2 GB" in r.output, r.output
    assert not (tmp_path / "ext.fixed.onnx").exists()
    assert run("scan", path).exit_code == 0
    monkeypatch.setattr(vsonnx.model, "PROTOBUF_LIMIT_BYTES", size)
    assert run("fix", path, "--calib", tmp_path / "x.npy").exit_code == 0
    written = onnx.load(str(tmp_path / "ext.fixed.onnx"), load_external_data=False)  # one file, no data beside it
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in written.graph.initializer)
