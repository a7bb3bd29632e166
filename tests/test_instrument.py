"""Working copies (onnx-graphsurgeon edits): dropout really off, dropout really simulated, statistic taps
equal to numpy moments, named dropout insertion, BN levels, what a round trip keeps."""
import numpy as np
import onnx
import pytest

from vsonnx.data import ArraySource
from vsonnx.instrument import (bn_levels, bn_tap, insert_dropouts, instrument_batch, measure_moments,
                               simulate_dropouts, to_model, working_copy, working_graph)
from vsonnx.graph import GraphIndex, tensor_shapes
from vsonnx.model import get_metadata, set_metadata
from vsonnx.random_feeds import RANDOM_PREFIX
from vsonnx.runtime import make_session

from conftest import GraphBuilder, cnn_with_sites

X = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32) + 1.0


def outputs(model, x=X):
    session = make_session(model, device="cpu", optimize=False)  # optimisations would remove Dropout
    return session.run(None, {"x": x})[0]


def dropout_model(training: bool):
    g = GraphBuilder()
    r, t = g.init("r", np.array(0.5, np.float32)), g.init("t", np.array(training))
    return g.build(g.node("Dropout", ["x", r, t], "d"))


def test_working_copy_switches_dropout_off():
    model = dropout_model(training=True)
    assert not np.array_equal(outputs(model), X)  # the model as given drops values
    np.testing.assert_array_equal(outputs(working_copy(model)), X)


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


def test_tap_moments_equal_numpy():
    """A BN right behind a dropout: with dropout off its input is x itself, so the tap measures x."""
    g = GraphBuilder()
    model = g.build(g.bn(g.dropout("x", 0.5, "d"), 3, "bn"))
    index = GraphIndex(model)
    tap = bn_tap(index, index.by_name["bn"], tensor_shapes(working_copy(model)))
    moments, samples, batches, _ = measure_moments(model, ArraySource.from_arrays(model, X, None, shuffle=False),
                                                   {"bn": tap}, batch_size=5, device="cpu")
    assert (samples, batches) == (16, 4)
    flat = X.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(moments["bn"].mean, flat.mean(1), rtol=1e-6)
    np.testing.assert_allclose(moments["bn"].var, flat.var(1), rtol=1e-5)


@pytest.mark.parametrize("opset", [17, 13])
@pytest.mark.parametrize("spatial", ["static", "dynamic"])
def test_batch_statistics_equal_numpy_from_the_native_bn_and_from_the_graph(opset, spatial):
    """A batch pass reports each batch's mean and biased variance per channel, whether onnxruntime's BN in
    training mode computes them (CPU, one thread, opset >= 14) or operators in the graph do (older opsets,
    more threads, other providers), for a 4-D BN (static or unknown spatial size) and a 2-D one, also for a
    batch of one sample; and the BNs normalise with them (the graph output equals numpy's batch
    normalisation)."""
    g = GraphBuilder(opset=opset)
    conv = g.bn(g.conv("x", 3, 4), 4, "bn4", epsilon=1e-3)
    flat = g.node("Flatten", [g.node("GlobalAveragePool", [conv], "gap")], "flat")
    model = g.build(g.bn(flat, 4, "bn2"), input_shape=("N", 3, 8, 8) if spatial == "static" else ("N", 3, "H", "W"))
    init = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    conv = make_session(model_output(model, "conv1_out"), device="cpu")
    expected = {}  # per batch: {bn: (values per channel, mean, var)} and the normalised output, numpy float64
    for x in (X[:5], X[:1]):
        stats, h = {}, conv.run(None, {"x": x})[0].astype(np.float64)
        for name, axes in (("bn4", (0, 2, 3)), ("bn2", (0,))):
            mean, var = h.mean(axes), h.var(axes)
            stats[name] = (len(x) * (64 if name == "bn4" else 1), mean, var)
            shape = (1, -1, 1, 1) if name == "bn4" else (1, -1)
            eps = 1e-3 if name == "bn4" else 1e-5
            h = (h - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * init[f"{name}_scale"].reshape(shape) \
                + init[f"{name}_bias"].reshape(shape)
            if name == "bn4":
                h = h.mean((2, 3))
        expected[len(x)] = (stats, h)
    for cpu, threads in ((True, 1), (True, 2), (False, 1)):
        work, outputs = instrument_batch(model, ["bn4", "bn2"], cpu=cpu, threads=threads)
        training_mode = [n for n in work.graph.node if n.op_type == "BatchNormalization"]
        assert len(training_mode) == (2 if cpu and threads == 1 and opset >= 14 else 0)
        session = make_session(work, device="cpu", threads=threads)
        fetch = [o.name for o in session.get_outputs()]
        for x in (X[:5], X[:1]):
            got = dict(zip(fetch, session.run(fetch, {"x": x})))
            stats, h = expected[len(x)]
            for name, (count, mean, var) in stats.items():
                got_count, got_mean, got_var = outputs[name].batch(got, len(x))
                assert got_count == count
                np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(got_var, var, rtol=1e-4, atol=1e-6)
            if len(x) > 1:
                np.testing.assert_allclose(got[model.graph.output[0].name], h, rtol=1e-3, atol=1e-4)


def model_output(model, tensor: str):
    """A copy of ``model`` whose only output is ``tensor``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    copy.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    return copy


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


def test_levels_count_recalibrated_bns_upstream():
    model = cnn_with_sites()
    assert bn_levels(model, ["bn_direct", "bn_weight"]) == {"bn_direct": 0, "bn_weight": 1}
    assert bn_levels(model, ["bn_weight"]) == {"bn_weight": 0}


def test_round_trip_keeps_opsets_and_model_metadata():
    model = cnn_with_sites()
    set_metadata(model, {"vsonnx.preprocess": "{}"})
    copy = working_copy(model)
    assert get_metadata(copy) == {"vsonnx.preprocess": "{}"}
    assert list(copy.opset_import) == list(model.opset_import)
    assert copy.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "vsonnx_batch"
    np.testing.assert_allclose(outputs(copy), outputs(model), rtol=1e-6)


def test_the_cuda_provider_keeps_its_draws_in_the_graph():
    """Fed draws are for onnxruntime's CPU provider (``cpu``); elsewhere RandomUniformLike stays (on the GPU)."""
    model = cnn_with_sites()
    for cpu, fed in ((True, True), (False, False)):
        work, _ = instrument_batch(model, ["bn_direct", "bn_weight"], dropout_active=True, cpu=cpu)
        assert any(i.name.startswith(RANDOM_PREFIX) for i in work.graph.input) == fed
        assert any(n.op_type == "RandomUniformLike" for n in work.graph.node) != fed


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
    bn_levels(model, ["bn"])
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
