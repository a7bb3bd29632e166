"""fix --data-free: the paper's formulas applied to constants, checked against Monte-Carlo training
statistics and against the calibrated population result on small graphs."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from vsonnx import theory
from vsonnx.methods import estimate
from vsonnx.cli import main
from vsonnx.data import ArraySource
from vsonnx.methods.closed_form import data_free_statistics
from vsonnx.sites import find_sites

from conftest import GraphBuilder, save

RNG = np.random.default_rng(0)
C_MEAN = np.array([0.5, -1.0, 2.0])
C_STD = np.array([1.0, 0.5, 2.0])


def gaussian_input(n=400):
    return (C_MEAN[None, :, None, None] + C_STD[None, :, None, None] * RNG.standard_normal((n, 3, 8, 8))).astype(np.float32)


def mc_stats(x, fn, draws=20):
    """Per-channel mean/var of fn(x, random) over several dropout draws (training-time statistics)."""
    a = np.concatenate([fn(x) for _ in range(draws)]).astype(np.float64)
    axes = (0,) + tuple(range(2, a.ndim))
    return a.mean(axes), a.var(axes)


def drop(x, p):
    return x * (RNG.random(x.shape) < p) / p


def population_var(model, x, name):
    result = estimate("population", model, [name], ArraySource.from_arrays(model, x, None), device="cpu")
    return result.statistics[name].var


def test_direct_site_recovers_the_test_variance():
    p, x = 0.5, gaussian_input()
    mean, var = mc_stats(x, lambda z: drop(z, p))
    g = GraphBuilder()
    out = g.bn(g.dropout("x", 1 - p, "d"), 3, "bn", mean=mean, var=var)
    model = g.build(out)
    result = data_free_statistics(model, find_sites(model))
    assert result.notes["bn"].startswith("direct")
    np.testing.assert_allclose(result.statistics["bn"].var, population_var(model, x, "bn"), rtol=0.03)
    np.testing.assert_array_equal(result.statistics["bn"].mean, mean.astype(np.float32))


@pytest.mark.parametrize("activation,pads", [("Relu", 0), ("Relu", 1), ("Clip", 1), (None, 0)])
def test_weight_site_after_bn_activation(activation, pads):
    """x -> BN0 (exact stats: output ~ N(beta, gamma^2)) -> act -> Dropout -> Conv -> BN1."""
    p, x = 0.6, gaussian_input()
    g = GraphBuilder(seed=1)
    h = g.bn("x", 3, "bn0", mean=C_MEAN, var=C_STD ** 2 - 1e-5)
    if activation == "Relu":
        h = g.node("Relu", [h])
    elif activation == "Clip":
        h = g.node("Clip", [h, g.init("lo", np.array(0, np.float32)), g.init("hi", np.array(6, np.float32))])
    h = g.dropout(h, 1 - p, "d")
    w = (RNG.standard_normal((4, 3, 3, 3)) / 3).astype(np.float32)
    h = g.node("Conv", [h, g.init("w", w)], "conv", pads=[pads] * 4)
    probe = g.build(h)  # the graph up to the conv, to simulate training-time statistics
    from vsonnx.runtime import make_session
    import onnx

    work = onnx.ModelProto()
    work.CopyFrom(probe)
    drop_node = next(n for n in work.graph.node if n.op_type == "Dropout")
    t = next(i for i in work.graph.initializer if i.name == drop_node.input[2])
    t.CopyFrom(onnx.numpy_helper.from_array(np.array(True), t.name))  # ORT samples masks: training statistics
    train_session = make_session(work, device="cpu", optimize=False)
    mean, var = mc_stats(x, lambda z: train_session.run(None, {"x": z})[0], draws=10)
    out = g.bn(h, 4, "bn1", mean=mean, var=var)
    model = g.build(out)
    report = find_sites(model)
    result = data_free_statistics(model, report)
    assert result.notes["bn1"].startswith("weight"), result.notes
    expected = population_var(model, x, "bn1")
    # the Gaussian model of BN0's output is exact here; the remaining error is Monte-Carlo (~2%)
    np.testing.assert_allclose(result.statistics["bn1"].var, expected, rtol=0.05)


def test_uncovered_sites_are_reported_and_left_unchanged():
    g = GraphBuilder()
    h = g.dropout("x", 0.5, "d")
    h = g.node("Concat", [h, "x"], axis=1)
    a = g.bn(h, 6, "bn_concat")
    model = g.build(a)
    result = data_free_statistics(model, find_sites(model))
    assert "bn_concat" not in result.statistics and result.notes["bn_concat"].startswith("not corrected")


def test_dropout_input_not_bn_is_refused():
    g = GraphBuilder()
    h = g.dropout("x", 0.5, "d")
    out = g.bn(g.conv(h, 3, 4), 4, "bn")
    model = g.build(out)
    result = data_free_statistics(model, find_sites(model))
    assert "E[x^2]" in result.notes["bn"] and not result.statistics


def test_non_positive_variance_is_clamped_and_reported():
    g = GraphBuilder()
    out = g.bn(g.dropout("x", 0.5, "d"), 3, "bn", mean=[3.0, 3.0, 0.0], var=[1.0, 1.0, 1.0])
    model = g.build(out)
    result = data_free_statistics(model, find_sites(model))
    assert "2 channel(s) clamped" in result.notes["bn"]
    assert (result.statistics["bn"].var > 0).all()
    assert result.statistics["bn"].var[2] == pytest.approx(0.5)


def test_cli_data_free(tmp_path):
    g = GraphBuilder()
    out = g.bn(g.dropout("x", 0.5, "d"), 3, "bn", mean=[0.0, 1.0, 0.0], var=[2.0, 3.0, 1.0])
    path = save(g.build(out), tmp_path / "m.onnx")
    r = CliRunner().invoke(main, ["fix", path, "--data-free", "--synthetic", "0", "--json"])
    assert r.exit_code == 0 and "Traceback" not in r.output
    d = json.loads(r.output[r.output.index("{"):])
    assert d["method"] == "data-free (closed form)" and d["written"] and d["chosen"] == "data-free"
    np.testing.assert_allclose(d["batchnorms"][0]["new_var"], theory.test_var_from_train_direct(
        np.array([0.0, 1.0, 0.0]), np.array([2.0, 3.0, 1.0]), 0.5))


def test_clipped_gaussian_moments_monte_carlo():
    z = RNG.normal(1.0, 2.0, 400_000)
    for lo, hi in [(-np.inf, np.inf), (0, np.inf), (0, 6)]:
        assert np.mean(np.clip(z, lo, hi) ** 2) == pytest.approx(
            float(theory.clipped_gaussian_second_moment(1.0, 2.0, lo, hi)), rel=0.01)


def test_tap_fractions_count_in_bounds_reads():
    frac = theory.tap_fractions((3,), (4,), (4,), (1,), (1,), (1,))
    np.testing.assert_allclose(frac, [0.75, 1.0, 0.75])


def test_data_free_with_val_writes_only_when_better(tmp_path):
    g = GraphBuilder()
    h = g.bn(g.dropout("x", 0.5, "d"), 3, "bn", mean=[0.0, 1.0, 0.0], var=[2.0, 3.0, 1.0])
    out = g.gemm(g.node("Flatten", [g.node("GlobalAveragePool", [g.node("Relu", [h])])]), 3, 5)
    path = save(g.build(out), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "val.npz", x=rng.standard_normal((40, 3, 8, 8)).astype(np.float32), y=rng.integers(0, 5, 40))
    r = CliRunner().invoke(main, ["fix", path, "--data-free", "--synthetic", "0", "--val", str(tmp_path / "val.npz"), "--json"])
    d = json.loads(r.output[r.output.index("{"):])
    assert [c["name"] for c in d["candidates"]] == ["original", "data-free"]
    better = d["candidates"][1]["val_top1"] > d["candidates"][0]["val_top1"]
    assert d["written"] == better and r.exit_code == (0 if better else 1)
