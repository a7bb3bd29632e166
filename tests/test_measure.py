"""`scan --calib`: measured vs predicted shift on small graphs whose training-time statistics are known."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from vsonnx.cli import main
from vsonnx.measure import measure_shift, median_prediction_error

from conftest import GraphBuilder, save

RNG = np.random.default_rng(0)


def train_time_stats(x, p, transform, draws=20):
    """Monte-Carlo running statistics of transform(dropout(x)) per channel (axis 1)."""
    outs = [transform(x * (RNG.random(x.shape) < p) / p) for _ in range(draws)]
    a = np.concatenate(outs).transpose(1, 0, 2, 3).reshape(outs[0].shape[1], -1)
    return a.mean(1), a.var(1)


def conv(x, w):
    """3x3 'valid' convolution, NCHW, numpy reference (no padding: the noise formula is exact)."""
    n, c, h, wd = x.shape
    out = np.zeros((n, w.shape[0], h - 2, wd - 2))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", x[:, :, i:i + h - 2, j:j + wd - 2], w[:, :, i, j])
    return out


@pytest.fixture(scope="module")
def data():
    return (RNG.standard_normal((400, 3, 8, 8)) * [[[[1.0]], [[2.0]], [[0.5]]]] + 0.7).astype(np.float32)


def test_direct_site_prediction_matches_measurement(tmp_path, data):
    p = 0.6
    mean, var = train_time_stats(data.astype(np.float64), p, lambda z: z)
    g = GraphBuilder()
    h = g.dropout("x", 1 - p, "d")
    out = g.bn(h, 3, "bn", mean=mean, var=var)
    np.save(tmp_path / "x.npy", data)
    report = measure_shift(g.build(out), tmp_path / "x.npy", limit=None)
    bn = report.batchnorms[0]
    # real/moving measured on the same inputs as the Monte-Carlo statistics: agreement to MC error (~1%)
    assert bn.real_var_ratio == pytest.approx(bn.predicted_var_ratio, rel=0.02)
    assert bn.prediction_error < 0.02 and bn.mean_shift < 0.05
    assert bn.shift_metric >= 1 / bn.real_var_ratio  # mean of per-channel 1/ratio (all < 1), Jensen


def test_weight_and_merge_site_predictions(tmp_path, data):
    p = 0.5
    w = (RNG.standard_normal((4, 3, 3, 3)) / 3).astype(np.float32)
    x64 = data.astype(np.float64)
    mean_w, var_w = train_time_stats(x64, p, lambda z: conv(z, w))
    g = GraphBuilder()
    h = g.dropout("x", 1 - p, "d")
    wname = g.init("w", w)
    h = g.node("Conv", [h, wname], "conv")
    out = g.bn(h, 4, "bn", mean=mean_w, var=var_w)
    np.save(tmp_path / "x.npy", data)
    bn = measure_shift(g.build(out), tmp_path / "x.npy", limit=None).batchnorms[0]
    assert bn.path == "weight"
    assert bn.prediction_error < 0.03  # Monte-Carlo error of the running statistics

    # merge: the dropout path (through the conv) is added to a clean branch
    w2 = (RNG.standard_normal((4, 3, 3, 3)) / 3).astype(np.float32)
    clean = conv(x64, w2)
    a = np.concatenate([conv(x64 * (RNG.random(x64.shape) < p) / p, w) + clean for _ in range(20)])
    mean_m, var_m = a.mean((0, 2, 3)), a.var((0, 2, 3))
    g = GraphBuilder()
    h = g.dropout("x", 1 - p, "d")
    h = g.node("Conv", [h, g.init("w", w)], "conv")
    c = g.node("Conv", ["x", g.init("w2", w2)], "conv2")
    out = g.bn(g.node("Add", [h, c]), 4, "bn", mean=mean_m, var=var_m)
    bn = measure_shift(g.build(out), tmp_path / "x.npy", limit=None).batchnorms[0]
    assert bn.path == "merge" and bn.prediction_error < 0.03


def test_unpredictable_site_reports_null(tmp_path, data):
    g = GraphBuilder()
    h = g.node("Relu", [g.dropout("x", 0.5, "d")])
    out = g.bn(h, 3, "bn")
    np.save(tmp_path / "x.npy", data)
    report = measure_shift(g.build(out), tmp_path / "x.npy", limit=100)
    bn = report.batchnorms[0]
    assert bn.path == "other" and bn.predicted_var_ratio is None and bn.prediction_error is None
    assert bn.real_var_ratio is not None and median_prediction_error(report) is None


def test_cli_scan_calib_json_table_and_plot(tmp_path, data):
    g = GraphBuilder()
    h = g.dropout("x", 0.5, "d")
    out = g.bn(g.conv(h, 3, 4), 4, "bn")
    path = save(g.build(out), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", data)
    runner = CliRunner()
    r = runner.invoke(main, ["scan", path, "--calib", str(tmp_path / "x.npy"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output[r.output.index("{"):])
    bn = d["batchnorms"][0]
    for key in ("real_var_ratio", "shift_metric", "mean_shift", "predicted_var_ratio", "prediction_error"):
        assert key in bn
    assert d["calibration"]["samples"] == 400
    r = runner.invoke(main, ["scan", path, path, "--calib", str(tmp_path / "x.npy"), "--plot", str(tmp_path / "s.png")])
    assert r.exit_code == 0 and "Traceback" not in r.output
    assert f"{bn['real_var_ratio']:.3f}" in r.output  # the table shows the JSON's numbers
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "s.png").stat().st_size > 5000
    r = runner.invoke(main, ["scan", path, "--plot", str(tmp_path / "t.png")])
    assert r.exit_code == 3 and "--calib" in r.output
