"""eval / compare: accuracies against numpy argmax of onnxruntime outputs, agreement of a model with itself."""
import json

import numpy as np
import pytest

import vsonnx

from conftest import run


def test_eval_and_compare(setup):
    tmp, model_path = setup
    r = run("eval", model_path, "--data", tmp / "val.npz", "--json")
    d = json.loads(r.output[r.output.index("{"):])
    assert r.exit_code == 0 and d["samples"] == 32 and set(d) == {"model", "samples", "top1", "top5", "provider",
                                                                   "images_per_s"}
    r = run("compare", model_path, model_path, "--data", tmp / "val.npz", "--json")
    d = json.loads(r.output[r.output.index("{"):])
    assert d["delta_top1"] == 0 and d["agreement"] == 100 and d["max_abs_diff"] == 0


def test_eval_matches_numpy_argmax(setup):
    tmp, model_path = setup
    import onnxruntime as ort
    z = np.load(tmp / "val.npz")
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    expected = 100 * np.mean(session.run(None, {"x": z["x"]})[0].argmax(1) == z["y"])
    assert vsonnx.evaluate(model_path, tmp / "val.npz", batch_size=5).top1 == pytest.approx(expected)



def test_paired_interval_equals_the_textbook_formula():
    from vsonnx.accuracy import Scorer, paired_interval

    rng = np.random.default_rng(0)
    a_hits, b_hits = rng.random(500) < 0.7, rng.random(500) < 0.8
    a, b = Scorer.__new__(Scorer), Scorer.__new__(Scorer)
    a.hits, b.hits = [a_hits[:200], a_hits[200:]], [b_hits[:300], b_hits[300:]]  # batching does not matter
    d = b_hits.astype(float) - a_hits
    se = np.sqrt(np.sum((d - d.mean()) ** 2) / (len(d) - 1) / len(d))
    delta, low, high = paired_interval(a, b)
    assert delta == pytest.approx(100 * d.mean())
    assert (low, high) == pytest.approx((100 * (d.mean() - 1.96 * se), 100 * (d.mean() + 1.96 * se)))


def test_compare_says_whether_the_difference_is_significant(setup, tmp_path):
    tmp, model_path = setup
    r = run("compare", model_path, model_path, "--data", tmp / "val.npz")
    assert "paired 95% interval [+0.00, +0.00] (unchanged)" in r.output
