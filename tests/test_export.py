import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import vsonnx
from vsonnx.graph import GraphIndex
from vsonnx.model import get_metadata
from vsonnx.nets import DropoutConfig, PreActResNet
from vsonnx.sites import find_sites

from nets_small import trained_like


def ort_run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


@pytest.mark.parametrize("placement,kind", [("a", "direct"), ("b", "merge")])
def test_round_trip_keeps_dropout_and_bn(tmp_path, placement, kind):
    torch.manual_seed(0)
    net = PreActResNet(8, 10, DropoutConfig(placement, 0.4)).train()
    path = tmp_path / "net.onnx"
    vsonnx.export(net, torch.randn(2, 3, 16, 16), path, preprocess={"mean": [0.5] * 3, "std": [0.2] * 3},
                  class_names=[str(i) for i in range(10)])
    assert net.training  # the caller's module keeps its mode
    model = onnx.load(str(path))
    index = GraphIndex(model)
    drops = [n for n in model.graph.node if n.op_type == "Dropout"]
    assert len(drops) == 3
    for d in drops:
        assert index.constant(d.input[1]) == pytest.approx(0.4)
        assert bool(index.constant(d.input[2])) is False
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == n_bn
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)  # another batch size
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(ort_run(path, x) - expected).max() <= 1e-4
    report = find_sites(model)
    sites = [b for b in report.batchnorms if b.site]
    assert len(sites) == 3 and {b.path for b in sites} == {kind}
    meta = get_metadata(model)
    assert json.loads(meta["vsonnx.preprocess"])["mean"] == [0.5] * 3
    assert len(json.loads(meta["vsonnx.class_names"])) == 10
    assert "dynamo" in meta["vsonnx.producer"]  # the default, as PyTorch recommends


def test_channelwise_dropout_is_marked(tmp_path):
    net = trained_like()
    vsonnx.export(net, torch.randn(2, 3, 8, 8), tmp_path / "n.onnx", exporter="torchscript")
    records = json.loads(get_metadata(onnx.load(str(tmp_path / "n.onnx")))["vsonnx.dropouts"])
    kinds = {r["module"]: (r["kind"], r["channelwise"]) for r in records}
    assert kinds["drop_c"] == ("dropout2d", True) and kinds["drop_a"] == ("dropout", False)


def test_stock_torch_export_erases_the_evidence(tmp_path):
    """Why vsonnx.export exists: torch.onnx.export in eval mode drops Dropout; scan says so."""
    net = trained_like()
    path = tmp_path / "stock.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), str(path), dynamo=False)
    report = find_sites(onnx.load(str(path)))
    assert not any(n.op_type == "Dropout" for n in onnx.load(str(path)).graph.node)
    assert any("vsonnx.export" in w for w in report.warnings)


@pytest.mark.parametrize("arch,options", [
    ("preresnet", dict(depth=8)),
    pytest.param("densenet", dict(depth=10, growth=4), marks=pytest.mark.slow),
    pytest.param("resnext", dict(depth=11, cardinality=2, base_width=4), marks=pytest.mark.slow),
    pytest.param("wrn", dict(depth=10, widen=1), marks=pytest.mark.slow),
])
def test_dynamo_export_keeps_the_same_sites(tmp_path, arch, options):
    """exporter='dynamo' (torch's default exporter, unoptimised, Dropout as a translated custom op): onnxruntime
    reproduces PyTorch to 1e-4 (checked inside export) and the sites equal the TorchScript export's."""
    pytest.importorskip("onnxscript")
    from vsonnx.nets import build

    torch.manual_seed(0)
    net = build(arch, num_classes=3, dropout=DropoutConfig("a", 0.5), **options).train()
    with torch.no_grad():
        net(torch.randn(16, 3, 16, 16))
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    script = vsonnx.export(net, x, tmp_path / "ts.onnx", exporter="torchscript")
    dynamo = vsonnx.export(net, x, tmp_path / "dy.onnx", exporter="dynamo")
    a, b = find_sites(script), find_sites(dynamo)
    assert len(b.sites) == len(a.sites) > 0 and len(b.batchnorms) == len(a.batchnorms)
    assert sorted(s.path for s in b.sites) == sorted(s.path for s in a.sites)
    assert [d.ratio for d in b.dropouts] == [d.ratio for d in a.dropouts]
    assert "dynamo" in get_metadata(dynamo)["vsonnx.producer"]
    # the torch interpreter that distill and the synthesis run on reads this export too (Shape(weight, end=1)
    # feeding a zero conv bias, CastLike, Expand) and equals PyTorch
    from vsonnx.torch_graph import TorchGraph

    got = TorchGraph(dynamo)({"input": x})
    np.testing.assert_allclose(next(iter(got.values())).detach().numpy(), net(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(vsonnx.VsonnxError, match="unknown exporter"):
        vsonnx.export(net, x, tmp_path / "x.onnx", exporter="jit")


def test_large_outputs_are_verified_relative_to_their_scale(tmp_path):
    """An untrained deep net can output 1e6 and more: float32 rounding then differs by more than 1e-4 in
    absolute terms without any export error (PreResNet-164 at random init: 4.4 at 5.6e6); the check scales."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Dropout(0.5), torch.nn.BatchNorm2d(8),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10)).eval()
    with torch.no_grad():
        net[-1].weight.mul_(3e6)
    x = torch.randn(2, 3, 8, 8)
    assert net(x).abs().max() > 1e6
    vsonnx.export(net, x, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, net(x).detach().numpy(), rtol=1e-4, atol=1e-4 * float(net(x).abs().max()))
