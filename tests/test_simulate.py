"""Dropout in working copies (vsonnx.simulate): really simulated in training mode (fed draws or
RandomUniformLike, by channel, old opsets), inserted at named tensors."""
import numpy as np
import pytest

from vsonnx.graph import tensor_shapes
from vsonnx.random_feeds import RANDOM_PREFIX
from vsonnx.runtime import make_session
from vsonnx.simulate import insert_dropouts, simulate_dropouts
from vsonnx.taps import instrument_batch
from vsonnx.working_copy import to_model, working_graph

from conftest import GraphBuilder, cnn_with_sites

X = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32) + 1.0


def outputs(model, x=X):
    session = make_session(model, device="cpu", optimize=False)  # optimisations would remove Dropout
    return session.run(None, {"x": x})[0]


def dropout_model(training: bool):
    g = GraphBuilder()
    r, t = g.init("r", np.array(0.5, np.float32)), g.init("t", np.array(training))
    return g.build(g.node("Dropout", ["x", r, t], "d"))


def simulated(model, fed: bool, **options):
    """The working copy with its dropouts simulated; ``fed``: the draws are graph inputs (shapes known)."""
    graph = working_graph(model)
    shapes = tensor_shapes(to_model(graph.copy(), model)) if fed else None
    simulate_dropouts(graph, opset=17, dtypes={}, shapes=shapes, **options)
    assert any(n.op == "RandomUniformLike" for n in graph.nodes) != fed
    return to_model(graph, model)


@pytest.mark.parametrize("fed", [True, False], ids=["fed draws", "RandomUniformLike"])
@pytest.mark.parametrize("optimize", [False, True])
def test_simulated_dropout_drops_and_rescales_also_optimised(optimize, fed):
    """The explicit mask operations survive onnxruntime's graph optimisations (a Dropout node would not)."""
    model = dropout_model(training=False)
    session = make_session(simulated(model, fed, seed=3), device="cpu", optimize=optimize)
    assert [i.name for i in session.get_inputs()] == ["x"]  # fed draws are not the caller's business
    y, again = (session.run(None, {"x": X})[0] for _ in range(2))
    kept = y != 0
    assert abs(kept.mean() - 0.5) < 0.03  # 3,072 values: 3 standard deviations of the kept fraction
    np.testing.assert_allclose(y[kept], 2 * X[kept], rtol=1e-6)
    assert not np.array_equal(y, again)  # a fresh mask every run


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.05])
def test_fed_draws_drop_the_ratio_with_one_seeded_stream(ratio):
    """Fed draws (vsonnx.random_feeds): P(drop) = ceil(65536 r) / 65536 (within 4 standard deviations on 192,000
    values), inverted scaling, the same masks for the same seed and batch sizes, others for another seed,
    the batch size read from each run's input."""
    g = GraphBuilder()
    model = simulated(g.build(g.dropout("x", ratio, "d")), True)
    ones = np.ones((1000, 3, 8, 8), np.float32)
    session = make_session(model, device="cpu", seed=7)
    y = session.run(None, {"x": ones})[0]
    assert abs((y == 0).mean() - ratio) < 4 * np.sqrt(ratio * (1 - ratio) / y.size)
    np.testing.assert_allclose(y[y != 0], 1 / (1 - ratio), rtol=1e-6)
    assert session.run(None, {"x": ones[:3]})[0].shape == (3, 3, 8, 8)
    np.testing.assert_array_equal(make_session(model, device="cpu", seed=7).run(None, {"x": ones})[0], y)
    assert not np.array_equal(make_session(model, device="cpu", seed=8).run(None, {"x": ones})[0], y)


def test_draws_are_fed_only_where_the_shape_is_known_but_for_the_batch():
    """An input of unknown height and width: the draws stay in the graph (RandomUniformLike)."""
    g = GraphBuilder()
    model = g.build(g.dropout("x", 0.5, "d"), input_shape=("N", 3, "H", "W"))
    graph = working_graph(model)
    simulate_dropouts(graph, opset=17, dtypes={}, shapes=tensor_shapes(to_model(graph.copy(), model)))
    assert any(n.op == "RandomUniformLike" for n in graph.nodes)


@pytest.mark.parametrize("fed", [True, False], ids=["fed draws", "RandomUniformLike"])
def test_simulated_channelwise_dropout_drops_whole_channels(fed):
    """Dropout2d: one draw per sample and channel (shape [N, C, 1, 1]: fed, or drawn like GlobalAveragePool)."""
    g = GraphBuilder()
    model = simulated(g.build(g.dropout("x", 0.5, "d")), fed, seed=5, channelwise=frozenset({"d"}))
    ones = np.ones((400, 3, 8, 8), np.float32)
    y = make_session(model, device="cpu").run(None, {"x": ones})[0]
    assert (y.max((2, 3)) == y.min((2, 3))).all()  # whole channels kept (x2) or dropped
    assert set(np.unique(y)) == {0.0, 2.0}
    assert abs((y[:, :, 0, 0] == 0).mean() - 0.5) < 0.05  # 1,200 draws: 3.5 standard deviations


def test_simulated_dropout_of_old_opsets_reads_the_ratio_attribute():
    g = GraphBuilder(opset=11)
    model = g.build(g.dropout("x", 0.25, "d", form="attribute"))
    graph = working_graph(model)
    simulate_dropouts(graph, opset=11, dtypes={})
    y = make_session(to_model(graph, model), device="cpu").run(None, {"x": X})[0]
    assert abs(np.mean(y == 0) - 0.25) < 0.03
    np.testing.assert_allclose(y[y != 0], X[y != 0] / 0.75, rtol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_insert_dropouts_at_a_named_tensor(training):
    g = GraphBuilder()
    h = g.node("Relu", ["x"], "relu")
    model = g.build(g.node("Identity", [h], "out"))
    with_dropout = insert_dropouts(model, {"relu_out": 0.5}, training=training)
    assert [n.op_type for n in with_dropout.graph.node] == ["Relu", "Dropout", "Identity"]
    y, reference = outputs(with_dropout), np.maximum(X, 0)
    if training:
        assert 0.3 < np.mean(y[reference > 0] == 0) < 0.7
    else:
        np.testing.assert_array_equal(y, reference)


def test_the_cuda_provider_keeps_its_draws_in_the_graph():
    """Fed draws are for onnxruntime's CPU provider (``cpu``); elsewhere RandomUniformLike stays (on the GPU)."""
    model = cnn_with_sites()
    for cpu, fed in ((True, True), (False, False)):
        work, _ = instrument_batch(model, ["bn_direct", "bn_weight"], dropout_active=True, cpu=cpu)
        assert any(i.name.startswith(RANDOM_PREFIX) for i in work.graph.input) == fed
        assert any(n.op_type == "RandomUniformLike" for n in work.graph.node) != fed
