"""Malformed graphs: each class of structural damage gets exit 0, 1 or 3, never a traceback; the seeded
subset of tools/fuzz_graphs.py (long runs: python tools/fuzz_graphs.py) checks the rest."""
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import cnn_with_sites, run, save

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import fuzz_graphs  # noqa: E402


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    return path


def reversed_nodes(m):
    nodes = list(m.graph.node)[::-1]
    del m.graph.node[:]
    m.graph.node.extend(nodes)


def first(m, op):
    return next(n for n in m.graph.node if n.op_type == op)


def fix(path, calib, tmp_path, method="population"):
    return run("fix", path, "--calib", calib, "--method", method, "--batch-size", 8, "-o", tmp_path / "out.onnx")


def test_nodes_out_of_topological_order_are_sorted_and_fixed_like_the_sorted_model(tmp_path, calib):
    model = cnn_with_sites()
    save(model, tmp_path / "sorted.onnx")
    reversed_nodes(model)
    path = save(model, tmp_path / "m.onnx")
    r = fix(path, calib, tmp_path)
    assert r.exit_code == 0 and "not in topological order" in r.output
    reference = run("fix", tmp_path / "sorted.onnx", "--calib", calib, "--method", "population", "--batch-size", 8,
                    "-o", tmp_path / "ref.onnx")
    assert reference.exit_code == 0
    a, b = onnx.load(str(tmp_path / "out.onnx")), onnx.load(str(tmp_path / "ref.onnx"))
    assert {t.name: t.SerializeToString() for t in a.graph.initializer} == \
        {t.name: t.SerializeToString() for t in b.graph.initializer}


@pytest.mark.parametrize("damage,needle", [
    (lambda m: [setattr(n, "name", "same") for n in m.graph.node], "11 nodes named 'same'"),
    (lambda m: setattr(m.graph.node[3], "name", m.graph.node[2].name), "2 nodes named 'bn_direct'"),
    (lambda m: m.graph.ClearField("output"), "has no outputs"),
    (lambda m: setattr(first(m, "BatchNormalization"), "op_type", "Conv"), "'bn_direct' (Conv) does not fit"),
    (lambda m: first(m, "BatchNormalization").input.__delitem__(slice(3, None)), "input size 3"),
    (lambda m: setattr(first(m, "Gemm"), "op_type", "Relu"), "'gemm11' (Relu) does not fit"),
    (lambda m: first(m, "BatchNormalization").attribute.append(helper.make_attribute("epsilon", "abc")),
     "Mismatched attribute type"),
    (lambda m: setattr(first(m, "Conv"), "op_type", "NotAnOp"), "does not fit its operator"),
])
def test_malformed_graphs_are_user_errors(tmp_path, calib, damage, needle):
    model = cnn_with_sites()
    damage(model)
    path = save(model, tmp_path / "m.onnx")
    before = Path(path).read_bytes()
    for result in (run("scan", path, "--json"), fix(path, calib, tmp_path), fix(path, calib, tmp_path, "relative")):
        assert result.exit_code == 3 and needle in result.output, result.output
        assert result.output.strip().splitlines()[-1].startswith("Hint: ")
    assert Path(path).read_bytes() == before and not (tmp_path / "out.onnx").exists()


def test_a_bn_that_reaches_no_graph_output_is_refused_by_name(tmp_path, calib):
    """The graph output moved to bn_direct's output: bn_weight is dead code (it used to be a KeyError)."""
    model = cnn_with_sites()
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("bn_direct_out", onnx.TensorProto.FLOAT, None))
    path = save(model, tmp_path / "m.onnx")
    import json
    rows = {b["name"]: b["fix"] for b in json.loads(run("scan", path, "--json").output)["batchnorms"]}
    assert rows == {"bn_direct": "recalibrate", "bn_weight": "refused: 3: its output reaches no graph output, so "
                                                             "nothing measures it (and it changes no output)"}
    r = fix(path, calib, tmp_path)
    assert r.exit_code == 0 and "refused bn_weight: 3:" in r.output
    written = onnx.load(str(tmp_path / "out.onnx"))
    changed = {t.name for t, u in zip(model.graph.initializer, written.graph.initializer)
               if t.SerializeToString() != u.SerializeToString()}
    assert changed == {"bn_direct_mean", "bn_direct_var"}


def test_a_model_input_of_strings_is_a_user_error(tmp_path, calib):
    model = cnn_with_sites()
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.STRING
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)  # conftest.save would do the same; no checker run on purpose
    r = fix(path, calib, tmp_path)
    assert r.exit_code == 3 and "model input 'x' is of type STRING" in r.output


def test_a_dropout_ratio_that_is_not_a_scalar_is_a_user_error(tmp_path, calib):
    model = cnn_with_sites()
    for t in model.graph.initializer:
        if t.name == "drop_a_train":
            t.CopyFrom(onnx.numpy_helper.from_array(np.zeros(0, bool), t.name))
    path = save(model, tmp_path / "m.onnx")
    r = run("scan", path)
    assert r.exit_code == 3 and "training_mode of 0 values" in r.output


def test_seeded_fuzz_subset_finds_no_problem(tmp_path):
    """60 mutated copies of the small network through scan and fix (population, relative): exit 0/1/3 only, no
    traceback, input untouched, anything written loads in onnxruntime and holds finite, non-negative
    statistics (the next test shows that the checker reports a planted traceback and a planted NaN)."""
    import warnings

    warnings.simplefilter("ignore")
    path = save(cnn_with_sites(), tmp_path / "base.onnx")
    counts = fuzz_graphs.fuzz([Path(path)], 60, seed=7, limit_s=60, log=lambda line: pytest.fail(line))
    assert counts["models"] == 60 and counts["failed"] == 0
    assert counts["written"] > 0 and counts["scan exit 3"] > 0  # both kinds of outcome were exercised


def test_the_fuzz_checker_reports_what_it_must(tmp_path, monkeypatch):
    """A written NaN statistic and an unhandled exception are both reported (the checker can fail)."""
    import vsonnx.recalibrate as recalibrate

    path = Path(save(cnn_with_sites(), tmp_path / "base.onnx"))
    calib = fuzz_graphs.calibration_for(onnx.load(str(path)), tmp_path)
    real = recalibrate.with_statistics

    def poisoned(model, stats):
        out = real(model, stats)
        for t in out.graph.initializer:
            if t.name == "bn_weight_var":
                t.CopyFrom(onnx.numpy_helper.from_array(np.full(4, np.nan, np.float32), t.name))
        return out

    monkeypatch.setattr(recalibrate, "with_statistics", poisoned)
    monkeypatch.setattr(recalibrate, "validate", lambda *models: None)
    problems = fuzz_graphs.check_one(path, calib, tmp_path)
    assert any("non-finite initializer 'bn_weight_var'" in p for p in problems), problems

    def broken(*args, **kwargs):
        raise KeyError("planted")

    monkeypatch.setattr(recalibrate, "find_sites", broken)
    problems = fuzz_graphs.check_one(path, calib, tmp_path)
    assert any("KeyError" in p for p in problems), problems
