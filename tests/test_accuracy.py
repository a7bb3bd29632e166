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
                                                                   "images_per_s", "top1_ci95"}
    from vsonnx.accuracy import wilson_interval

    assert d["top1_ci95"] == pytest.approx(wilson_interval(round(d["top1"] * 32 / 100), 32))
    assert d["top1_ci95"][0] <= d["top1"] <= d["top1_ci95"][1]
    text = run("eval", model_path, "--data", tmp / "val.npz").output
    assert "top-1 95% interval" in text and "[{:.2f}, {:.2f}]".format(*d["top1_ci95"]) in text
    r = run("compare", model_path, model_path, "--data", tmp / "val.npz", "--json")
    d = json.loads(r.output[r.output.index("{"):])
    assert d["delta_top1"] == 0 and d["agreement"] == 100 and d["max_abs_diff"] == 0


def ort_logits(path, x):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def two_models(tmp):
    """Two different networks of one shape and 200 labelled samples."""
    from conftest import cnn_with_sites, save

    rng = np.random.default_rng(5)
    x = (rng.standard_normal((200, 3, 8, 8)) + 0.3).astype(np.float32)
    y = ort_logits(save(cnn_with_sites(seed=0), tmp / "a.onnx"), x).argmax(1)
    y = np.where(rng.random(200) < 0.3, rng.integers(0, 5, 200), y)  # model A right on ~75%
    np.savez(tmp / "data.npz", x=x, y=y)
    return tmp / "a.onnx", save(cnn_with_sites(seed=3), tmp / "b.onnx"), x, y


def test_compare_of_two_models_equals_numpy(tmp_path):
    """delta, agreement, max |logit difference| and the paired interval against numpy over onnxruntime
    outputs (optimisations off); a compare that returned zeros or one model twice would fail."""
    a, b, x, y = two_models(tmp_path)
    la, lb = ort_logits(a, x), ort_logits(b, x)
    hits_a, hits_b = la.argmax(1) == y, lb.argmax(1) == y
    d = hits_b.astype(float) - hits_a
    se = np.sqrt(np.sum((d - d.mean()) ** 2) / (len(d) - 1) / len(d))
    r = run("compare", a, b, "--data", tmp_path / "data.npz", "--json", "--batch-size", 64)
    got = json.loads(r.output[r.output.index("{"):])
    assert r.exit_code == 0 and abs(d.mean()) > 0.05  # the two models really differ
    assert got["delta_top1"] == pytest.approx(100 * d.mean())
    assert got["agreement"] == pytest.approx(100 * np.mean(la.argmax(1) == lb.argmax(1)))
    assert got["max_abs_diff"] == pytest.approx(np.abs(la - lb).max(), rel=1e-5)
    assert got["delta_top1_ci95"] == pytest.approx([100 * (d.mean() - 1.96 * se), 100 * (d.mean() + 1.96 * se)])


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


def test_wilson_interval_equals_scipy():
    """Reference values: scipy.stats.binomtest(k, n).proportion_ci(method="wilson") (scipy 1.17, z = 1.959964;
    ours takes 1.96), in percent, including both ends (0 and n hits), where p +- z se would be empty."""
    from vsonnx.accuracy import wilson_interval

    reference = {(81, 263): (25.52885, 36.62096), (0, 10): (0.0, 27.75328), (10, 10): (72.24672, 100.0),
                 (7925, 10000): (78.44404, 80.03349), (3, 500): (0.20426, 1.74903)}
    for (k, n), expected in reference.items():
        assert wilson_interval(k, n) == pytest.approx(expected, abs=2e-3)


def test_compare_says_whether_the_difference_is_significant(setup, tmp_path):
    tmp, model_path = setup
    r = run("compare", model_path, model_path, "--data", tmp / "val.npz")
    assert "paired 95% interval [+0.00, +0.00] (unchanged)" in r.output
    a, b, _, _ = two_models(tmp_path)
    got = json.loads((r := run("compare", a, b, "--data", tmp_path / "data.npz", "--json")).output[r.output.index("{"):])
    low, high = got["delta_top1_ci95"]
    verdict = "B is better" if low > 0 else "B is worse" if high < 0 else "not significant"
    text = run("compare", a, b, "--data", tmp_path / "data.npz").output
    assert f"paired 95% interval [{low:+.2f}, {high:+.2f}]" in text and verdict in text


def test_compare_warns_where_model_b_expects_other_preprocessing_or_classes(tmp_path):
    import onnx

    from vsonnx.model import set_metadata

    a, b, _, _ = two_models(tmp_path)
    for path, names in ((a, '["a", "b", "c", "d", "e"]'), (b, '["e", "d", "c", "b", "a"]')):
        model = onnx.load(str(path))
        set_metadata(model, {"vsonnx.class_names": names})
        onnx.save(model, str(path))
    r = run("compare", a, b, "--data", tmp_path / "data.npz")
    assert r.exit_code == 0 and "model B's vsonnx.class_names metadata differs from model A's" in r.output
    r = run("compare", a, a, "--data", tmp_path / "data.npz")
    assert r.exit_code == 0 and "differs" not in r.output


@pytest.mark.parametrize("bad", [5, -1])
def test_labels_the_model_cannot_predict_are_a_user_error(tmp_path, bad):
    from conftest import cnn_with_sites, save

    path = save(cnn_with_sites(), tmp_path / "m.onnx")  # 5 classes
    y = np.zeros(16, np.int64)
    y[3] = bad
    np.savez(tmp_path / "d.npz", x=np.zeros((16, 3, 8, 8), np.float32), y=y)
    r = run("eval", path, "--data", tmp_path / "d.npz")
    assert r.exit_code == 3 and "could never be predicted" in r.output


def test_outputs_that_are_not_class_scores_are_a_user_error(tmp_path):
    """A segmentation-like output [N, C, H, W] flattened would make argmax pick a pixel, not a class."""
    from conftest import GraphBuilder, save

    g = GraphBuilder(seed=0)
    path = save(g.build(g.conv("x", 3, 5), input_shape=("N", 3, 8, 8)), tmp_path / "seg.onnx")
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 8, 8), np.float32), y=np.zeros(4, np.int64))
    r = run("eval", path, "--data", tmp_path / "d.npz")
    assert r.exit_code == 3 and "eval scores class scores [N, C]" in r.output


def test_scores_names_the_output_holding_the_class_scores(tmp_path):
    """A model whose first output is a map and whose second holds the class scores: --scores picks the second,
    and its top-1 equals numpy's argmax of that output; an unknown name is a user error listing the outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from conftest import cnn_with_sites, save

    model = cnn_with_sites()
    conv_out = model.graph.node[0].output[0]
    model.graph.output.insert(0, helper.make_tensor_value_info(conv_out, onnx.TensorProto.FLOAT, None))
    path = save(model, tmp_path / "two.onnx")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 5, 40)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    scores_name = model.graph.output[1].name
    r = run("eval", path, "--data", tmp_path / "d.npz", "--scores", scores_name, "--json")
    got = json.loads(r.output[r.output.index("{"):])
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([scores_name], {"x": x})[0]
    assert got["top1"] == pytest.approx(100 * np.mean(logits.argmax(1) == y))
    assert run("eval", path, "--data", tmp_path / "d.npz").exit_code == 3  # the first output is a map
    r = run("compare", path, path, "--data", tmp_path / "d.npz", "--scores", "nope")
    assert r.exit_code == 3 and "is not an output of the model" in r.output and scores_name in r.output
    np.save(tmp_path / "x.npy", x)
    fix = ["fix", path, "--calib", tmp_path / "x.npy", "--val", tmp_path / "d.npz", "--steps", "2", "-o",
           tmp_path / "o.onnx"]
    assert run(*fix).exit_code == 3  # labelled --val scores the first output, a map
    r = run(*fix, "--scores", scores_name, "--json")
    report = json.loads(r.output[r.output.index("{"):])
    assert r.exit_code in (0, 1) and report["criterion"] == "top1"
    assert report["candidates"][0]["val_top1"] == pytest.approx(100 * np.mean(logits.argmax(1) == y))


def test_eval_on_the_calibration_data_of_a_fixed_model_is_warned(tmp_path):
    from conftest import cnn_with_sites, save

    path = save(cnn_with_sites(), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    for name in ("calib.npz", "held_out.npz"):
        np.savez(tmp_path / name, x=rng.standard_normal((32, 3, 8, 8)).astype(np.float32), y=rng.integers(0, 5, 32))
    assert run("fix", path, "--calib", tmp_path / "calib.npz", "-o", tmp_path / "f.onnx").exit_code == 0
    r = run("eval", tmp_path / "f.onnx", "--data", tmp_path / "calib.npz")
    assert r.exit_code == 0 and "was calibrated on" in r.output and "optimistic" in r.output
    assert run("fix", path, "--calib", tmp_path / "calib.npz", "-o", tmp_path / "g.onnx").exit_code == 0
    r = run("compare", path, tmp_path / "g.onnx", "--data", tmp_path / "calib.npz")  # (a new message: shown)
    assert r.exit_code == 0 and "g.onnx was calibrated on" in r.output and "m.onnx was" not in r.output
    assert "calibrated on" not in run("eval", tmp_path / "f.onnx", "--data", tmp_path / "held_out.npz").output
