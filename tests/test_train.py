import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vsonnx.data.cifar import load_cifar

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    """tools/NAME.py as the module ``NAME_tool``."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def image_tree(root: Path, per_class: int = 6, classes: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(25 * c, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


def test_training_smoke_run_writes_model_and_card(tmp_path):
    data = image_tree(tmp_path / "data")
    out = tmp_path / "run"
    train = load_tool("train")
    result = train.main(["--arch", "preresnet", "--depth", "8", "--dropout", "0.5", "--placement", "a",
                         "--data", str(data), "--epochs", "2", "--batch-size", "16", "--out", str(out),
                         "--seed", "1", "--no-progress"])
    for name in ("model.onnx", "card.json", "card.md", "config.json", "log.csv", "log.json", "checkpoint.pt"):
        assert (out / name).exists(), name
    card = json.loads((out / "card.json").read_text())
    assert card["epochs"] == 2 and 0 <= card["pytorch_test_acc"] <= 100 and card["test_samples"] == 20
    import vsonnx
    report = vsonnx.scan(out / "model.onnx")
    assert len(report.sites) == 3 and {b.path for b in report.sites} == {"direct"}
    assert result["dropout"] == {"placement": "a", "ratio": 0.5, "noise": "dropout"}
    resumed = train.main(["--arch", "preresnet", "--depth", "8", "--dropout", "0.5", "--placement", "a",
                          "--data", str(data), "--epochs", "3", "--batch-size", "16", "--out", str(out),
                          "--seed", "1", "--no-progress", "--resume", "--no-export"])
    assert len(json.loads((out / "log.json").read_text())) == 3 and resumed["epochs"] == 3


def test_export_only_exports_the_finished_checkpoint_with_the_runs_facts(tmp_path):
    """A run trained with --no-export (a GPU machine without the exporter) exported later: the ONNX computes what
    the checkpoint's network computes, the card keeps the training run's command, and a checkpoint short of
    the card's epochs or a folder without a run is refused."""
    import torch

    from vsonnx import VsonnxError
    from vsonnx.model import load_model
    from vsonnx.nets import DropoutConfig, build
    from vsonnx.runtime import make_session

    data, out = image_tree(tmp_path / "data"), tmp_path / "run"
    train = load_tool("train")
    trained = train.main(["--arch", "preresnet", "--depth", "8", "--dropout", "0.5", "--placement", "a",
                          "--data", str(data), "--epochs", "1", "--batch-size", "16", "--out", str(out),
                          "--seed", "1", "--no-progress", "--no-export"])
    assert not (out / "model.onnx").exists()
    exported = train.main(["--export-only", "--out", str(out), "--data", str(data)])
    assert exported["command"] == trained["command"] and exported["onnx"] == str(out / "model.onnx")
    net = build("preresnet", 8, 10, DropoutConfig("a", 0.5, "dropout")).eval()
    net.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=False)["model"])
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    got = make_session(load_model(out / "model.onnx"), device="cpu", optimize=False).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, net(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)
    card = json.loads((out / "card.json").read_text())
    (out / "card.json").write_text(json.dumps({**card, "epochs": 2}))
    with pytest.raises(VsonnxError, match="epoch 1 of 2"):
        train.main(["--export-only", "--out", str(out), "--data", str(data)])
    with pytest.raises(VsonnxError, match="no config.json, card.json, checkpoint.pt"):
        train.main(["--export-only", "--out", str(tmp_path / "nothing"), "--data", str(data)])


def test_missing_data_names_the_flag(tmp_path):
    import vsonnx
    with pytest.raises(vsonnx.VsonnxError, match="--data"):
        load_cifar("cifar10", tmp_path / "nothing")


@pytest.mark.slow
def test_two_process_gloo_ddp(tmp_path):
    data = image_tree(tmp_path / "data", per_class=4)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "tools" / "train.py"), "--depth", "8", "--placement", "b", "--dropout", "0.3",
           "--data", str(data), "--epochs", "1", "--batch-size", "8", "--out", str(out), "--no-progress",
           "--threads", "1", "--sync-bn"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = json.loads((out / "card.json").read_text())
    assert card["world_size"] == 2 and (out / "model.onnx").exists()


def test_train_script_user_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--data", str(tmp_path / "none"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and "--data" in proc.stderr and "Traceback" not in proc.stderr




def test_suite_options_reach_the_network_and_the_optimiser():
    """--bn-momentum (a number or 'cumulative'), --optimizer adam, --width/--head of the plain CNN."""
    train = load_tool("train")
    import torch

    args = train.parse_args(["--arch", "plain", "--depth", "6", "--width", "8", "--head", "mlp", "--placement", "a",
                             "--dropout", "0.3", "--noise", "dropout2d", "--bn-momentum", "cumulative",
                             "--optimizer", "adam", "--lr", "0.002", "--no-augment", "--out", "unused"])
    assert args.bn_momentum is None and not args.augment
    run = train.Run(args, 0, 1, 0, "cpu", torch.device("cpu"))
    model, _, dropout = train.build_network(run, 10)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 7 and all(m.momentum is None for m in bns)  # 6 conv BNs + the head's BatchNorm1d
    assert sum(isinstance(m, torch.nn.Dropout2d) for m in model.modules()) == 6  # the head's is element-wise
    assert isinstance(train.make_optimizer(model, args), torch.optim.AdamW)
    assert train.bn_momentum("0.01") == 0.01
    with pytest.raises(Exception):
        train.bn_momentum("1.5")


def test_the_committed_suite_halves_are_the_seeded_assignment():
    """The design/check split was fixed before any evaluation: the file must stay what the seed gives."""
    sys.path.insert(0, str(ROOT / "tools"))
    from suite_members import FRESH, HALVES_SEED, MEMBERS, TWINS, halves

    committed = json.loads((ROOT / "models" / "suite" / "halves.json").read_text())
    assert committed == {"seed": HALVES_SEED, "halves": halves(HALVES_SEED)}
    assert set(committed["halves"]) == set(MEMBERS) - set(TWINS.values())
    seeded = [half for name, half in committed["halves"].items() if name not in FRESH]
    assert seeded.count("design") == len(seeded) // 2
    assert {committed["halves"][name] for name in FRESH} <= {"check"}  # trained after the rules were fixed


def test_suite_table_shows_each_column_and_the_gap_to_the_ensemble():
    sys.path.insert(0, str(ROOT / "tools"))
    from suite import COLUMNS, suite_markdown

    top1 = dict(zip(COLUMNS, [50.0, 57.9, 57.85, 57.73, 59.5, 56.94, 57.77, 59.5, 59.96]))
    entry = {"name": "m", "half": "check", "arch": "preresnet", "placement": "a", "rate": 0.5, "top1": top1,
             "chosen": {"label-free": "relative a=0.75"}}
    text = suite_markdown([entry])
    row = next(line for line in text.splitlines() if line.startswith("| m |"))
    assert "57.77 (relative a=0.75)" in row and row.endswith("| -0.46 |")  # best fix 59.50 - ensemble 59.96
    assert "## check half" in text and "## design half" not in text and "Fresh (*)" not in text
    text = suite_markdown([entry, {**entry, "name": "f", "fresh": True}])
    assert "| f* |" in text and "Fresh (*)" in text


def test_suite_signals_on_a_hand_built_case():
    """Two images, three classes, two masks: each signal against its value worked out by hand."""
    sys.path.insert(0, str(ROOT / "tools"))
    from suite_signals import per_sample

    big = 30.0  # softmax of (big, 0, 0) is one-hot to 1e-13
    ensemble = np.array([[[big, 0, 0], [0, big, 0]],      # mask 1: classes 0, 1
                         [[big, 0, 0], [0, 0, big]]])     # mask 2: classes 0, 2 -> p2 = (0, .5, .5)
    logits = np.array([[[0, 0, 0], [0, 0, 0]],            # "original": uniform
                       [[big, 0, 0], [0, big, 0]],        # candidate A: classes 0, 1
                       [[0, big, 0], [0, big, 0]]])       # candidate B: classes 1, 1
    s = per_sample(logits, ensemble)
    # the ensemble's classes: 0 and 1 (the tie of image 2 goes to the first maximum)
    np.testing.assert_allclose(s["agree"], [[1, 0], [1, 1], [0, 1]])  # uniform scores: argmax is class 0
    np.testing.assert_allclose(s["ce"][0], [np.log(3)] * 2)
    np.testing.assert_allclose(s["ce"][1], [0, 0], atol=1e-9)
    np.testing.assert_allclose(s["entropy"][0], [np.log(3)] * 2)
    # image 2: p = (0, .5, .5), q = (~0, 1, e^-30): 0.5 log(0.5 / 1) + 0.5 log(0.5 / e^-30) = 15 - log 2
    np.testing.assert_allclose(s["kl"][1], [0, 15 - np.log(2)], atol=1e-9)
    np.testing.assert_allclose(s["brier"][1], [0, 0.25 + 0.25], atol=1e-9)
    # the candidates' majority class per image: image 1 tied 0/1 -> 0; image 2: 1
    np.testing.assert_allclose(s["consensus"], [[1, 0], [1, 1], [0, 1]])


def test_which_method_when_counts_winners_and_gaps_per_situation():
    sys.path.insert(0, str(ROOT / "tools"))
    from suite import which_method

    def entry(name, placement, top):
        return {"name": name, "half": "design", "placement": placement, "noise": "dropout",
                "top1": dict(zip(("batch", "population", "relative", "distill", "data-free", "label-free",
                                  "labelled"), top))}

    rows = which_method([entry("m1", "a", [50, 51, 52, 54, 49, 52, 54]),    # distill best by 2
                         entry("m2", "b", [60, 61, 62, 61.5, 60, 61.5, 62]),  # relative best
                         {"name": "t", "half": "twin", "placement": "none", "noise": "dropout", "top1": {}}])
    by_label = {r.split(" | ")[0].lstrip("| "): r for r in rows[2:]}
    assert by_label["dropout right before BN (placement a)"].split(" | ")[1:4] == [
        "1", "`--method distill` (worst +0.00)", "distill 1"]
    every = by_label["every member"].split(" | ")
    # use: the best median gap, distill (-0.25) before relative (-1.00)
    assert every[1:4] == ["2", "`--method distill` (worst -0.50)", "relative 1, distill 1"]
    # medians over the two members: batch (-4, -2) -> -3; distill (0, -0.5) -> -0.25; label-free (-2, -0.5)
    assert every[4] == "-3.00 / -2.00 / -1.00 / -0.25 / -3.50"
    assert every[5] == "-1.25, -2.00" and every[6].rstrip(" |") == "+0.00, +0.00"


def test_choices_per_half_give_what_the_check_half_must_meet():
    sys.path.insert(0, str(ROOT / "tools"))
    from suite import choices_per_half
    from suite_signals import SINGLE

    def entry(half, original, single, label_free, labelled, intervals=None):
        return {"half": half, "top1": {"original": original, **dict(zip(SINGLE, single)),
                                       "label-free": label_free, "labelled": labelled},
                **({"gap_interval": intervals} if intervals is not None else {})}

    members = [entry("check", 50, [55, 56, 57, 58, 54], 57.5, 58, {"label-free": [-0.5, -0.8, -0.2]}),  # resolved
               entry("check", 60, [59, 59, 59, 59, 59], 59, 58.95, {}),   # below the original
               entry("check", 40, [45, 45, 45, 46, 45], 46, 45.8, {"labelled": [-0.2, -0.5, 0.1]}),  # not resolved
               entry("twin", 40, [40] * 5, 40, 40)]
    rows = choices_per_half(members)
    assert len(rows) == 3  # header, rule, the check half (no design members, twins never counted)
    assert rows[2] == "| check | 3 | +0.00, -0.50 | 1 of 3 | -0.05, -0.20 | 2 of 3 | label-free 1, labelled 0 |"
    del members[1]["gap_interval"]  # not measured yet: no count
    assert choices_per_half(members)[2].endswith("| 2 of 3 | - |")
    members[2]["fresh"] = True  # trained after the rules were fixed: counted in the check half and on its own
    rows = choices_per_half(members)
    assert rows[2].startswith("| check | 3 |")
    assert rows[3] == ("| check, fresh only (*), no † | 1 | +0.00, +0.00 | 0 of 1 | -0.20, -0.20 | 0 of 1 "
                       "| label-free 0, labelled 0 |")
    members[0]["decided_on"] = ["a rule"]  # a later rule was decided on it: left out of the rows without daggers
    rows = choices_per_half(members)
    assert rows[2].startswith("| check | 3 |") and len(rows) == 5
    assert rows[3].startswith("| check, no rule decided on them (no †) | 2 | +0.00, +0.00 | 1 of 2 | -0.12, -0.20 |")
    assert rows[4].startswith("| check, fresh only (*), no † | 1 |")


def test_trusted_agreement_falls_back_to_population_where_the_ensemble_disagrees_with_the_data():
    sys.path.insert(0, str(ROOT / "tools"))
    from suite_signals import compare_rules, trusted_agreement

    def entry(agree, tops):
        names = ("batch", "population", "relative", "distill")
        return {"signals": {"models": {"original": {"agree": 0.99}, **{n: {"agree": a} for n, a in zip(names, agree)}}},
                "top1": dict(zip(names, tops)), "candidates_top1": dict(zip(names, tops))}

    healthy = entry((0.8, 0.8, 0.85, 0.95), (56, 56, 56.5, 57))      # distill agrees most and is best
    stale = entry((0.42, 0.41, 0.8, 0.97), (63.7, 63.7, 45, 37))     # the ensemble itself is wrong
    rule = trusted_agreement(0.6)
    assert (rule(healthy), rule(stale)) == ("distill", "population")
    (name, median, worst, mean), = compare_rules([healthy, stale], [rule])
    assert (median, worst) == (0.0, 0.0)


def test_agreement_margin_keeps_relative_unless_the_challenger_agrees_clearly_more():
    """Hypothesis M: a challenger that replaced relative (the fewest disagreements) stays only where it disagrees
    with the ensemble on at least 2 points fewer held-out images; fallbacks to population are left alone."""
    sys.path.insert(0, str(ROOT / "tools"))
    from suite_signals import agreement_margin

    def entry(chosen, relative, distill, population=0.2):
        return {"chosen": {"label-free": chosen}, "signals": {"fix_scores": {
            "criterion": "ensemble_disagreement", "original": 0.3, "population": population, "relative": relative,
            "distill": distill}}}

    rule = agreement_margin(2.0)
    assert rule(entry("distill", 0.100, 0.085)) == "relative"      # 1.5 points fewer: not enough
    assert rule(entry("distill", 0.100, 0.079)) == "distill"       # 2.1 points fewer
    assert rule(entry("relative", 0.100, 0.050)) == "relative"     # the fix kept relative: unchanged
    assert rule(entry("population", 0.100, 0.090, 0.4)) == "population"  # a fallback, not the fewest: unchanged


def test_small_shift_population_applies_only_below_the_threshold():
    """Hypothesis P: population where the original disagrees with the ensemble on under 16% of held-out images,
    the fix's choice elsewhere."""
    sys.path.insert(0, str(ROOT / "tools"))
    from suite_signals import small_shift_population

    def entry(original):
        return {"chosen": {"label-free": "distill"}, "signals": {"fix_scores": {"original": original}}}

    rule = small_shift_population(0.16)
    assert (rule(entry(0.15)), rule(entry(0.16)), rule(entry(0.40))) == ("population", "distill", "distill")


def test_suite_resolution_is_the_paired_interval_of_the_stored_models(setup):
    """measure scores the chosen and the best model, checks their stored top-1 and gives the gap's paired 95%
    interval, checked against hits counted with a plain onnxruntime session (graph optimisations off)."""
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT / "tools"))
    from suite_resolution import measure, needed, resolution_table, single_hits

    from vsonnx.data.sources import open_source
    from vsonnx.model import load_model
    from vsonnx.recalibrate import FixOptions, candidate_models

    from conftest import cnn_with_sites, save

    tmp, _ = setup
    model_path = save(cnn_with_sites(seed=3), tmp / "m3.onnx")  # its candidates' classes differ (seed 0's do not)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((400, 3, 8, 8)) + 0.3).astype(np.float32)
    got = candidate_models(model_path, tmp / "calib.npz", FixOptions.of(threads=1, device="cpu"))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    logits = {n: ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
              .run(None, {"x": x})[0] for n, m in zip(got.names, got.models)}
    y = np.where(rng.random(400) < 0.5, logits["relative"].argmax(1), rng.integers(0, 5, 400))
    np.savez(tmp / "test.npz", x=x, y=y)
    hits = {n: (v.argmax(1) == y).astype(np.float64) for n, v in logits.items()}
    top1 = {n: round(100 * h.mean(), 2) for n, h in hits.items()}
    best = max(("batch", "population", "relative", "distill"), key=top1.__getitem__)
    chosen = min(top1, key=top1.__getitem__)
    assert top1[chosen] < top1[best], top1
    entry = {"name": "m", "half": "check", "top1": {m: top1[m] for m in ("batch", "population", "relative", "distill")},
             "candidates_top1": top1, "chosen": {"label-free": chosen, "labelled": best}}
    assert needed(entry) == {"label-free": (chosen, best)}  # the labelled choice is the best: no interval
    test = open_source(tmp / "test.npz", load_model(model_path), shuffle=False)
    models = dict(zip(got.names, got.models))
    got_interval = measure(entry, models, test, threads=1)
    d = hits[chosen] - hits[best]
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    np.testing.assert_allclose(got_interval["label-free"], 100 * np.array([d.mean(), d.mean() - half,
                                                                          d.mean() + half]), atol=0.006)
    entry["gap_interval"] = got_interval
    row = resolution_table([entry])[2]
    assert row.startswith(f"| m | check | label-free | {chosen} | {best} | ")
    assert row.endswith(" | yes |") == (got_interval["label-free"][2] < 0)
    models["data-free"] = got.original  # single_hits scores every single method: here the original as data-free
    original = (ort.InferenceSession(got.original.SerializeToString(), options, providers=["CPUExecutionProvider"])
                .run(None, {"x": x})[0].argmax(1) == y)
    entry["top1"]["data-free"] = round(100 * original.mean(), 2)
    got_hits, moved = single_hits(entry, models, test, threads=1)
    np.testing.assert_array_equal(got_hits, np.stack([*(hits[m] for m in ("batch", "population", "relative",
                                                                         "distill")), original]))
    assert moved == {}
    entry["top1"]["data-free"] -= 0.04  # within REBUILT_TOLERANCE: reported, not refused
    assert single_hits(entry, models, test, threads=1)[1] == {"data-free": round(100 * original.mean(), 2)}
    entry["top1"]["data-free"] -= 0.04
    with pytest.raises(SystemExit, match="evaluate the member again"):
        single_hits(entry, models, test, threads=1)
    entry["candidates_top1"] = {**top1, chosen: top1[chosen] + 0.5}  # not what the models score now
    with pytest.raises(SystemExit, match="evaluate the member again"):
        measure(entry, models, test, threads=1)


def test_validation_bias_is_distills_validation_advantage_minus_its_test_advantage():
    sys.path.insert(0, str(ROOT / "tools"))
    from suite_resolution import validation_bias

    def entry(half, val, test):
        return {"half": half, "signals": {"val_top1": dict(zip(("relative", "population", "distill"), val))},
                "candidates_top1": dict(zip(("relative", "population", "distill"), test))}

    rows = validation_bias([entry("design", (50, 50, 51), (60, 60, 60.5)),   # +0.5 / +0.5
                            entry("design", (50, 49, 50), (60, 59, 61)),     # -1.0 / -1.0
                            entry("design", (50, 50, 52), (60, 61, 61)),     # +1.0 / +2.0
                            entry("check", (40, 40, 40), (50, 50, 50)), {"half": "check"}])
    assert rows[2] == "| design | 3 | +0.50 | +0.50 | 2 of 3 |"
    assert rows[3] == "| check | 1 | +0.00 | +0.00 | 0 of 1 |"


def test_ideal_labelled_chooser_matches_the_exact_trinomial_probability():
    """Two methods: A right and B wrong on 30 of 1,000 images, B right and A wrong on 20, equal elsewhere, so A is
    1.0 point better and the only one within 0.1. With n drawn images the chooser takes A when A's hits exceed
    B's, half the time on a tie: P = sum over the trinomial (x, y) of [x > y] + [x = y] / 2."""
    from math import comb

    sys.path.insert(0, str(ROOT / "tools"))
    from suite_resolution import ideal_labelled

    a = np.r_[np.ones(30), np.zeros(20), np.ones(600), np.zeros(350)].astype(bool)
    b = np.r_[np.zeros(30), np.ones(20), np.ones(600), np.zeros(350)].astype(bool)
    n, pa, pb = 60, 0.03, 0.02
    exact = sum(comb(n, x) * comb(n - x, y) * pa ** x * pb ** y * (1 - pa - pb) ** (n - x - y)
                * (1.0 if x > y else 0.5 if x == y else 0.0) for x in range(n + 1) for y in range(n + 1 - x))
    draws = 40000
    share = ideal_labelled(np.stack([a, b]), n, draws=draws, seed=1)
    assert abs(share - exact) < 4 * np.sqrt(exact * (1 - exact) / draws), (share, exact)
    assert ideal_labelled(np.stack([b, a]), n, draws=draws, seed=1) == pytest.approx(share, abs=0.02)  # order
    assert ideal_labelled(np.stack([a, a.copy()]), 5) == 1.0  # both are the best
    assert ideal_labelled(np.stack([a, b]), n, within=1.0) == 1.0  # both within 1.0 point


def test_ideal_table_sums_and_multiplies_the_members_shares():
    sys.path.insert(0, str(ROOT / "tools"))
    from suite_resolution import IDEAL_SAMPLES, ideal_table

    def entry(half, labelled, share, **more):
        top1 = {"batch": 50.0, "population": 49.0, "relative": 49.0, "distill": 48.0, "data-free": 47.0,
                "label-free": 50.0, "labelled": labelled}
        return {"half": half, "top1": top1, "candidates_top1": {},
                "ideal_labelled": {str(n): share for n in IDEAL_SAMPLES}, **more}

    rows = ideal_table([entry("check", 50.0, 0.5), entry("check", 49.9, 0.8), entry("check", 49.0, 1.0),
                        entry("design", 50.0, 1.0, ideal_rebuilt_top1={"distill": 48.03}),
                        {"half": "check", "top1": {}}])
    assert rows[2] == "| design | 1 | 1, 1 of 1 |" + " 1.0 of 1, 1 |" * len(IDEAL_SAMPLES)
    assert rows[3] == "| check | 3 | 3, 2 of 3 |" + " 2.3 of 3, 0.4 |" * len(IDEAL_SAMPLES)
    assert "On 1 members a rebuilt distill or data-free model" in rows[-1] and "up to 0.03 points" in rows[-1]


def test_suite_merge_copies_resolved_members_of_parallel_runs_unchanged(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    from suite import merge

    def entry(name, **more):
        return {"name": name, "half": "check", "arch": "plain", "placement": "a", "rate": 0.3, "top1": {}, **more}

    results = tmp_path / "suite.json"
    results.write_text(json.dumps([entry("old", gap_interval={})]))
    part = tmp_path / "part.json"
    part.write_text(json.dumps([entry("new", gap_interval={}, seconds={"x": 1})]))
    assert merge([part], results) == ["new"]
    merged = {e["name"]: e for e in json.loads(results.read_text())}
    assert set(merged) == {"old", "new"} and merged["new"]["seconds"] == {"x": 1}
    assert (tmp_path / "SUITE.md").exists()
    with pytest.raises(SystemExit):  # already there
        merge([part], results)
    part.write_text(json.dumps([entry("unresolved")]))
    with pytest.raises(SystemExit):
        merge([part], results)


def test_suite_merge_of_a_field_copies_it_into_members_already_there(tmp_path):
    """``merge --field``: parallel ``ideal`` runs on copies of suite.json each add a field to other members."""
    sys.path.insert(0, str(ROOT / "tools"))
    from suite import merge

    def entry(name, **more):
        return {"name": name, "half": "check", "arch": "plain", "placement": "a", "rate": 0.3, "top1": {"batch": 50.0},
                **more}

    results = tmp_path / "suite.json"
    results.write_text(json.dumps([entry("m1"), entry("m2"), entry("m3")]))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([entry("m1", ideal_labelled={"2000": 0.5}), entry("m2"), entry("m3")]))
    b.write_text(json.dumps([entry("m1"), entry("m2", ideal_labelled={"2000": 1.0}), entry("m3")]))
    assert merge([a, b], results, field="ideal_labelled") == ["m1", "m2"]
    merged = {e["name"]: e for e in json.loads(results.read_text())}
    assert merged["m1"]["ideal_labelled"] == {"2000": 0.5} and "ideal_labelled" not in merged["m3"]
    assert merge([a], results, field="ideal_labelled") == []  # the same value again: nothing to copy
    a.write_text(json.dumps([entry("m1", ideal_labelled={"2000": 0.7})]))
    with pytest.raises(SystemExit):  # a different value of a field already there
        merge([a], results, field="ideal_labelled")
    b.write_text(json.dumps([entry("m3", ideal_labelled={"2000": 0.7}, top1={"batch": 51.0})]))
    with pytest.raises(SystemExit):  # another member than the one in results
        merge([b], results, field="ideal_labelled")


def test_the_suite_tools_help_renders_for_every_step(capsys):
    """argparse %-formats help strings: a bare '%' breaks --help (it did for ``resolve``)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from suite import main

    for argv in (["--help"], *([step, "--help"] for step in ("assign", "tables", "merge", "train", "evaluate",
                                                             "choose", "resolve", "ideal"))):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 0, argv
    assert "paired 95% test intervals" in capsys.readouterr().out


@pytest.mark.parametrize("tool", sorted(p.stem for p in (ROOT / "tools").glob("*.py")
                                         if "ArgumentParser(" in p.read_text()))
def test_every_tools_help_renders(tool, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))  # tools import their siblings
    module = load_tool(tool)
    monkeypatch.setattr(sys, "argv", [f"{tool}.py", "--help"])
    entry = getattr(module, "main", None) or module.parse_args
    with pytest.raises(SystemExit) as stop:
        entry()
    assert stop.value.code == 0 and "usage:" in capsys.readouterr().out
