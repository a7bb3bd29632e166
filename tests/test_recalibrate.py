import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper as onnx_helper
from onnx import numpy_helper

import vsonnx
from vsonnx.model import get_metadata, load_model
from vsonnx.runtime import make_session

from conftest import GraphBuilder, cnn_with_sites, run, save


def initializer(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def test_fix_rewrites_only_bn_statistics_and_records_provenance(setup):
    tmp, model_path = setup
    before = Path(model_path).read_bytes()
    r = run("fix", model_path, "--calib", tmp / "calib.npz", "--batch-size", 8, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    assert report["method"] == "batch" and report["samples"] == 32
    assert {b["name"] for b in report["batchnorms"]} == {"bn_direct", "bn_weight"}
    for b in report["batchnorms"]:
        assert set(b) >= {"name", "site", "old_mean", "old_var", "new_mean", "new_var"}
    assert Path(model_path).read_bytes() == before  # input untouched
    old, new = load_model(model_path), load_model(report["output"])
    changed = {t.name for t, u in zip(old.graph.initializer, new.graph.initializer)
               if not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(u))}
    assert changed == {"bn_direct_mean", "bn_direct_var", "bn_weight_mean", "bn_weight_var"}
    assert [n.op_type for n in old.graph.node] == [n.op_type for n in new.graph.node]
    meta = get_metadata(new)
    assert meta["vsonnx.method"] == "batch" and meta["vsonnx.samples"] == "32"
    assert "vsonnx.old_statistics_sha256" in meta and meta["vsonnx.version"] == vsonnx.__version__
    # the data is identified without its path: its name and a digest of its bytes
    assert meta["vsonnx.calibration_source"] == "calib.npz" and str(tmp) not in str(meta)
    assert meta["vsonnx.calibration_sha256"] == hashlib.sha256((tmp / "calib.npz").read_bytes()).hexdigest()[:16]


def test_source_identity_names_the_data_without_its_path(tmp_path):
    from vsonnx.data import source_identity

    folder = tmp_path / "home" / "alice" / "cifar"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "1.png").write_bytes(b"x" * 10)
    first = source_identity(folder)
    assert first["calibration_source"] == "cifar" and "alice" not in str(first)
    (folder / "cat" / "2.png").write_bytes(b"y")
    assert source_identity(folder)["calibration_sha256"] != first["calibration_sha256"]  # another file: another digest
    (tmp_path / "r.py").write_text("def feeds(): return []\n")
    assert source_identity(f"{tmp_path}/r.py:feeds")["calibration_source"] == "r.py:feeds"
    assert source_identity("some.module:feeds") == {"calibration_source": "some.module:feeds"}


def test_fixed_model_reproduces_population_statistics_in_ort(setup):
    """After a population fix, the BN inputs of the fixed model have exactly the stored statistics."""
    tmp, model_path = setup
    report = vsonnx.fix(model_path, tmp / "calib.npz", output=tmp / "p.onnx", method="population", batch_size=5)
    fixed = load_model(report.output)
    from vsonnx.data import open_source
    from vsonnx.methods import estimate
    again = estimate("population", fixed, ["bn_direct", "bn_weight"], open_source(tmp / "calib.npz", fixed),
                     batch_size=32, device="cpu")
    for name in ("bn_direct", "bn_weight"):
        np.testing.assert_allclose(initializer(fixed, f"{name}_var"), again.statistics[name].var, rtol=1e-5)
        np.testing.assert_allclose(initializer(fixed, f"{name}_mean"), again.statistics[name].mean, rtol=1e-5, atol=1e-6)


def ort_predictions(model, x):
    """Independent reference: onnxruntime with graph optimisations off, numpy argmax."""
    from vsonnx.runtime import make_session

    session = make_session(model, device="cpu", optimize=False)
    return session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1)


@pytest.fixture
def site_net(tmp_path):
    """A small trained-like net whose fixes change predictions, calibration data and unlabelled val inputs."""
    import torch

    from nets_small import trained_like

    vsonnx.export(trained_like(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", exporter="torchscript")
    x = (np.random.default_rng(1).standard_normal((96, 3, 8, 8)) * 2 + 0.5).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x[:48])
    np.savez(tmp_path / "val.npz", x=x[48:])
    return tmp_path, tmp_path / "m.onnx"


def test_val_writes_the_best_candidate_and_names_it(site_net):
    """Labels = predictions of the relative fix: a candidate scores 100% and must be written; the report,
    its method and the model's metadata name the candidate whose constants were written, and the written
    model scores what the report says when evaluated independently."""
    tmp, model_path = site_net
    x = np.load(tmp / "val.npz")["x"]
    relative = vsonnx.fix(model_path, tmp / "calib.npz", output=tmp / "r.onnx", method="relative", batch_size=8)
    labels = ort_predictions(load_model(relative.output), x)
    original_top1 = 100.0 * np.mean(ort_predictions(load_model(model_path), x) == labels)
    assert original_top1 < 100  # the test is not vacuous: the fix changes some prediction
    np.savez(tmp / "val_rel.npz", x=x, y=labels)
    r = run("fix", model_path, "--calib", tmp / "calib.npz", "--val", tmp / "val_rel.npz", "--batch-size", 8,
            "--method", "population", "--json")
    report = json.loads(r.output[r.output.index("{"):])
    assert r.exit_code == 0 and report["written"]
    scores = {c["name"]: c["val_top1"] for c in report["candidates"]}
    family = {f"{m} a={a:g}" for m in ("population", "relative") for a in (0.25, 0.5, 0.75, 0.875)}
    assert set(scores) == {"original", "batch", "population", "relative", "distill"} | family
    assert report["criterion"] == "top1"
    assert scores["original"] == pytest.approx(original_top1) and scores["relative"] == 100
    assert scores[report["chosen"]] == 100 and report["method"] == report["chosen"]
    assert get_metadata(load_model(report["output"]))["vsonnx.method"] == report["chosen"]
    written = ort_predictions(load_model(report["output"]), x)
    assert 100.0 * np.mean(written == labels) == 100
    # the evidence: the chosen candidate over the original, per image hit differences, mean +- z sd / sqrt(n)
    d = (written == labels).astype(float) - (ort_predictions(load_model(model_path), x) == labels)
    half = 1.959964 * d.std(ddof=1) / np.sqrt(len(d))  # the rule's z
    first = report["evidence"][0]
    assert (first["candidate"], first["over"]) == (report["chosen"], "original")
    np.testing.assert_allclose([first["gain"], *first["ci95"]], 100 * np.array([d.mean(), d.mean() - half,
                                                                                   d.mean() + half]), atol=1e-4)
    r = run("fix", model_path, "--calib", tmp / "calib.npz", "--val", tmp / "val_rel.npz", "--batch-size", 8,
            "--method", "population", "-o", tmp / "again.onnx")
    assert f"  {report['chosen']} vs original: top-1 {first['gain']:+.2f} points, paired 95% interval" in r.output


def test_val_writes_nothing_when_the_original_is_best(site_net):
    tmp, model_path = site_net
    x = np.load(tmp / "val.npz")["x"]
    np.savez(tmp / "val_orig.npz", x=x, y=ort_predictions(load_model(model_path), x))
    r = run("fix", model_path, "--calib", tmp / "calib.npz", "--val", tmp / "val_orig.npz", "--batch-size", 8,
            "-o", tmp / "out.onnx", "--json")
    report = json.loads(r.output[r.output.index("{"):])
    assert r.exit_code == 1 and not report["written"] and not (tmp / "out.onnx").exists()
    assert report["candidates"][0]["name"] == "original" and report["candidates"][0]["val_top1"] == 100.0
    best = report["evidence"][0]  # nothing chosen: the best candidate against the original, not better
    assert best["over"] == "original" and best["gain"] <= 0 and len(report["evidence"]) == 1
    r = run("fix", model_path, "--calib", tmp / "val_orig.npz", "--val", tmp / "val_orig.npz", "--batch-size", 8)
    assert "validation data is the calibration data" in r.output


def independent_disagreement(model, fixed, x, masks=400):
    """Share of ``x`` on which ``fixed``'s class differs from the class of the dropout ensemble of ``model``,
    with other masks than the fix used (seed 99) and many of them, compared here in numpy."""
    from vsonnx.ensemble import DropoutEnsemble, scores_tensor

    classes = DropoutEnsemble(model, scores_tensor(model), seed=99, device="cpu").target({"input": x}, masks).argmax(1)
    logits = make_session(fixed, device="cpu", optimize=False).run(None, {"input": x})[0]
    return float(np.mean(logits.argmax(1) != classes))


@pytest.mark.parametrize("how", ["unlabelled --val", "--val-split"])
def test_label_free_choice_distrusts_an_ensemble_the_data_statistics_move_away_from(site_net, how):
    """Without labels the candidates are ranked by how often their class differs from the dropout ensemble's.
    On this untrained net the population fix (the data's own statistics) disagrees with the ensemble far more
    often than the original does: the ensemble is not trusted, population is written and a warning says why;
    an independent estimate (other masks, numpy) agrees that population moved away from the ensemble."""
    tmp, model_path = site_net
    extra = ["--val", tmp / "val.npz"] if how == "unlabelled --val" else ["--val-split", "0.5"]
    r = run("fix", model_path, "--calib", tmp / "calib.npz", *extra, "--batch-size", 8, "--val-masks", 64,
            "-o", tmp / "chosen.onnx", "--json")
    report = json.loads(r.output[r.output.index("{"):])
    assert r.exit_code == 0 and report["written"] and report["criterion"] == "ensemble_disagreement"
    score = {c["name"]: c["val_ensemble"] for c in report["candidates"]}
    assert all(c["val_top1"] is None for c in report["candidates"])
    assert score["population"] > score["original"] + 0.3 and report["chosen"] == "population"
    assert any("not trusted" in w for w in report["warnings"])
    if how == "--val-split":  # chosen on about half of the 48 calibration samples, then re-run on all of them
        assert 12 <= report["val_samples"] <= 36 and report["samples"] == 48
    else:
        assert report["val_samples"] == len(np.load(tmp / "val.npz")["x"])
    x = np.load(tmp / "val.npz")["x"]
    model = load_model(model_path)
    assert independent_disagreement(model, load_model(tmp / "chosen.onnx"), x) > independent_disagreement(model, model, x)


def test_val_split_writes_the_chosen_method_re_run_on_all_the_calibration_data(site_net):
    """--val-split chooses on the held-out part; what is written equals that method (at its strength a) run
    alone on all the calibration samples, the same statistics bit for bit up to float32."""
    from vsonnx.graph import GraphIndex
    from vsonnx.stats import interpolate

    tmp, model_path = site_net
    # 480 samples: with the fixture's 48, whether any candidate beats the original is a coin toss of the masks
    x = (np.random.default_rng(2).standard_normal((480, 3, 8, 8)) * 2 + 0.5).astype(np.float32)
    np.savez(tmp / "calib480.npz", x=x)
    r = run("fix", model_path, "--calib", tmp / "calib480.npz", "--val-split", "0.5", "--batch-size", 8,
            "--val-masks", 64, "--steps", 20, "-o", tmp / "chosen.onnx", "--json")
    report = json.loads(r.output[r.output.index("{"):])
    assert r.exit_code == 0 and report["written"], r.output
    method, _, a = report["chosen"].partition(" a=")
    vsonnx.fix(model_path, tmp / "calib480.npz", method=method, batch_size=8, output=tmp / "alone.onnx",
                       method_options={"distill": {"steps": 20}})
    names = [b["name"] for b in report["batchnorms"]]
    written = GraphIndex(load_model(tmp / "chosen.onnx")).stored_statistics(names)
    expected = GraphIndex(load_model(tmp / "alone.onnx")).stored_statistics(names)
    if a:
        expected = interpolate(GraphIndex(load_model(model_path)).stored_statistics(names), expected, float(a))
    for n in names:
        np.testing.assert_allclose(written[n].mean, expected[n].mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(written[n].var, expected[n].var, rtol=1e-5, atol=1e-6)


def test_candidate_models_are_what_the_fix_ranks(site_net):
    """candidate_models (the study interface of tools/suite.py) gives the candidates fix --val-split ranks:
    ranked with vsonnx.choose.rank on its held-out part they score what the fix reported, candidate by
    candidate, and the same choice follows."""
    from vsonnx.choose import rank
    from vsonnx.recalibrate import FixOptions, candidate_models

    tmp, model_path = site_net
    r = run("fix", model_path, "--calib", tmp / "calib.npz", "--val-split", "0.5", "--batch-size", 8,
            "--steps", 5, "-o", tmp / "chosen.onnx", "--json", "--force")
    report = json.loads(r.output[r.output.index("{"):])
    options = FixOptions.of(val_split=0.5, batch_size=8, method_options={"distill": {"steps": 5}})
    got = candidate_models(model_path, tmp / "calib.npz", options)
    assert ["original", *got.names] == [c["name"] for c in report["candidates"]]
    ranking = rank(got.original, got.models, got.held_out, label_free=True, batch_size=got.batch_size,
                   channelwise=got.channelwise, device="cpu")
    np.testing.assert_allclose(ranking.scores, [c["val_ensemble"] for c in report["candidates"]], rtol=1e-6)
    best, _ = ranking.choice(got.names)
    assert report["chosen"] == (got.names[best] if best is not None else "batch")
    g = GraphBuilder()
    no_site = save(g.build(g.bn(g.conv("x", 3, 4), 4)), tmp / "nodrop.onnx")
    with pytest.raises(vsonnx.VsonnxError, match="nothing to fix"):
        candidate_models(no_site, tmp / "calib.npz", FixOptions.of(batch_size=8))


def test_val_split_errors(site_net):
    tmp, model_path = site_net
    for args, needle in ((["--calib", tmp / "calib.npz", "--val-split", "1.5"], "between 0 and 1"),
                         (["--data-free", "--val-split", "0.2"], "--val-split"),
                         (["--calib", tmp / "calib.npz", "--val", tmp / "val.npz", "--val-masks", "0"], "--val-masks")):
        r = run("fix", model_path, *args, "--batch-size", 8, "--steps", 2)
        assert r.exit_code == 3 and needle in r.output, r.output


def test_fix_json_schema(setup):
    tmp, model_path = setup
    r = run("fix", model_path, "--calib", tmp / "calib.npz", "--batch-size", 8, "--json")
    report = json.loads(r.output[r.output.index("{"):])
    assert set(report) == {"schema_version", "model", "output", "written", "message", "method", "chosen", "samples",
                           "provider", "seconds", "passes", "refused", "candidates", "batchnorms", "notes", "warnings",
                           "criterion", "val_samples", "evidence", "folded"}
    assert report["schema_version"] == 1 and report["chosen"] == report["method"] == "batch"


@pytest.mark.parametrize("args,needle", [
    (["eval", "{m}", "--data", "{t}/nolabels.npy"], "no labels"),
    (["fix", "{m}", "--calib", "{t}/calib.npz", "-o", "{t}/missing/out.onnx"], "does not exist"),
    (["fix", "{m}", "--calib", "{t}/calib.npz", "-o", "{m}"], "never overwrites"),
    (["fix", "{m}", "--calib", "{t}/nothing"], "does not exist"),
    (["fix", "{m}", "--calib", "{t}/nan.npy"], "NaN"),
    (["fix", "{m}", "--calib", "{t}/calib.npz", "--batch-size", "0"], "--batch-size must be"),
    (["fix", "{m}", "--calib", "{t}/calib.npz", "--mean", "a,b"], "comma-separated"),
])
def test_cli_user_errors_exit_3_and_leave_no_output(setup, args, needle):
    tmp, model_path = setup
    np.save(tmp / "nan.npy", np.full((4, 3, 8, 8), np.nan, np.float32))
    before = Path(model_path).read_bytes()
    r = run(*[a.format(m=model_path, t=tmp) for a in args])
    assert r.exit_code == 3 and needle in r.output and "Hint:" in r.output
    assert Path(model_path).read_bytes() == before
    assert not (tmp / "m.fixed.onnx").exists()


def test_in_place_is_allowed_when_asked(setup):
    tmp, model_path = setup
    r = run("fix", model_path, "--calib", tmp / "calib.npz", "-o", model_path, "--in-place", "--batch-size", 8)
    assert r.exit_code == 0 and get_metadata(load_model(model_path))["vsonnx.method"] == "batch"


def test_nothing_to_fix_exits_0(tmp_path):
    g = GraphBuilder()
    path = save(g.build(g.node("Relu", ["x"])), tmp_path / "nobn.onnx")
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 8, 8), np.float32))
    r = run("fix", path, "--calib", tmp_path / "x.npy")
    assert r.exit_code == 0 and "no BatchNormalization" in r.output
    g = GraphBuilder()
    path = save(g.build(g.bn(g.conv("x", 3, 4), 4)), tmp_path / "nodrop.onnx")
    r = run("fix", path, "--calib", tmp_path / "x.npy")
    assert r.exit_code == 0 and "nothing to fix" in r.output and not (tmp_path / "nodrop.fixed.onnx").exists()
    r = run("fix", path, "--calib", tmp_path / "x.npy", "--all", "--batch-size", 2)
    assert r.exit_code == 0 and (tmp_path / "nodrop.fixed.onnx").exists()


def test_ignored_preprocessing_flags_warn(setup):
    tmp, model_path = setup
    r = run("eval", model_path, "--data", tmp / "val.npz", "--mean", "0.5,0.5,0.5")
    assert r.exit_code == 0 and "ignored" in r.output


def test_fixed_batch_dimension_is_rewritten_in_working_copies(setup):
    tmp, _ = setup
    model = cnn_with_sites()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4  # a static batch of 4
    path = save(model, tmp / "static.onnx")
    report = vsonnx.fix(path, tmp / "calib.npz", batch_size=10, method="population")
    assert report.written and report.samples == 32
    assert vsonnx.evaluate(report.output, tmp / "val.npz", batch_size=7).samples == 32


def test_device_choice(setup):
    tmp, model_path = setup
    from vsonnx.runtime import cuda_works

    r = run("eval", model_path, "--data", tmp / "val.npz", "--device", "cuda")
    if cuda_works():
        assert r.exit_code == 0 and "CUDAExecutionProvider" in r.output
    else:  # asked for CUDA where it cannot run: a one-line user error, no long onnxruntime log
        assert r.exit_code == 3 and "CUDA execution provider" in r.output and len(r.output.splitlines()) == 2
    r = run("eval", model_path, "--data", tmp / "val.npz", "--device", "auto")
    assert r.exit_code == 0 and r.output.count("onnxruntime provider:") == 1


def test_hard_coded_batch_in_a_reshape_is_a_user_error(tmp_path):
    g = GraphBuilder()
    h = g.bn(g.dropout("x", 0.5, "d"), 3, "bn")
    h = g.node("Reshape", [h, g.init("shape", np.array([2, -1], np.int64))], "reshape")  # batch 2 baked in
    path = save(g.build(g.gemm(h, 192, 5)), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((8, 3, 8, 8)).astype(np.float32), y=rng.integers(0, 5, 8))
    r = run("eval", path, "--data", tmp_path / "d.npz", "--batch-size", 4)
    assert r.exit_code == 3 and "--batch-size" in r.output
    assert run("eval", path, "--data", tmp_path / "d.npz", "--batch-size", 2).exit_code == 0


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_fix_works_across_opsets(tmp_path, opset):
    """Dropout in attribute (opset < 12) and input form, ReduceMean axes as attribute (< 18) or input (>= 18)."""
    results = {}
    for version in (opset, 17):
        g = GraphBuilder(seed=2, opset=version)
        h = g.conv("x", 3, 4)
        h = g.dropout(h, 0.5, "d", form="attribute" if version < 12 else "initializer")
        out = g.bn(g.node("Relu", [g.bn(h, 4, "bn_a")]), 4, "bn_b")
        path = save(g.build(out), tmp_path / f"m{version}.onnx")
        np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((24, 3, 8, 8)).astype(np.float32))
        results[version] = {m: vsonnx.fix(path, tmp_path / "x.npy", method=m, batch_size=8,
                                          output=tmp_path / f"m{version}.{m}.onnx") for m in ("batch", "population")}
    for m in ("batch", "population"):
        for a, b in zip(results[opset][m].batchnorms, results[17][m].batchnorms):
            np.testing.assert_allclose(a["new_var"], b["new_var"], rtol=1e-5)


def test_float16_model(tmp_path):
    """Moments of float16 tensors are taken in float32; the BN keeps its float16 statistics."""
    from onnx import TensorProto, helper

    c = 3
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "r"), numpy_helper.from_array(np.array(False), "t")]
    inits += [numpy_helper.from_array(v.astype(np.float16), n)
              for n, v in [("s", np.ones(c)), ("b", np.zeros(c)), ("m", np.zeros(c)), ("v", np.full(c, 2.0))]]
    nodes = [helper.make_node("Dropout", ["x", "r", "t"], ["d"], name="drop"),
             helper.make_node("BatchNormalization", ["d", "s", "b", "m", "v"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "f16", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", c, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", c, 4, 4])], inits)
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "h.onnx")
    x = np.random.default_rng(0).standard_normal((16, c, 4, 4)).astype(np.float16)
    np.save(tmp_path / "x.npy", x)
    report = vsonnx.fix(path, tmp_path / "x.npy", method="population", batch_size=8)
    expected = x.astype(np.float64).transpose(1, 0, 2, 3).reshape(c, -1).var(1)
    np.testing.assert_allclose(report.batchnorms[0]["new_var"], expected, rtol=1e-6)
    assert initializer(load_model(report.output), "v").dtype == np.float16
    unbiased = x.astype(np.float64).transpose(1, 0, 2, 3).reshape(c, -1).var(1, ddof=1)
    for threads in (1, 2):  # float16 BNs get their batch statistics from operators in the graph at any thread count
        report = vsonnx.fix(path, tmp_path / "x.npy", method="batch", batch_size=16, threads=threads,
                            output=tmp_path / f"b{threads}.onnx")
        np.testing.assert_allclose(report.batchnorms[0]["new_var"], unbiased, rtol=1e-5)


@pytest.mark.parametrize("method", ["batch", "population", "relative"])
def test_written_model_keeps_what_the_fix_did_not_mean_to_change(tmp_path, method):
    """Working copies go through onnx-graphsurgeon (which drops metadata and, for IR 3, the initializers
    listed among the graph inputs); the written model is the input with new BN constants: same IR, opsets,
    graph inputs (IR 3 initializers included), node order and metadata (model and node), plus provenance."""
    from vsonnx.model import set_metadata

    model = cnn_with_sites()
    model.ir_version = 3
    model.graph.input.extend(onnx_helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    set_metadata(model, {"author": "someone", "vsonnx.preprocess": "{}"})
    note = model.graph.node[0].metadata_props.add()
    note.key, note.value = "pkg.torch.onnx.name_scopes", "['', 'conv1']"
    path = save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32))
    report = vsonnx.fix(path, tmp_path / "x.npy", output=tmp_path / "o.onnx", method=method, batch_size=8)
    fixed = load_model(report.output)
    assert fixed.ir_version == 3 and list(fixed.opset_import) == list(model.opset_import)
    assert [i.name for i in fixed.graph.input] == [i.name for i in model.graph.input]
    assert [(n.name, n.op_type, list(n.input)) for n in fixed.graph.node] == \
        [(n.name, n.op_type, list(n.input)) for n in model.graph.node]
    assert list(fixed.graph.node[0].metadata_props) == list(model.graph.node[0].metadata_props)
    meta = get_metadata(fixed)
    assert meta["author"] == "someone" and meta["vsonnx.preprocess"] == "{}" and meta["vsonnx.method"] == method


ZOO = Path(onnx_helper.__file__).parent / "backend" / "test" / "data" / "light"


@pytest.mark.parametrize("name,bns", [
    ("shufflenet", 49),
    pytest.param("resnet50", 53, marks=pytest.mark.slow),
    pytest.param("inception_v2", 69, marks=pytest.mark.slow),
    pytest.param("densenet121", 121, marks=pytest.mark.slow),
])
@pytest.mark.parametrize("method", ["batch", "population", "relative"])
def test_classic_model_zoo_models_fix_with_every_method(tmp_path, name, bns, method):
    """IR 3 / opset 9, initializers listed as graph inputs, BN statistics from ConstantOfShape nodes, a batch
    of 1 baked into Reshapes (the light copies onnx ships): with default flags (the batch size follows the
    declared batch of 1) every BN is recalibrated and the written model stays a valid IR 3 model whose BN
    statistics are initializers; a classifier's Softmax is no folding evidence (no 'look folded' warning)."""
    path = ZOO / f"light_{name}.onnx"
    if not path.exists():
        pytest.skip("this onnx package ships no light Model Zoo copies")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32))
    report = vsonnx.fix(path, tmp_path / "x.npy", output=tmp_path / "o.onnx", method=method, scope="all")
    assert report.written and len(report.batchnorms) == bns and not report.refused
    assert not [w for w in report.warnings if "look folded" in w]
    fixed = load_model(tmp_path / "o.onnx")
    inits = {t.name for t in fixed.graph.initializer}
    assert fixed.ir_version == 3 and inits <= {i.name for i in fixed.graph.input}
    assert all(set(n.input[3:5]) <= inits for n in fixed.graph.node if n.op_type == "BatchNormalization")
    if method == "population":  # exact inference statistics: each BN's input has its stored moments
        moments = bn_input_moments(fixed, np.load(tmp_path / "x.npy"))
        by_name = {b["name"]: b for b in report.batchnorms}
        for node in (n for n in fixed.graph.node if n.op_type == "BatchNormalization"):
            mean, var = moments[node.input[0]]
            got = by_name[node.name]
            np.testing.assert_allclose(got["new_mean"], mean, rtol=1e-3, atol=1e-4 * np.sqrt(var.max()) + 1e-6)
            # vsonnx sums float32 moments of x - s, s the stored mean: where s is far from the real mean
            # (the light copies' ConstantOfShape statistics) E[y^2] - E[y]^2 cancels at float32 precision
            far = ((mean - np.asarray(got["old_mean"])) ** 2).max()
            np.testing.assert_allclose(got["new_var"], var, rtol=2e-3, atol=1e-3 * var.max() + 1e-6 * far)


def bn_input_moments(model, x):
    """{BN input tensor: (mean, biased var) per channel over the samples of x} from onnxruntime with graph
    optimisations off, one sample per run (the models bake a batch of 1 into Reshapes), combined in numpy."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    tensors = [n.input[0] for n in probe.graph.node if n.op_type == "BatchNormalization"]
    probe.graph.output.extend(onnx_helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = next(i.name for i in session.get_inputs())
    runs = [session.run(tensors, {feed: x[k:k + 1]}) for k in range(len(x))]
    moments = {}
    for j, t in enumerate(tensors):
        values = np.concatenate([r[j].astype(np.float64) for r in runs])  # [N, C, H, W]
        flat = values.transpose(1, 0, *range(2, values.ndim)).reshape(values.shape[1], -1)
        moments[t] = flat.mean(1), flat.var(1)
    return moments


def test_a_source_object_calibrates_with_labelled_validation(setup):
    """Sources passed from Python (e.g. ArraySource) work with --val (the same-data check used to call
    Path() on them)."""
    from vsonnx.data import ArraySource

    tmp, model_path = setup
    z = np.load(tmp / "calib.npz")
    calib = ArraySource.from_arrays(load_model(model_path), z["x"], None, shuffle=False)
    report = vsonnx.fix(model_path, calib, output=tmp / "o.onnx", val=tmp / "val.npz", batch_size=8, force=True)
    assert report.written and report.criterion == "top1" and len(report.candidates) > 2


def test_fix_all_labels_bns_with_no_site_before_them(tmp_path):
    """--all re-estimates every BN; one before any dropout is neither a site nor downstream of one."""
    from conftest import GraphBuilder, save

    g = GraphBuilder()
    h = g.node("Relu", [g.bn(g.conv("x", 3, 4), 4, "bn_first")])
    h = g.bn(g.dropout(g.conv(h, 4, 4), 0.5, "d"), 4, "bn_site")
    h = g.bn(g.conv(g.node("Relu", [h]), 4, 4), 4, "bn_after")
    path = save(g.build(h), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32))
    report = vsonnx.fix(path, tmp_path / "x.npy", output=tmp_path / "o.onnx", scope="all", method="population")
    assert {b["name"]: b["site"] for b in report.batchnorms} == {"bn_first": "none", "bn_site": "direct",
                                                                 "bn_after": "downstream"}


def test_fix_options_groups_and_flat_keywords_are_the_same_settings():
    """FixOptions.of routes vsonnx.fix's flat keywords to fix --help's groups (the README shows both forms);
    an unknown keyword is a TypeError naming it."""
    from vsonnx.fix_options import KEYWORDS, ChoiceOptions, FixOptions, OutputOptions, RuntimeOptions

    flat = FixOptions.of(val="v", threads=2, output="o.onnx", method_options={"distill": {"steps": 5}},
                         scope="all", seed=3, preprocess={"size": [8, 8]})
    grouped = FixOptions(choice=ChoiceOptions(val="v"), runtime=RuntimeOptions(threads=2),
                         output=OutputOptions(path="o.onnx"), preprocess={"size": [8, 8]})
    assert flat.choice == grouped.choice and flat.runtime == grouped.runtime and flat.output == grouped.output
    assert flat.method.settings == {"distill": {"steps": 5}} and flat.method.scope == "all" and flat.data.seed == 3
    assert flat.choice.choosing and not FixOptions().choice.choosing
    assert {"output", "method_options", "batch_size", "val_split", "synthetic", "in_place"} <= set(KEYWORDS)
    with pytest.raises(TypeError, match="batchsize"):
        FixOptions.of(batchsize=8)
    with pytest.raises(vsonnx.VsonnxError):  # settings are still checked once
        FixOptions.of(batch_size=0)


def test_a_model_given_in_memory_is_fixed_checked_and_left_unchanged(tmp_path):
    """vsonnx.fix, scan, evaluate and compare take a ModelProto as they take a path: fixed into the output it
    needs (the same statistics as from the file), checked like a loaded model, the caller's proto untouched."""
    model = cnn_with_sites()
    before = model.SerializeToString()
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32))
    from_proto = vsonnx.fix(model, tmp_path / "x.npy", method="population", output=tmp_path / "a.onnx")
    from_file = vsonnx.fix(save(model, tmp_path / "m.onnx"), tmp_path / "x.npy", method="population",
                           output=tmp_path / "b.onnx")
    assert from_proto.written and from_proto.model == "<memory>" and model.SerializeToString() == before
    constants = [{t.name: t.raw_data for t in onnx.load(str(p)).graph.initializer} for p in (tmp_path / "a.onnx",
                                                                                            tmp_path / "b.onnx")]
    assert constants[0] == constants[1]
    with pytest.raises(vsonnx.VsonnxError, match="needs an output path"):
        vsonnx.fix(model, tmp_path / "x.npy")
    assert vsonnx.scan(model).model == "<memory>"
    model.opset_import[0].version = 5
    with pytest.raises(vsonnx.VsonnxError, match="the model given in memory uses ONNX opset 5"):
        vsonnx.scan(model)
