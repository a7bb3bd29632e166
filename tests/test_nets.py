import numpy as np
import onnxruntime as ort
import pytest
import torch

import vsonnx
from vsonnx.nets import PLACEMENTS, DropoutConfig, StochasticDepth, Uout, build

SMALL = {
    "preresnet": dict(depth=8),
    "wrn": dict(depth=10, widen=1),
    "resnext": dict(depth=11, cardinality=2, base_width=2),
    "densenet": dict(depth=10, growth=4),
}


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", sorted(SMALL))
def test_every_architecture_and_placement_trains_and_exports(tmp_path, arch, placement):
    torch.manual_seed(0)
    if placement == "depth" and arch not in ("preresnet", "wrn"):  # stochastic depth needs residual branches
        with pytest.raises(ValueError, match="stochastic depth"):
            build(arch, num_classes=3, dropout=DropoutConfig(placement, 0.5), **SMALL[arch])
        return
    net = build(arch, num_classes=3, dropout=DropoutConfig(placement, 0.5), **SMALL[arch])
    x = torch.randn(4, 3, 16, 16)
    net.train()
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    path = tmp_path / "m.onnx"
    vsonnx.export(net, x, path, exporter="torchscript")
    xs = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(xs)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": xs})[0]
    assert np.abs(got - expected).max() <= 1e-4
    report = vsonnx.scan(path)
    n_drop = sum(isinstance(m, torch.nn.Dropout | StochasticDepth) for m in net.modules())
    assert len(report.dropouts) == n_drop
    assert bool(report.sites) == (placement in ("a", "b", "depth"))


def test_uout_noise_is_identity_in_eval_and_scaled_in_train():
    torch.manual_seed(0)
    layer = Uout(0.5)
    x = torch.ones(10000)
    assert torch.equal(layer.eval()(x), x)
    y = layer.train()(x)
    assert y.min() >= 0.5 and y.max() <= 1.5
    assert y.var().item() == pytest.approx(0.25 / 3, rel=0.05)  # Var(r) = beta^2 / 3


def test_bad_configs_raise():
    with pytest.raises(ValueError):
        DropoutConfig("c", 0.5)
    with pytest.raises(ValueError):
        build("preresnet", depth=21)
