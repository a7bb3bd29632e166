"""``--method distill``: the write-back is exact in onnxruntime (optimisations off), the constants it cannot
write stay out of the fit, the fit brings the deterministic network closer to its dropout ensemble
(measured independently in onnxruntime), and it is deterministic for a seed."""
import numpy as np
import onnx
import pytest
import torch

from vsonnx.data import ArraySource
from vsonnx.ensemble import DropoutEnsemble, divergence, scores_tensor
from vsonnx.methods import estimate
from vsonnx.methods.distill import Student
from vsonnx.rewrite import invalid_statistics, targets, with_statistics
from vsonnx.runtime import make_session
from vsonnx.sites import find_sites
from vsonnx.torch_graph import TorchGraph

from conftest import GraphBuilder, cnn_with_sites, run, save

X = (np.random.default_rng(0).standard_normal((96, 3, 8, 8)) + 0.3).astype(np.float32)


def ort(model, x):
    return make_session(model, device="cpu", optimize=False).run(None, {"x": x})[0]


def test_written_statistics_compute_the_learned_scale_and_shift():
    model = cnn_with_sites()
    names = ["bn_direct", "bn_weight"]
    student = Student(model, names, "cpu")
    rng = np.random.default_rng(1)
    with torch.no_grad():
        for n in names:
            student.d[n].copy_(torch.from_numpy(0.3 * rng.standard_normal(4).astype(np.float32)))
            student.b[n].copy_(torch.from_numpy(0.2 * rng.standard_normal(4).astype(np.float32)))
        learned = list(TorchGraph(model)({"x": torch.from_numpy(X)}, affine=student.affine()).values())[0].numpy()
    fixed = with_statistics(model, student.statistics(96))
    np.testing.assert_allclose(ort(fixed, X), learned, rtol=1e-4, atol=1e-5)
    untouched = Student(model, names, "cpu").statistics(96)  # d = b = 0: the stored statistics
    from vsonnx.graph import GraphIndex
    stored = GraphIndex(model).stored_statistics(names)
    for n in names:
        np.testing.assert_allclose(untouched[n].mean, stored[n].mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(untouched[n].var, stored[n].var, rtol=1e-5)


def test_gamma_zero_channels_keep_their_statistics_and_the_scale_is_capped():
    g = GraphBuilder()
    bn = g.bn("x", 3, "bn", mean=[0.1, 0.2, 0.3], var=[1.0, 1e-7, 2.0])
    model = g.build(bn)
    scale = next(t for t in model.graph.initializer if t.name == "bn_scale")
    scale.CopyFrom(onnx.numpy_helper.from_array(np.array([0.0, 1.0, 1.0], np.float32), "bn_scale"))
    student = Student(model, ["bn"], "cpu")
    with torch.no_grad():
        student.d["bn"].fill_(20.0)  # far beyond what a running variance can express
        student.b["bn"].fill_(0.5)
        a, c = student.affine()["bn"]
    stats = student.statistics(10)["bn"]
    assert invalid_statistics(stats) is None
    assert stats.mean[0] == pytest.approx(0.1) and stats.var[0] == pytest.approx(1.0)  # gamma = 0: stored
    assert stats.var[2] >= 1e-5 * 0.999  # capped at var' >= eps
    assert stats.var[1] >= 1e-7 * 0.999  # var below eps: the scale may not grow at all
    assert float(c[0]) == pytest.approx(float(model.graph.initializer[1].float_data[0]
                                              if model.graph.initializer[1].float_data else
                                              onnx.numpy_helper.to_array(model.graph.initializer[1])[0]))
    np.testing.assert_allclose(ort(with_statistics(model, {"bn": stats}), X),
                               (X * a.numpy()[None, :, None, None] + c.numpy()[None, :, None, None]), rtol=1e-4, atol=1e-4)


def distilled(model, seed=0, steps=40):
    source = ArraySource.from_arrays(model, X, None, shuffle=False)
    names = [b.name for b in targets(find_sites(model).batchnorms, "sites")]
    return estimate("distill", model, names, source, batch_size=32, seed=seed,
                    device="cpu", options={"steps": steps, "lr": 0.05})


def test_distillation_brings_the_network_closer_to_its_dropout_ensemble():
    model = cnn_with_sites(seed=4)
    result = distilled(model)
    assert result.fitting.loss_last < result.fitting.loss_first
    assert result.samples == 96 and result.passes == 40
    fixed = with_statistics(model, result.statistics)
    ensemble = DropoutEnsemble(model, scores_tensor(model), seed=123, device="cpu")  # other masks than the fit
    target = ensemble.target({"x": X}, masks=64)
    before = divergence(target, ort(model, X), "kl").mean()
    after = divergence(target, ort(fixed, X), "kl").mean()
    assert after < 0.8 * before


def test_distillation_is_deterministic_for_a_seed():
    model = cnn_with_sites(seed=4)
    one, two, other = distilled(model, steps=6), distilled(model, steps=6), distilled(model, seed=1, steps=6)
    for name, stats in one.statistics.items():
        np.testing.assert_array_equal(stats.var, two.statistics[name].var)
    assert any(not np.array_equal(s.var, other.statistics[n].var) for n, s in one.statistics.items())


def test_cli_distill_writes_and_refuses_outputs_that_are_not_class_scores(setup, tmp_path):
    folder, model_path = setup
    result = run("fix", model_path, "--calib", folder / "calib.npz", "--method", "distill", "--steps", "5",
                 "-o", tmp_path / "d.onnx", "--json")
    assert result.exit_code == 0, result.output
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "d.onnx")).metadata_props}
    assert meta["vsonnx.method"] == "distill"
    g = GraphBuilder()
    seg = save(g.build(g.conv(g.bn(g.dropout("x", 0.5, "d"), 3, "bn"), 3, 2, name="seg")), tmp_path / "seg.onnx")
    refused = run("fix", seg, "--calib", folder / "calib.npz", "--method", "distill", "--steps", "2")
    assert refused.exit_code == 3 and "--scores" in refused.output
    mse = run("fix", seg, "--calib", folder / "calib.npz", "--method", "distill", "--steps", "2",
              "--scores", "seg_out", "--loss", "mse", "-o", tmp_path / "seg.fixed.onnx")
    assert mse.exit_code == 0, mse.output
