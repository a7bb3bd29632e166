"""Data-free correction from synthetic inputs: the torch interpreter against onnxruntime (optimisations off)
and PyTorch's own train-mode BN; the synthesis against the re-estimation on the data the statistics came from."""
import json
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper

import vsonnx
from vsonnx.cli import main
from vsonnx.errors import VsonnxError
from vsonnx.rewrite import targets
from vsonnx.runtime import make_session
from vsonnx.sites import find_sites
from vsonnx.methods.synthesized import synthetic_statistics
from vsonnx.torch_graph import TorchGraph

from conftest import GraphBuilder, save
from nets_small import module_name, trained_like


def ort_outputs(model, feeds):
    session = make_session(model, device="cpu", optimize=False)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def many_ops_model() -> onnx.ModelProto:
    g = GraphBuilder(seed=1)
    a = g.conv("x", 3, 4, name="c1")
    a = g.node("Pad", [a, g.init("pads", np.array([0, 0, 1, 0, 0, 0, 0, 1], np.int64))])
    a = g.node("MaxPool", [a], kernel_shape=[2, 2], strides=[1, 1])
    b = g.node("Clip", [g.bn(a, 4, "bn"), g.init("lo", np.float32(0)), g.init("hi", np.float32(6))])
    b = g.node("AveragePool", [b], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    c = g.node("Concat", [b, g.node("Sigmoid", [b])], axis=1)
    c = g.node("Mul", [g.node("LeakyRelu", [c], alpha=0.2), g.node("HardSigmoid", [c])])
    shape = g.node("Shape", [c])
    batch = g.node("Gather", [shape, g.init("zero", np.array(0, np.int64))], axis=0)
    flat = g.node("Reshape", [c, g.node("Concat", [g.node("Unsqueeze", [batch, g.init("ax", np.array([0], np.int64))]),
                                                   g.init("m1", np.array([-1], np.int64))], axis=0)])
    h = g.node("Flatten", [g.node("GlobalAveragePool", [c])])
    out = g.node("Add", [g.gemm(h, 8, 5), g.node("ReduceMean", [flat], axes=[1], keepdims=1)])
    return g.build(g.node("Softmax", [out], axis=1))


def test_torch_graph_matches_onnxruntime_on_many_ops():
    model = many_ops_model()
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    expected = ort_outputs(model, {"x": x})
    got = TorchGraph(model)({"x": torch.from_numpy(x)})
    for name, value in expected.items():  # same float32 ops, different summation order: a few ulps
        np.testing.assert_allclose(got[name].detach().numpy(), value, rtol=1e-5, atol=1e-6)


def test_torch_graph_train_regime_matches_pytorch(tmp_path):
    """batch_norm='batch' is PyTorch's train-mode BN; dropout=True drops the ratio and keeps the mean."""
    net = trained_like(seed=3)
    path = tmp_path / "net.onnx"
    vsonnx.export(net, torch.randn(2, 3, 8, 8), path, exporter="torchscript")
    model = onnx.load(str(path))
    graph = TorchGraph(model)
    x = torch.randn(64, 3, 8, 8) * 2 + 0.5
    seen = {}
    with torch.no_grad():
        got = graph({"input": x}, batch_norm="batch", observe=lambda n, m, v: seen.setdefault(module_name(n), v))
        net.train()
        for m in net.modules():
            if isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d):
                m.eval()
        inputs = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, k=k: inputs.update({k: i[0]}))  # returns None
                 for k, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)]
        reference = net(x)
        for h in hooks:
            h.remove()
    # float32 batch statistics over 64 x 8 x 8 elements, then 4 layers: 1e-4 relative
    np.testing.assert_allclose(list(got.values())[0].numpy(), reference.numpy(), rtol=1e-4, atol=1e-5)
    for name, x_bn in inputs.items():
        axes = [0] + list(range(2, x_bn.dim()))
        np.testing.assert_allclose(seen[name].numpy(), x_bn.var(axes, unbiased=False).numpy(), rtol=1e-4)
    with torch.no_grad():
        torch.manual_seed(0)
        ones = torch.ones(2000, 6, 8, 8)
        g = GraphBuilder()
        drop = TorchGraph(g.build(g.dropout("x", 0.3, "d"), input_shape=("N", 6, 8, 8)))
        out = list(drop({"x": ones}, dropout=True).values())[0]
        assert (out == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
        assert out.mean().item() == pytest.approx(1.0, abs=0.01)
        per_channel = list(drop({"x": ones}, dropout=True, channelwise=frozenset({"d"})).values())[0]
        assert (per_channel.amax((2, 3)) == per_channel.amin((2, 3))).all()  # whole channels kept or dropped


@pytest.mark.parametrize("shape,channels_last,uses", [
    ((16, 5, 6, 7), False, "all"), ((16, 5, 6, 7), True, "all"), ((32, 4), False, "all"),
    ((16, 5, 6, 7), False, "stats"), ((16, 5, 6, 7), False, "output")])
def test_batch_norm_with_statistics_gradients_match_autograd(shape, channels_last, uses):
    """The fused BN's (y, mean, var) and its hand-written backward against torch autograd through the same maths
    in elementwise ops, in float64, for a loss on every output, on the statistics only, on y only."""
    from vsonnx.torch_graph import _BatchNormWithStatistics

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    scale, bias = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5, torch.randn(c, generator=gen, dtype=torch.float64)
    weights = torch.randn(shape, generator=gen, dtype=torch.float64)

    def loss(y, mean, var):
        terms = {"all": [(y * weights).sum(), (mean ** 2).sum(), var.sqrt().sum()],
                 "stats": [(mean ** 3).sum(), (var * torch.arange(c)).sum()], "output": [(y * weights).sum()]}
        return torch.stack(terms[uses]).sum()

    def reference(x):
        axes = [0] + list(range(2, x.dim()))
        mean, var = x.mean(axes), x.var(axes, unbiased=False)
        view = [1, -1] + [1] * (x.dim() - 2)
        return (x - mean.reshape(view)) / torch.sqrt(var.reshape(view) + 1e-5) * scale.reshape(view) \
            + bias.reshape(view), mean, var

    grads = []
    for fn in (reference, lambda x: _BatchNormWithStatistics.apply(x, scale, bias, 1e-5)):
        x = x0.clone().requires_grad_(True)
        outputs = fn(x)
        loss(*outputs).backward()
        grads.append((outputs, x.grad))
    for want, got in zip(grads[0][0], grads[1][0]):
        np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(grads[1][1].numpy(), grads[0][1].numpy(), rtol=1e-8, atol=1e-10)


def test_dropout_masks_follow_torch_seed_and_are_fresh_each_run(tmp_path):
    """The CPU masks come from numpy draws seeded from torch's generator: torch.manual_seed fixes them, every
    run draws new ones, and the synthesis with the same seed gives the same statistics."""
    g = GraphBuilder()
    drop = TorchGraph(g.build(g.dropout("x", 0.5, "d"), input_shape=("N", 4, 8, 8)))
    ones = torch.ones(8, 4, 8, 8)

    def masks():
        return [list(drop({"x": ones}, dropout=True).values())[0] for _ in range(2)]

    torch.manual_seed(5)
    first, second = masks()
    torch.manual_seed(5)
    again, _ = masks()
    assert torch.equal(first, again) and not torch.equal(first, second)
    assert set(first.unique().tolist()) == {0.0, 2.0}
    vsonnx.export(trained_like(seed=0), torch.randn(2, 3, 8, 8), tmp_path / "net.onnx", exporter="torchscript")
    model = onnx.load(str(tmp_path / "net.onnx"))
    names = [b.name for b in targets(find_sites(model).batchnorms, "sites")]
    runs = [synthetic_statistics(model, names, samples=8, steps=3, seed=2, device="cpu") for _ in range(2)]
    for name in names:
        np.testing.assert_array_equal(runs[0].statistics[name].var, runs[1].statistics[name].var)


def test_unsupported_operator_is_a_user_error():
    g = GraphBuilder()
    model = g.build(g.node("Einsum", [g.bn("x", 3, "bn"), "x"], equation="nchw,nchw->nchw"))
    with pytest.raises(VsonnxError, match="Einsum"):
        TorchGraph(model)


def reestimated(net, make_input, dropout_on: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """PyTorch re-estimation (momentum None) on the distribution the statistics were gathered from."""
    net.train()
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d):
            m.train(dropout_on)
        if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for _ in range(20):
            net(make_input())
    net.eval()
    return {k: (m.running_mean.numpy().copy(), m.running_var.numpy().copy()) for k, m in net.named_modules()
            if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)}


def test_synthetic_correction_tracks_the_reestimation_downstream(tmp_path):
    """On a net whose statistics are exact averages over known data with dropout on, the synthetic correction
    changes every BN's variance, downstream ones included, about as re-estimating on that data with dropout
    off does."""
    net = trained_like(seed=0)

    def make_input():
        return torch.randn(32, 3, 8, 8) * 2 + 0.5

    torch.manual_seed(1)
    test_regime = reestimated(net, make_input, dropout_on=False)
    train_regime = reestimated(net, make_input, dropout_on=True)  # what the exported model stores
    path = tmp_path / "net.onnx"
    vsonnx.export(net, torch.randn(2, 3, 8, 8), path, exporter="torchscript")
    model = onnx.load(str(path))
    report = find_sites(model)
    names = [b.name for b in targets(report.batchnorms, "sites")]
    result = synthetic_statistics(model, names, samples=64, steps=150, seed=0, device="cpu",
                                  channelwise=frozenset(d.name for d in report.dropouts if d.channelwise))
    assert result.loss_last < 0.2 * result.loss_first
    errors_synthetic, errors_unchanged = {}, {}
    for name in names:
        key = module_name(name)
        true_log_ratio = np.log(test_regime[key][1] / train_regime[key][1])
        new_log_ratio = np.log(result.statistics[name].var / train_regime[key][1])
        errors_synthetic[key] = float(np.median(np.abs(new_log_ratio - true_log_ratio)))
        errors_unchanged[key] = float(np.median(np.abs(true_log_ratio)))
    # bn1d sees one value per sample and channel (64 in all): over seeds 0-5 its error ratio ranged 0.10-0.20
    # (0.01-0.08 for the 2-D BNs), so it gets a wider bound
    assert all(errors_synthetic[k] < (0.35 if k == "bn1d" else 0.2) * errors_unchanged[k] for k in errors_synthetic), \
        (errors_synthetic, errors_unchanged)


def test_cli_data_free_synthetic_writes_every_bn_in_scope(tmp_path):
    net = trained_like(seed=0)
    path = tmp_path / "net.onnx"
    vsonnx.export(net, torch.randn(2, 3, 8, 8), path, exporter="torchscript")
    before = path.read_bytes()
    r = CliRunner().invoke(main, ["fix", str(path), "--data-free", "--synthetic", "16", "--synthetic-steps", "5",
                                  "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output[r.output.index("{"):])
    assert d["method"] == "data-free (synthetic inputs)" and d["written"]
    report = find_sites(onnx.load(str(path)))
    assert len(d["batchnorms"]) == len(targets(report.batchnorms, "sites"))
    assert all("synthetic" in note and "closed form" in note for note in d["notes"].values())
    assert path.read_bytes() == before
    fixed = onnx.load(d["output"])
    props = {p.key: p.value for p in fixed.metadata_props}
    assert props["vsonnx.method"] == "data-free (synthetic inputs)"
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    assert np.isfinite(ort_outputs(fixed, {"input": x})[fixed.graph.output[0].name]).all()


def test_synthesis_refuses_dynamic_image_size(tmp_path):
    g = GraphBuilder()
    model = g.build(g.bn(g.dropout("x", 0.5, "d"), 3, "bn"), input_shape=("N", 3, "H", "W"))
    with pytest.raises(VsonnxError, match="not static"):
        synthetic_statistics(model, ["bn"], steps=1)


def test_without_torch_the_error_names_the_way_out(tmp_path, monkeypatch):
    g = GraphBuilder()
    path = save(g.build(g.bn(g.dropout("x", 0.5, "d"), 3, "bn")), tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    r = CliRunner().invoke(main, ["fix", path, "--data-free"])
    assert r.exit_code == 3 and "--synthetic 0" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["fix", path, "--data-free", "--synthetic", "0"])
    assert r.exit_code == 0, r.output


def test_ignored_options_are_warned_about(tmp_path):
    g = GraphBuilder()
    path = save(g.build(g.bn(g.dropout("x", 0.5, "d"), 3, "bn")), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    r = CliRunner().invoke(main, ["fix", path, "--calib", str(tmp_path / "x.npy"), "--synthetic", "8"])
    assert r.exit_code == 0 and "--synthetic/--synthetic-steps are ignored without --data-free" in r.output
    r = CliRunner().invoke(main, ["fix", path, "--data-free", "--synthetic", "0", "--method", "population"])
    assert r.exit_code == 0 and "--method is ignored with --data-free" in r.output


def refused_model(kind: str) -> onnx.ModelProto:
    g = GraphBuilder()
    if kind == "subgraph":
        h = g.bn("x", 3, "bn")
        branch = helper.make_graph([helper.make_node("Identity", [h], ["y"])], "b", [],
                                   [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
        return g.build(g.node("If", [g.init("cond", np.array(True))], then_branch=branch, else_branch=branch))
    if kind == "auto_pad":
        w = g.init("w", np.ones((3, 3, 3, 3), np.float32))
        return g.build(g.bn(g.node("Conv", ["x", w], auto_pad="SAME_UPPER"), 3, "bn"))
    if kind == "two inputs":
        model = g.build(g.bn(g.dropout("x", 0.5, "d"), 3, "bn"))
        model.graph.input.append(helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1]))
        return model
    model = g.build(g.bn(g.node("Cast", ["x"], to=onnx.TensorProto.FLOAT), 3, "bn"))
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT64  # "integer input"
    return model


@pytest.mark.parametrize("kind,message", [("subgraph", "operator If"), ("auto_pad", "auto_pad"),
                                          ("two inputs", "one input"), ("integer input", "not a float tensor")])
def test_each_synthesis_refusal_is_a_one_line_error(tmp_path, kind, message):
    path = tmp_path / "m.onnx"
    onnx.save(refused_model(kind), str(path))
    r = CliRunner().invoke(main, ["fix", str(path), "--data-free", "--all"])
    assert r.exit_code == 3 and message in r.output and "Traceback" not in r.output, r.output
