"""The graph index: constants through Constant/Identity/Cast, topological order, node lookup, stored
statistics, shapes."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from vsonnx.errors import VsonnxError
from vsonnx.graph import GraphIndex, has_subgraphs, tensor_shapes

from conftest import GraphBuilder, cnn_with_sites


def test_constants_follow_constant_identity_and_cast_nodes():
    g = GraphBuilder()
    c = g.node("Constant", [], "c", value=numpy_helper.from_array(np.array([1.5, 2.5], np.float32)))
    i = g.node("Identity", [c], "i")
    k = g.node("Cast", [i], "k", to=TensorProto.INT64)
    out = g.node("Add", ["x", g.init("w", np.ones((1, 3, 1, 1), np.float32))], "add")
    index = GraphIndex(g.build(out))
    np.testing.assert_array_equal(index.constant(i), [1.5, 2.5])
    assert index.constant(k).dtype == np.int64 and index.constant(k).tolist() == [1, 2]
    assert index.constant("x") is None and index.constant(out) is None and index.constant("") is None
    assert index.dynamic_inputs(index.by_name["add"]) == ["x"]


def test_topological_order_of_a_shuffled_graph():
    model = cnn_with_sites()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    index = GraphIndex(model)
    seen = {"x"} | set(index.initializers)
    for node in index.topological_order:
        assert all(i in seen for i in node.input if i), node.name
        seen.update(node.output)
    assert len(index.topological_order) == len(nodes)


def test_node_lookup_and_stored_statistics():
    index = GraphIndex(cnn_with_sites())
    assert set(index.batchnorms()) == {"bn_direct", "bn_weight"}
    stats = index.stored_statistics(["bn_weight"])["bn_weight"]
    assert stats.mean.dtype == np.float64 and stats.var.shape == (4,)
    np.testing.assert_array_equal(stats.var, index.constant("bn_weight_var").astype(np.float64))
    with pytest.raises(VsonnxError, match="no BatchNormalization named"):
        index.batchnorms(["nope"])
    with pytest.raises(VsonnxError, match="no node named 'nope'"):
        index.node("nope")


def test_unnamed_nodes_get_a_stable_name():
    g = GraphBuilder()
    model = g.build(g.node("Relu", ["x"], "r"))
    model.graph.node[0].name = ""
    index = GraphIndex(model)
    assert index.node_name(model.graph.node[0]) == "Relu:r_out" and "Relu:r_out" in index.by_name


def test_shapes_and_subgraphs():
    shapes = tensor_shapes(cnn_with_sites())
    assert shapes["x"] == (None, 3, 8, 8) and shapes.dtypes["x"] == TensorProto.FLOAT
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "then", [],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    cond = helper.make_node("If", ["c"], ["out"], then_branch=then, else_branch=then)
    graph = helper.make_graph([cond], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    assert has_subgraphs(helper.make_model(graph)) and not has_subgraphs(cnn_with_sites())


def test_levels_count_recalibrated_bns_upstream():
    model = cnn_with_sites()
    assert GraphIndex(model).levels(["bn_direct", "bn_weight"]) == {"bn_direct": 0, "bn_weight": 1}
    assert GraphIndex(model).levels(["bn_weight"]) == {"bn_weight": 0}
