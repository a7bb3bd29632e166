"""Working copies (vsonnx.working_copy): dropout really off, what a gs round trip keeps, the source model and
the untouched nodes of a written model byte for byte as they were."""
import numpy as np
import onnx

from vsonnx.graph import GraphIndex
from vsonnx.model import get_metadata, set_metadata
from vsonnx.simulate import insert_dropouts
from vsonnx.working_copy import working_copy

from conftest import GraphBuilder, cnn_with_sites
from test_simulate import X, dropout_model, outputs


def test_working_copy_switches_dropout_off():
    model = dropout_model(training=True)
    assert not np.array_equal(outputs(model), X)  # the model as given drops values
    np.testing.assert_array_equal(outputs(working_copy(model)), X)


def test_round_trip_keeps_opsets_and_model_metadata():
    model = cnn_with_sites()
    set_metadata(model, {"vsonnx.preprocess": "{}"})
    copy = working_copy(model)
    assert get_metadata(copy) == {"vsonnx.preprocess": "{}"}
    assert list(copy.opset_import) == list(model.opset_import)
    assert copy.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "vsonnx_batch"
    np.testing.assert_allclose(outputs(copy), outputs(model), rtol=1e-6)


def model_with_unnamed_constant():
    """conv -> Dropout(ratio from a Constant node) -> Mul by an unnamed Constant node's tensor -> BN."""
    from onnx import numpy_helper

    g = GraphBuilder()
    h = g.dropout(g.conv("x", 3, 4), 0.5, "d", form="constant")
    g.node("Constant", [], "c", outputs=["c_value"], value=numpy_helper.from_array(np.ones((1, 4, 1, 1), np.float32)))
    g.nodes[-1].name = ""
    return g.build(g.bn(g.node("Mul", [h, "c_value"]), 4, "bn"))


def test_working_copies_leave_the_source_model_byte_identical():
    """gs's export used to set .name on the source's TensorProtos (here the unnamed Constant's value)."""
    model = model_with_unnamed_constant()
    before = model.SerializeToString()
    working_copy(model)
    insert_dropouts(model, {"conv1_out": 0.5}, training=True)
    GraphIndex(model).levels(["bn"])
    assert model.SerializeToString() == before


def test_a_fix_writes_the_untouched_nodes_as_they_were(tmp_path):
    """Every node of the written model is the input's node, byte for byte (only BN constants change)."""
    import vsonnx
    from conftest import save

    model = model_with_unnamed_constant()
    path = save(model, tmp_path / "m.onnx")
    before = (tmp_path / "m.onnx").read_bytes()
    np.save(tmp_path / "x.npy", X)
    for method in ("population", "relative"):
        out = tmp_path / f"{method}.onnx"
        vsonnx.fix(path, tmp_path / "x.npy", method=method, output=out, batch_size=8)
        written = onnx.load(str(out))
        assert [n.SerializeToString() for n in written.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert (tmp_path / "m.onnx").read_bytes() == before
