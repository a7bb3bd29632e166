"""Statistic taps (vsonnx.taps) and the moments pass (vsonnx.runtime.measure_moments): moments and batch
statistics equal to numpy."""
import numpy as np
import onnx
import pytest

from vsonnx.data import ArraySource
from vsonnx.graph import GraphIndex, tensor_shapes
from vsonnx.runtime import make_session, measure_moments
from vsonnx.taps import bn_tap, instrument_batch
from vsonnx.working_copy import working_copy

from conftest import GraphBuilder
from test_simulate import X


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
