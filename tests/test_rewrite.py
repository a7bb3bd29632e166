"""The rewrite pass (find -> check -> apply): refusals by number, shared initializers, idempotence,
folded-layer corrections against numpy, and scan showing what fix would do."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from vsonnx.graph import GraphIndex
from vsonnx.sites import find_sites
from vsonnx.stats import BnStatistics
from vsonnx.rewrite import RecalibrateBatchNorm, refusal

from conftest import GraphBuilder


def initializer(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def test_shared_initializer_is_copied_and_apply_is_idempotent():
    g = GraphBuilder()
    h = g.dropout("x", 0.5, "d")
    h = g.bn(h, 3, "bn1")
    out = g.node("BatchNormalization", [h, "bn1_scale", "bn1_bias", "bn1_mean", "bn1_var"], "bn2")
    model = g.build(out)
    stats = BnStatistics("bn1", np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0]), 10)
    original = initializer(model, "bn1_mean").copy()
    rewrite = RecalibrateBatchNorm(model)
    assert rewrite.apply("bn1", stats) is True
    index = GraphIndex(model)
    bn1, bn2 = (next(n for n in model.graph.node if n.name == k) for k in ("bn1", "bn2"))
    assert bn2.input[3] == "bn1_mean" and bn1.input[3] != "bn1_mean"  # bn1 got its own copy
    np.testing.assert_array_equal(index.constant("bn1_mean"), original)  # the shared one is untouched
    np.testing.assert_array_equal(index.constant(bn1.input[3]), stats.mean.astype(np.float32))
    np.testing.assert_array_equal(index.constant(bn1.input[4]), stats.var.astype(np.float32))
    assert rewrite.apply("bn1", stats) is False


@pytest.mark.parametrize("case,reason", [("computed", "1:"), ("training", "2:")])
def test_refusals(case, reason):
    g = GraphBuilder()
    h = g.dropout("x", 0.5, "d")
    if case == "computed":  # the running mean depends on the data
        scale = g.init("s", np.ones(3, np.float32))
        bias = g.init("b", np.zeros(3, np.float32))
        mean = g.node("ReduceMean", ["x"], "mc", axes=[0, 2, 3], keepdims=0)
        var = g.init("v", np.ones(3, np.float32))
        out = g.node("BatchNormalization", [h, scale, bias, mean, var], "bn")
    else:
        out = g.bn(h, 3, "bn", training_mode=1)
    model = g.build(out)
    info = find_sites(model).batchnorms[0]
    node = next(n for n in model.graph.node if n.name == "bn")
    assert refusal(GraphIndex(model), node, info).startswith(reason)



def test_scan_shows_the_refusal_fix_would_make():
    """What scan reports per BN is exactly what the rewrite pass checks (plan = find + check)."""
    from vsonnx.measure import scan
    from vsonnx.rewrite import plan

    g = GraphBuilder()
    h = g.bn(g.dropout("x", 0.5, "d"), 3, "bn_ok")
    h = g.bn(h, 3, "bn_broken", var=[1.0, np.inf, 1.0])
    model = g.build(h)
    decisions = {d.name: d.refusal for d in plan(model, find_sites(model), "sites")}
    assert decisions["bn_ok"] is None and decisions["bn_broken"].startswith("4:")
    rows = {b.name: b.fix for b in scan(model).batchnorms}
    assert rows == {"bn_ok": "recalibrate", "bn_broken": f"refused: {decisions['bn_broken']}"}
    g = GraphBuilder()  # a BN in training mode: refused by the pass, which fix runs after inference_form
    model = g.build(g.bn(g.dropout("x", 0.5, "d"), 3, "bn_train", training_mode=1))
    assert plan(model, find_sites(model), "sites")[0].refusal.startswith("2:")
    assert scan(model).batchnorms[0].fix == "recalibrate"


def test_refusal_3_when_no_statistics_were_measured():
    g = GraphBuilder()
    model = g.build(g.bn(g.dropout("x", 0.5, "d"), 3, "bn"))
    info = find_sites(model).batchnorms[0]
    assert refusal(GraphIndex(model), model.graph.node[-1], info, stats={}).startswith("3:")
    with pytest.raises(Exception, match="refusal 3"):
        RecalibrateBatchNorm(model).apply("bn", None)


def test_affine_correction_of_a_folded_conv_matches_numpy():
    from vsonnx.rewrite import apply_affine
    from vsonnx.runtime import make_session

    g = GraphBuilder()
    conv = g.conv("x", 3, 4, name="conv")
    model = g.build(conv)
    model.graph.node[0].input.append(g.init("conv_b", np.array([0.1, -0.2, 0.3, 0.0], np.float32)))
    model.graph.initializer.append(g.inits[-1])
    a, b = np.array([0.5, 2.0, 1.0, 1.5]), np.array([1.0, 0.0, -1.0, 0.25])
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)

    def run(m):
        return make_session(m, device="cpu", optimize=False).run(None, {"x": x})[0]

    expected = run(model) * a.reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1)
    np.testing.assert_allclose(run(apply_affine(model, {"conv": (a, b)})), expected, rtol=1e-5, atol=1e-5)
    relu = GraphBuilder()
    relu_model = relu.build(relu.node("Relu", ["x"], "r"))
    with pytest.raises(Exception, match="only Conv and Gemm"):
        apply_affine(relu_model, {"r": (a, b)})


def assert_rewritten_like_numpy(model):
    """The BN 'bn' (identity scale, zero bias) is not refused, takes new statistics, and onnxruntime then
    normalises with them as numpy does."""
    from vsonnx.runtime import make_session

    bn = GraphIndex(model).by_name["bn"]
    assert refusal(GraphIndex(model), bn, find_sites(model).batchnorms[0]) is None
    stats = BnStatistics("bn", np.array([1.0, 2.0, 3.0]), np.array([4.0, 1.0, 0.25]), 10)
    assert RecalibrateBatchNorm(model).apply("bn", stats)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    y = make_session(model, device="cpu", optimize=False).run(None, {"x": x})[0]
    expected = (x - stats.mean.reshape(1, 3, 1, 1)) / np.sqrt(stats.var.reshape(1, 3, 1, 1) + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_statistics_routed_through_identity_nodes_are_followed():
    """Legacy exports feed BN its running statistics through Identity nodes: rewritten, not a KeyError."""
    g = GraphBuilder()
    h = g.dropout("x", 0.5, "d")
    mean = g.node("Identity", [g.init("m", np.zeros(3, np.float32))], "id_m")
    var = g.node("Identity", [g.init("v", np.ones(3, np.float32))], "id_v")
    out = g.node("BatchNormalization", [h, g.init("s", np.ones(3, np.float32)), g.init("b", np.zeros(3, np.float32)),
                                        mean, var], "bn")
    assert_rewritten_like_numpy(g.build(out))


def test_statistics_from_constant_subgraphs_are_folded_into_initializers():
    """Old Model Zoo exports build BN statistics with ConstantOfShape: constants, so recalibrated, the written
    model holding them as initializers of the BN."""
    from onnx import TensorProto, helper

    g = GraphBuilder()
    h = g.dropout("x", 0.5, "d")
    shape = g.init("shape", np.array([3], np.int64))
    fill = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    mean = g.node("ConstantOfShape", [shape], "zeros", value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))
    var = g.node("ConstantOfShape", [shape], "ones", value=fill)
    out = g.node("BatchNormalization", [h, g.init("s", np.ones(3, np.float32)), g.init("b", np.zeros(3, np.float32)),
                                        mean, var], "bn")
    model = g.build(out)
    np.testing.assert_array_equal(GraphIndex(model).constant(var), np.ones(3, np.float32))
    assert_rewritten_like_numpy(model)
    assert {model.graph.node[-1].input[3], model.graph.node[-1].input[4]} <= {t.name for t in model.graph.initializer}


def test_training_mode_exports_are_fixed_in_inference_form(tmp_path):
    """A TorchScript export with TrainingMode.TRAINING (BN training_mode=1 with running-statistic outputs,
    Dropout training_mode=true): fix switches it to inference form, then gives the same statistics as the
    fix of the eval-mode export of the same weights."""
    import warnings

    import torch

    import vsonnx
    from vsonnx.model import load_model
    from vsonnx.rewrite import inference_form

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Dropout(0.5), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    net.train()
    with torch.no_grad():
        for _ in range(5):
            net(torch.randn(32, 3, 8, 8) + 0.5)
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(tmp_path / "train.onnx"), dynamo=False, input_names=["input"],
                          training=torch.onnx.TrainingMode.TRAINING, dynamic_axes={"input": {0: "n"}})
    vsonnx.export(net, x, tmp_path / "eval.onnx", exporter="torchscript")
    trained = load_model(tmp_path / "train.onnx")
    assert any(len(n.output) == 3 for n in trained.graph.node if n.op_type == "BatchNormalization")
    scanned = vsonnx.scan(trained)
    assert all(b.fix == "recalibrate" for b in scanned.batchnorms if b.site)
    assert any("fix first switches it" in w for w in scanned.warnings)
    converted, notes = inference_form(trained)
    assert notes and all(len(n.output) == 1 for n in converted.graph.node if n.op_type == "BatchNormalization")
    assert inference_form(converted)[1] == []  # already in inference form: nothing to do
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32))
    a = vsonnx.fix(tmp_path / "train.onnx", tmp_path / "x.npy", output=tmp_path / "a.onnx", method="population")
    b = vsonnx.fix(tmp_path / "eval.onnx", tmp_path / "x.npy", output=tmp_path / "b.onnx", method="population")
    assert any("training-mode export" in w for w in a.warnings)
    rows_a, rows_b = ({r["name"]: r["new_var"] for r in r.batchnorms} for r in (a, b))
    assert rows_a.keys() == rows_b.keys()
    for name in rows_a:
        np.testing.assert_allclose(rows_a[name], rows_b[name], rtol=1e-5)


def test_a_graph_reading_running_statistic_outputs_is_refused():
    import onnx

    from vsonnx.errors import VsonnxError
    from vsonnx.rewrite import inference_form

    g = GraphBuilder()
    h = g.bn(g.dropout("x", 0.5, "d"), 3, "bn", training_mode=1)
    model = g.build(h)
    bn = model.graph.node[-1]
    bn.output.extend(["running_mean_out", "running_var_out"])
    model.graph.output.append(onnx.helper.make_tensor_value_info("running_mean_out", onnx.TensorProto.FLOAT, None))
    with pytest.raises(VsonnxError, match="reads its running statistics"):
        inference_form(model)


@pytest.mark.parametrize("bias_shape,beta,trans_b", [((5,), 0.5, 1), ((1, 5), 1.0, 1), ((1, 5), 0.25, 0), ((), 2.0, 1),
                                                     (None, 0.5, 1)])
def test_apply_affine_on_a_gemm_is_a_times_its_output_plus_b(bias_shape, beta, trans_b):
    """Gemm y = alpha A B + beta C with C a scalar, [N] or [1, N] (or absent): the corrected layer computes
    a * y + b (numpy reference through onnxruntime with optimisations off); beta used to be ignored."""
    from onnx import helper, numpy_helper

    from vsonnx.rewrite import apply_affine
    from vsonnx.runtime import make_session

    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3) if trans_b else (3, 5)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if bias_shape is not None:
        inits.append(numpy_helper.from_array(rng.standard_normal(bias_shape).astype(np.float32), "c"))
        inputs.append("c")
    node = helper.make_node("Gemm", inputs, ["y"], name="fc", transB=trans_b, beta=beta, alpha=1.5)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    y = make_session(model, device="cpu", optimize=False).run(None, {"x": x})[0]
    a, b = rng.uniform(0.5, 2, 5), rng.standard_normal(5)
    fixed = apply_affine(model, {"fc": (a, b)})
    got = make_session(fixed, device="cpu", optimize=False).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, a * y + b, rtol=1e-5, atol=1e-5)


def test_apply_affine_refuses_a_per_row_gemm_bias():
    from onnx import helper, numpy_helper

    from vsonnx.errors import VsonnxError
    from vsonnx.rewrite import apply_affine

    inits = [numpy_helper.from_array(np.ones((5, 3), np.float32), "w"), numpy_helper.from_array(np.ones((4, 5), np.float32), "c")]
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", transB=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(VsonnxError, match="not one constant per output channel"):
        apply_affine(model, {"fc": (np.ones(5), np.zeros(5))})


def test_channel_bias_is_what_conv_and_gemm_add_per_channel():
    from vsonnx.graph import channel_bias

    np.testing.assert_array_equal(channel_bias("Gemm", np.array([[1.0, 2.0]]), 2, beta=0.5), [0.5, 1.0])
    np.testing.assert_array_equal(channel_bias("Conv", np.array([1.0, 2.0]), 2, beta=0.5), [1.0, 2.0])
    np.testing.assert_array_equal(channel_bias("Gemm", np.array(3.0), 2), [3.0, 3.0])
    np.testing.assert_array_equal(channel_bias("Gemm", None, 2), [0.0, 0.0])
    assert channel_bias("Gemm", np.ones((3, 2)), 2) is None and channel_bias("Gemm", np.ones(3), 2) is None
