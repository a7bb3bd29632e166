"""Networks of the size users deploy (vsonnx.nets.imagenet, after torchvision's architectures): the same
parameter counts as torchvision, both exporters keep the expected sites, and fix runs on them. One small
case runs always; the 224 x 224 cases are marked heavy (python -m pytest -m heavy)."""
import numpy as np
import onnx
import pytest
import torch

import vsonnx
from vsonnx.nets.imagenet import IMAGENET_ARCHITECTURES, IMAGENET_SITES, build_imagenet
from vsonnx.sites import find_sites

TORCHVISION_PARAMETERS = {"resnet50": 25_557_032, "mobilenet_v2": 3_504_872, "efficientnet_b0": 5_288_548,
                          "densenet121": 7_978_856}  # torchvision's published models


@pytest.mark.parametrize("arch", sorted(IMAGENET_ARCHITECTURES))
def test_parameter_counts_equal_torchvision(arch):
    assert sum(p.numel() for p in build_imagenet(arch).parameters()) == TORCHVISION_PARAMETERS[arch]


def export_and_fix(tmp_path, arch: str, exporter: str, size: int, samples: int, methods=("batch",)):
    torch.manual_seed(0)
    net = build_imagenet(arch, num_classes=10)
    path = tmp_path / f"{arch}.{exporter}.onnx"
    vsonnx.export(net, torch.randn(2, 3, size, size), path, exporter=exporter)  # checks ORT == PyTorch to 1e-4
    report = find_sites(onnx.load(str(path)))
    assert len(report.sites) == IMAGENET_SITES[arch]
    x = np.random.default_rng(0).standard_normal((samples, 3, size, size)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    for method in methods:
        fixed = vsonnx.fix(path, tmp_path / "x.npy", method=method, batch_size=8, output=tmp_path / f"{method}.onnx")
        assert fixed.written and len(fixed.batchnorms) >= IMAGENET_SITES[arch], method


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_small_mobilenet_v2_exports_both_ways_and_fixes(tmp_path, exporter):
    export_and_fix(tmp_path, "mobilenet_v2", exporter, size=32, samples=16, methods=("batch", "population"))
    assert_population_is_pytorchs_fixed_point(tmp_path, "mobilenet_v2", tmp_path / "population.onnx",
                                              tmp_path / f"mobilenet_v2.{exporter}.onnx")


def assert_population_is_pytorchs_fixed_point(tmp_path, arch, fixed_path, original_path):
    """The population fix's statistics loaded into the PyTorch net (BNs matched in execution order, dropout
    off): every BN it rewrote (the sites and what is downstream of them) has an input, as PyTorch computes
    it, with exactly the stored mean and (biased) variance over all the calibration samples. That fixed
    point is what exact inference statistics are."""
    from onnx import numpy_helper

    from vsonnx.graph import GraphIndex

    torch.manual_seed(0)
    net = build_imagenet(arch, num_classes=10).eval()
    def statistics(path):
        index = GraphIndex(onnx.load(str(path)))
        return [tuple(numpy_helper.to_array(index.initializers[index.initializer_behind(n.input[k])]) for k in (3, 4))
                for n in index.topological_order if n.op_type == "BatchNormalization"]

    stored, original = statistics(fixed_path), statistics(original_path)
    rewritten = [k for k, (a, b) in enumerate(zip(stored, original)) if not np.array_equal(a[1], b[1])]
    assert len(rewritten) >= IMAGENET_SITES[arch]
    order, moments = [], {}

    def hook(module, inputs, output):
        x = inputs[0].double()
        axes = [0] + list(range(2, x.dim()))
        moments[id(module)] = (x.mean(axes).numpy(), x.var(axes, unbiased=False).numpy())
        if id(module) not in [id(m) for m in order]:
            order.append(module)

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x = torch.from_numpy(np.load(tmp_path / "x.npy"))
    with torch.no_grad():
        net(x)  # the execution order
        assert [len(m.running_mean) for m in order] == [len(mean) for mean, _ in stored]
        for module, (mean, var) in zip(order, stored):
            module.running_mean.copy_(torch.from_numpy(mean))
            module.running_var.copy_(torch.from_numpy(var))
        net(x)  # every BN's input with the fixed statistics upstream
    for h in handles:
        h.remove()
    for k in rewritten:
        (mean, var), (got_mean, got_var) = stored[k], moments[id(order[k])]
        np.testing.assert_allclose(mean, got_mean, rtol=2e-3, atol=2e-4 * np.sqrt(got_var.max()), err_msg=f"BN {k}")
        np.testing.assert_allclose(var, got_var, rtol=2e-3, atol=1e-6, err_msg=f"BN {k}")


def test_small_efficientnet_b0_from_the_default_exporter_fixes(tmp_path):
    """torch's default exporter computes the squeeze-excitation's ReduceMean axes from constants (a Reshape)
    and writes the shapes as value_info only: the working copies fold such nodes, else every BN after the
    first squeeze-excitation has an unknown rank and the fix is refused (found by tools/bench_nets.py)."""
    export_and_fix(tmp_path, "efficientnet_b0", "dynamo", size=32, samples=16)


@pytest.mark.heavy
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("arch", sorted(IMAGENET_ARCHITECTURES))
def test_224_networks_export_both_ways_and_fix_with_every_method(tmp_path, arch, exporter):
    export_and_fix(tmp_path, arch, exporter, size=224, samples=32, methods=("batch", "population", "relative"))
