import copy

import numpy as np
import pytest
import torch

import vsonnx
from vsonnx.data import ArraySource, Source
from vsonnx.errors import VsonnxError
from vsonnx.graph import GraphIndex
from vsonnx.methods import EstimateRequest, estimate, population
from vsonnx.model import load_model
from vsonnx.rewrite import targets
from vsonnx.sites import find_sites
from vsonnx.stats import transfer_change

from nets_small import module_name, trained_like


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    net = trained_like()
    path = tmp_path_factory.mktemp("m") / "net.onnx"
    vsonnx.export(net, torch.randn(2, 3, 8, 8), path, exporter="torchscript")
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((96, 3, 8, 8)) * 2 + 0.5).astype(np.float32)
    return net, load_model(path), x


def calibrate(model, source, names, method="batch", **settings):
    return estimate(method, model, names, source, **settings)


def request(model, source, names, **settings):
    return EstimateRequest(model, names, find_sites(model), source, **settings)


def scoped(model, scope="sites"):
    return [b.name for b in targets(find_sites(model).batchnorms, scope)]


def torch_batch_reference(net, x, batch_size, names):
    """PyTorch: the named BNs in train mode with momentum=None, dropout in eval, same batches in order."""
    ref = copy.deepcopy(net).eval()
    modules = {module_name(n): ref.get_submodule(module_name(n)) for n in names}
    for m in modules.values():
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            ref(torch.from_numpy(x[i:i + batch_size]))
    return {n: (m.running_mean.double().numpy(), m.running_var.double().numpy()) for n, m in
            ((n, modules[module_name(n)]) for n in names)}


def torch_population_reference(net, x, names_in_order):
    """PyTorch: re-estimate BNs one by one in topological order, each over the whole data set with every
    earlier BN already updated (exact inference semantics), in float64."""
    ref = copy.deepcopy(net).double().eval()
    xt = torch.from_numpy(x).double()
    out = {}
    for name in names_in_order:
        bn = ref.get_submodule(module_name(name))
        seen = []
        handle = bn.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach()))
        with torch.no_grad():
            ref(xt)
        handle.remove()
        a = torch.cat(seen).transpose(0, 1).reshape(bn.num_features, -1)
        mean, var = a.mean(1), a.var(1, unbiased=False)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        out[name] = (mean.numpy(), var.numpy())
    return out


def test_targets_cover_every_site_kind(exported):
    _, model, _ = exported
    report = {b.name: b for b in find_sites(model).batchnorms}
    kinds = {module_name(n): b.path for n, b in report.items()}
    assert kinds == {"bn_direct": "direct", "bn_weight": "weight", "bn_concat": "merge", "bn1d": "direct"}
    assert next(d for b in report.values() for d in b.dropouts if "drop_c" in d.name).channelwise


@pytest.mark.parametrize("batch_size", [16, 40])
@pytest.mark.parametrize("way", ["native-bn", "graph", "graph-other-provider"])
def test_batch_method_equals_pytorch(exported, batch_size, way, monkeypatch):
    """Both ways a batch pass gets its statistics: onnxruntime's training-mode BN (CPU provider, one thread,
    opset >= 14) and operators in the graph (more threads, the CUDA provider, older opsets, other float types)."""
    if way == "graph-other-provider":
        monkeypatch.setattr("vsonnx.methods.batch.cpu_provider", lambda device: False)
    net, model, x = exported
    names = scoped(model)
    source = ArraySource.from_arrays(model, x, None, shuffle=False)
    result = calibrate(model, source, names, method="batch", batch_size=batch_size, device="cpu",
                       threads=1 if way == "native-bn" else 2)
    ref = torch_batch_reference(net, x, batch_size, names)
    for name in names:
        got = result.statistics[name]
        # float32 activations, reductions over <= 40*64 elements: a few ulps of relative error
        np.testing.assert_allclose(got.mean, ref[name][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.var, ref[name][1], rtol=1e-4, atol=1e-5)
    assert result.batches == -(-len(x) // batch_size)


def test_population_method_equals_one_by_one_pytorch(exported):
    net, model, x = exported
    names = scoped(model, "all")
    levels = GraphIndex(model).levels(names)
    assert sorted(levels.values()) == list(range(len(names)))  # a chain: one BN per level
    order = sorted(names, key=levels.get)
    result = calibrate(model, ArraySource.from_arrays(model, x, None), names, method="population",
                       batch_size=32, device="cpu")
    ref = torch_population_reference(net, x, order)
    for name in names:
        np.testing.assert_allclose(result.statistics[name].mean, ref[name][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result.statistics[name].var, ref[name][1], rtol=1e-4, atol=1e-6)


def test_population_does_not_depend_on_batch_size_or_order(exported):
    _, model, x = exported
    names = scoped(model)
    runs = [calibrate(model, ArraySource.from_arrays(model, x, None, shuffle=shuffle, seed=seed), names,
                      method="population", batch_size=bs, device="cpu")
            for bs, shuffle, seed in [(96, False, 0), (7, True, 3), (32, True, 11)]]
    for other in runs[1:]:
        for name in names:
            np.testing.assert_allclose(other.statistics[name].mean, runs[0].statistics[name].mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(other.statistics[name].var, runs[0].statistics[name].var, rtol=1e-5)


def test_batch_size_one_estimates_every_bn_that_sees_two_values_per_channel(exported, tmp_path):
    """A batch of one sample still gives a 2-D BN H x W values per channel (models with a batch of 1 baked in
    need it, as PyTorch's train-mode BN allows it); a BatchNorm1d sees one value: skipped with a note, and
    refused by fix (rule 3: no statistics were measured)."""
    _, model, x = exported
    names = scoped(model)
    result = calibrate(model, ArraySource.from_arrays(model, x[:8], None), names, method="batch", batch_size=1)
    bn1d = next(n for n in names if "bn1d" in n)
    assert set(result.statistics) == set(names) - {bn1d} and any(bn1d in note for note in result.notes)
    np.save(tmp_path / "x.npy", x[:8])
    vsonnx.export(__import__("nets_small").trained_like(), __import__("torch").randn(2, 3, 8, 8), tmp_path / "m.onnx", exporter="torchscript")
    report = vsonnx.fix(tmp_path / "m.onnx", tmp_path / "x.npy", output=tmp_path / "o.onnx", batch_size=1)
    assert report.written and report.refused[bn1d].startswith("3:")


def test_dropout_is_off_during_calibration(exported):
    """Two runs on the same batches give identical statistics: no random masks anywhere."""
    _, model, x = exported
    names = scoped(model)
    a = calibrate(model, ArraySource.from_arrays(model, x, None, shuffle=False), names, batch_size=32, device="cpu")
    b = calibrate(model, ArraySource.from_arrays(model, x, None, shuffle=False), names, batch_size=32, device="cpu")
    for n in names:
        np.testing.assert_array_equal(a.statistics[n].var, b.statistics[n].var)


@pytest.mark.parametrize("arch,options", [("densenet", dict(depth=10, growth=4)), ("preresnet", dict(depth=8))])
def test_staged_population_equals_per_level_passes(tmp_path, arch, options):
    """The staged computation (each node once, stage boundaries spilled to disk) gives the per-level answer."""
    from vsonnx.nets import DropoutConfig, build

    torch.manual_seed(0)
    net = build(arch, num_classes=3, dropout=DropoutConfig("a", 0.5), **options).train()
    with torch.no_grad():
        net(torch.randn(64, 3, 16, 16))
    vsonnx.export(net, torch.randn(2, 3, 16, 16), tmp_path / "m.onnx", exporter="torchscript")
    model = load_model(tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((50, 3, 16, 16)).astype(np.float32)
    names = scoped(model, "all")
    a = population._per_level(request(model, None, names, batch_size=16, device="cpu"),
                              ArraySource.from_arrays(model, x, None))
    b = population._staged(request(model, None, names, batch_size=16, device="cpu"),
                           ArraySource.from_arrays(model, x, None))
    assert a.passes == b.passes > 1
    for n in names:
        np.testing.assert_allclose(b.statistics[n].mean, a.statistics[n].mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.statistics[n].var, a.statistics[n].var, rtol=1e-5)


def test_staged_population_reads_the_data_once(exported):
    """Stages after the first read only the spill: they get batches of the recorded sizes, not the data again
    (no rows gathered, decoded or checked per stage); the statistics are those of the per-level passes."""
    _, model, x = exported
    names = scoped(model, "all")
    arrays = ArraySource.from_arrays(model, x, None, shuffle=False)

    class Counting(Source):
        replays, has_labels, spec, size = True, False, "counting", len(x)
        reads = 0

        def batches(self, batch_size):
            self.reads += 1
            return arrays.batches(batch_size)

    source = Counting()
    staged = population._staged(request(model, None, names, batch_size=40, device="cpu"), source)
    per_level = population._per_level(request(model, None, names, batch_size=40, device="cpu"), arrays)
    assert staged.passes > 1 and source.reads == 1
    assert (staged.samples, staged.batches) == (len(x), 3)
    for n in names:
        np.testing.assert_allclose(staged.statistics[n].var, per_level.statistics[n].var, rtol=1e-5)


def test_staged_falls_back_when_the_spill_is_too_large(exported, monkeypatch):
    _, model, x = exported
    names = scoped(model)
    reference = calibrate(model, ArraySource.from_arrays(model, x, None), names, method="population", device="cpu")
    monkeypatch.setattr(population, "MAX_SPILL_BYTES", 1)
    with pytest.raises(population._SpillTooLarge):
        population._staged(request(model, None, names, batch_size=32, device="cpu"), ArraySource.from_arrays(model, x, None))

    def too_large(*args, **kwargs):
        raise population._SpillTooLarge

    monkeypatch.setattr(population, "_staged", too_large)
    fallback = calibrate(model, ArraySource.from_arrays(model, x, None), names, method="population", device="cpu")
    for n in names:
        np.testing.assert_allclose(fallback.statistics[n].var, reference.statistics[n].var, rtol=1e-5)


def test_staged_falls_back_when_the_spill_cannot_be_written(exported, monkeypatch):
    """A spill write that fails on the background writer (disk full) ends the staged pass; population then
    runs its per-level passes and gives the same statistics."""
    _, model, x = exported
    names = scoped(model)
    reference = calibrate(model, ArraySource.from_arrays(model, x, None), names, method="population", device="cpu")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("vsonnx.spill.os.pwrite", disk_full)
    with pytest.raises(population._SpillTooLarge):
        population._staged(request(model, None, names, batch_size=32, device="cpu"), ArraySource.from_arrays(model, x, None))
    fallback = calibrate(model, ArraySource.from_arrays(model, x, None), names, method="population", device="cpu")
    for n in names:
        np.testing.assert_allclose(fallback.statistics[n].var, reference.statistics[n].var, rtol=1e-5)


def test_relative_method_equals_pytorch_transfer(exported):
    """relative = stored statistics moved by the change PyTorch's batch re-estimation shows between dropout
    on and off on the same batches (drop_c is a Dropout2d: simulated channel-wise, from the export's metadata)."""
    net, model, _ = exported
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((512, 3, 8, 8)) * 2 + 0.5).astype(np.float32)
    names = scoped(model)
    result = calibrate(model, ArraySource.from_arrays(model, x, None, shuffle=False), names, method="relative",
                       batch_size=64, device="cpu")
    assert result.method == "relative" and result.passes == 1  # one pass over the data, two sessions
    off = torch_batch_reference(net, x, 64, names)
    dropping = copy.deepcopy(net)
    dropping.train()  # BN batch statistics and dropout active: the regime the stored statistics come from
    for m in dropping.modules():
        if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    torch.manual_seed(0)
    with torch.no_grad():
        for i in range(0, len(x), 64):
            dropping(torch.from_numpy(x[i:i + 64]))
    for name in names:
        bn = net.get_submodule(module_name(name))
        on = dropping.get_submodule(module_name(name))
        want_mean, want_var = transfer_change(bn.running_mean.numpy(), bn.running_var.numpy(),
                                              (on.running_mean.numpy(), on.running_var.numpy()), off[name])
        got = result.statistics[name]
        # different dropout masks (onnxruntime vs torch): Monte-Carlo error of 512 x 64 elements per channel
        assert np.median(np.abs(got.var / want_var - 1)) < 0.05, name
        # means: two independent m_on estimates over 512 samples (bn1d: one value per sample), each with a
        # standard error of about 1/sqrt(512) = 0.044 of the spread: their difference stays below 0.12
        assert np.median(np.abs(got.mean - want_mean) / np.sqrt(bn.running_var.numpy())) < 0.12, name
        moved = np.median(np.abs(want_var / bn.running_var.numpy() - 1))
        assert moved > 0.1, name  # the check is not vacuous: every BN in scope changes by more than that


def test_relative_method_simulates_old_dropout_and_refuses_impossible_ratios(exported):
    """Opset 11 Dropout (ratio attribute): direct site, so v_on / v_off = E[x^2] / p / Var(x) (Eq. 8)."""
    from conftest import GraphBuilder

    g = GraphBuilder(opset=11)
    model = g.build(g.bn(g.dropout("x", 0.5, "d", form="attribute"), 3, "bn", mean=[0, 0, 0], var=[2, 2, 2]))
    x = np.random.default_rng(0).standard_normal((256, 3, 8, 8)).astype(np.float32)
    result = calibrate(model, ArraySource.from_arrays(model, x, None, shuffle=False), ["bn"], method="relative",
                       batch_size=64, device="cpu")
    # stored var 2 (the training-time variance of x through dropout 0.5), scaled by v_off / v_on = 0.5;
    # 16,384 values per channel per pass: Monte-Carlo error about 2%
    np.testing.assert_allclose(result.statistics["bn"].var, 1.0, rtol=0.05)
    g = GraphBuilder()
    model = g.build(g.bn(g.dropout("x", 1.0, "d"), 3, "bn"))
    with pytest.raises(VsonnxError, match="outside"):
        calibrate(model, ArraySource.from_arrays(model, x, None), ["bn"], method="relative", batch_size=64,
                  device="cpu")
