#!/usr/bin/env python
"""Run the reference models through vsonnx and write their cards, models/README.md and models/RESULTS.md.

    python tools/reproduce.py --data ../shared/data/cifar10 [--names preresnet20-a05 ...]

For each models/<name>.onnx (trained by tools/train.py; its training facts are in models/train/<name>/):
ORT test accuracy of the file; `vsonnx fix` with the batch and the population method, calibrated on 5,000
shuffled training images (seed 0), and with `--data-free`; ORT test accuracy of every fixed model on the
10,000 test images; `vsonnx scan --calib` (2,000 training images) of the original and of the population-
fixed model, plotted as models/<name>.shift.png; with `--steps ensemble` the test accuracy of the model's own
64-mask dropout ensemble. Writes models/<name>.json and .md (the cards),
models/README.md (table of cards) and models/RESULTS.md (comparison with the paper's Table 3).
Every number comes from this script or from the training run; nothing is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from readme_block import replace_block, wrap  # noqa: E402
from vsonnx.accuracy import paired_interval, run_scorers, score_together  # noqa: E402
from vsonnx.data import open_source  # noqa: E402
from vsonnx.ensemble import ensemble_top1  # noqa: E402
from vsonnx.measure import measure_shift, median_prediction_error, plot_shift  # noqa: E402
from vsonnx.methods import CALIBRATED, REGISTRY  # noqa: E402
from vsonnx.methods.synthesized import DEFAULT_SAMPLES  # noqa: E402
from vsonnx.model import load_model  # noqa: E402
from vsonnx.recalibrate import FixOptions, fix_calibrated, fix_data_free, fix_named_sites  # noqa: E402
from vsonnx.sites import find_sites  # noqa: E402

MODELS = ROOT / "models"
CALIB_SAMPLES = 5000
SHIFT_SAMPLES = 2000
# The paper's Table 3 (arXiv v1), CIFAR-10 test error %, drop 0.5: (placement) -> (before, after Adjust),
# and the no-dropout error, for the network family each reference model stands for.
PAPER = {
    "preresnet": {"net": "PreResNet-110", "a": (8.42, 6.42), "b": (5.85, 5.77), "none": 5.02},
    "wrn": {"net": "WRN-28-10", "a": (4.59, 4.20), "b": (3.81, 3.71), "none": 3.97},
    "resnext": {"net": "ResNeXt-29 8x64", "a": (4.43, 3.96), "b": (4.09, 3.93), "none": 3.77},
    "densenet": {"net": "DenseNet-BC-100-12", "a": (8.70, 6.82), "b": (5.63, 5.29), "none": 4.72},
}


def reproducible_command(train_card: dict, name: str) -> str:
    """The training command with this checkout's data and output paths."""
    words = train_card["command"].split()
    for flag, value in (("--data", "../shared/data/cifar10"), ("--out", f"runs/{name}")):
        if flag in words:
            words[words.index(flag) + 1] = value
    return " ".join(w for w in words if w not in ("--no-progress", "--no-export"))


# Card key of every method of the registry that the cards measure (the data-free ones under their CLI name),
# and the label-free choice (`fix --val-split`: candidates calibrated on 80% of the calibration images,
# chosen on the other 20% by agreement with the dropout ensemble's classes: vsonnx.choose).
CARD_NAMES = {**{m: m for m in CALIBRATED}, "synthesized": "data-free", "closed_form": "data-free-closed-form"}
LABEL_FREE = "label-free-choice"
VAL_SPLIT = 0.2
FIXES = (*CARD_NAMES.values(), LABEL_FREE)


def new_card(name: str, report) -> dict:
    """The facts of a card that come from training and the scan."""
    train_card = json.loads((MODELS / "train" / name / "card.json").read_text())
    return {
        "name": name, "onnx": f"models/{name}.onnx", "arch": train_card["arch"], "depth": train_card["depth"],
        "dropout": train_card["dropout"], "dataset": train_card["dataset"], "seed": train_card["seed"],
        "epochs": train_card["epochs"], "train_wall_s": train_card["train_wall_s"],
        "train_device": train_card["device"], "train_command": reproducible_command(train_card, name),
        "pytorch_test_acc": round(train_card["pytorch_test_acc"], 2),
        "pytorch_test_samples": train_card.get("test_samples", 10000), "batchnorms": len(report.batchnorms),
        "sites": len(report.sites), "site_paths": sorted({b.path for b in report.sites}),
        "calibration": f"{CALIB_SAMPLES} shuffled training images (seed 0)",
        "evaluation": "all 10,000 test images",
    }


def label_free_choice(card: dict, path: Path, calib, tmp: Path, threads: int | None) -> Path:
    """`fix --val-split`: the model the label-free choice leaves the user with (the original when it writes
    nothing), with what it chose and its cost in the card."""
    out = tmp / f"{card['name']}.{LABEL_FREE}.onnx"
    t0 = time.perf_counter()
    result = fix_calibrated(path, calib, "batch", FixOptions.of(output=out, threads=threads, val_split=VAL_SPLIT))
    card[f"fix_{LABEL_FREE}_s"] = round(time.perf_counter() - t0, 1)
    card["label_free_chosen"] = result.chosen if result.written else "original"
    return out if result.written else path


def run_fixes(card: dict, path: Path, calib, fixes: tuple[str, ...], tmp: Path, threads: int | None) -> dict:
    """Fix the model with every method whose card name is in ``fixes``; {card name: fixed model path}."""
    paths = {}
    if LABEL_FREE in fixes:
        paths[LABEL_FREE] = label_free_choice(card, path, calib, tmp, threads)
    for method, key in CARD_NAMES.items():
        if key not in fixes:
            continue
        out = tmp / f"{card['name']}.{key}.onnx"
        t0 = time.perf_counter()
        if REGISTRY[method].needs_data:
            result = fix_calibrated(path, calib, method, FixOptions.of(output=out, threads=threads))
        else:
            result = fix_data_free(path, FixOptions.of(output=out, device="cpu",
                                                    synthetic=DEFAULT_SAMPLES if method == "synthesized" else 0))
        if not result.written:
            card[f"fix_{key}_note"] = result.message
            continue
        card[f"fix_{key}_s"] = round(time.perf_counter() - t0, 1)
        card[f"recalibrated_{key}"] = len(result.batchnorms)
        paths[key] = out
    return paths


def evaluate_fixed(card: dict, path: Path, paths: dict, data: Path, threads: int | None) -> None:
    """Test accuracy of every model of ``paths`` on the same batches, and distill against relative on the
    same images (paired 95% interval) when both are there."""
    if not paths:
        return
    model = load_model(path)
    test = open_source(data / "test", model, shuffle=False)
    scorers = run_scorers({k: load_model(p) for k, p in paths.items()}, test, device="cpu", threads=threads)
    for key, scorer in scorers.items():
        r = scorer.report(key)
        card["ort_test_acc" if key == "ort" else f"ort_test_acc_fixed_{key}"] = round(r.top1, 2)
        card["test_samples"] = r.samples
    if "distill" in scorers:
        relative = scorers.get("relative")
        if relative is None:  # re-evaluate the relative fix of the card's run on the same images
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "relative.onnx"
                calib = open_source(data / "train", model, shuffle=True, seed=0, limit=CALIB_SAMPLES)
                fix_calibrated(path, calib, "relative", FixOptions.of(output=out, threads=threads))
                relative = run_scorers({"relative": load_model(out)}, test, device="cpu", threads=threads)["relative"]
        delta, low, high = paired_interval(relative, scorers["distill"])
        card["distill_minus_relative"] = {"points": round(delta, 2), "ci95": [round(low, 2), round(high, 2)]}


def shift_plot(card: dict, path: Path, population_fixed: Path, data: Path, threads: int | None) -> None:
    """The paper's Fig. 1 before and after the population fix, and its summary numbers."""
    name, shift_data = card["name"], data / "train"
    before = measure_shift(path, shift_data, limit=SHIFT_SAMPLES, seed=1, threads=threads)
    after = measure_shift(population_fixed, shift_data, limit=SHIFT_SAMPLES, seed=1, threads=threads)
    plot_shift([before, after], MODELS / f"{name}.shift.png", ["as trained", "after vsonnx fix (population)"])
    card["shift_plot"] = f"{name}.shift.png"
    card["median_site_shift_before"] = round(float(_median([b.shift_metric for b in before.sites])), 4)
    card["median_site_shift_after"] = round(float(_median([b.shift_metric for b in after.sites])), 4)
    error = median_prediction_error(before)
    card["median_prediction_error"] = None if error is None else round(error, 4)


def measure(name: str, data: Path, threads: int | None, fixes: tuple[str, ...] = FIXES,
            card: dict | None = None) -> dict:
    """A model's card: accuracy as trained and after each of ``fixes``; given an existing ``card``, only
    ``fixes`` are (re)measured into it."""
    path = MODELS / f"{name}.onnx"
    model = load_model(path)
    report = find_sites(model, str(path))
    fresh = card is None
    card = card or new_card(name, report)
    calib = open_source(data / "train", model, shuffle=True, seed=0, limit=CALIB_SAMPLES)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"ort": path} if fresh else {}
        if report.sites:
            paths.update(run_fixes(card, path, calib, fixes, Path(tmp), threads))
        if report.sites and "population" in fixes:
            shift_plot(card, path, paths["population"], data, threads)
        evaluate_fixed(card, path, paths, data, threads)
    card["fix_commands"] = [f"vsonnx fix models/{name}.onnx --calib ../shared/data/cifar10/train --limit {CALIB_SAMPLES} "
                            f"--method {m} -o {name}.{m}.onnx" for m in CALIBRATED]
    card["fix_commands"].append(f"vsonnx fix models/{name}.onnx --calib ../shared/data/cifar10/train --limit "
                                f"{CALIB_SAMPLES} --val-split {VAL_SPLIT} -o {name}.{LABEL_FREE}.onnx")
    card["fix_commands"].append(f"vsonnx fix models/{name}.onnx --data-free -o {name}.data-free.onnx")
    card["fix_commands"].append(f"vsonnx fix models/{name}.onnx --data-free --synthetic 0 "
                                f"-o {name}.data-free-closed-form.onnx")
    card["eval_command"] = "vsonnx eval MODEL --data ../shared/data/cifar10/test"
    return card


ENSEMBLE_MASKS = 64


def ensemble_accuracy(card: dict, data: Path, threads: int | None) -> None:
    """Test top-1 of the MC-dropout ensemble of the model's own weights (softmax averaged over ENSEMBLE_MASKS
    masks): what the weights hold, against which every fix of the card is judged. Nothing for a model without sites."""
    if not card["sites"]:
        return
    path = MODELS / f"{card['name']}.onnx"
    model = load_model(path)
    test = open_source(data / "test", model, shuffle=False)
    t0 = time.perf_counter()
    card["ort_test_acc_ensemble64"] = round(ensemble_top1(
        model, test, ENSEMBLE_MASKS, channelwise=find_sites(model, str(path)).channelwise_dropouts, threads=threads), 2)
    card["ensemble64_s"] = round(time.perf_counter() - t0, 1)


def ensemble_gap(c: dict) -> tuple[str, float, float]:
    """(the card's most accurate single method, its test top-1 %, that top-1 minus the ensemble's) for a card
    with the ensemble measured; the label-free choice is not a method (it picks one of them)."""
    best, top1 = max(((m, c[f"ort_test_acc_fixed_{m}"]) for m in CARD_NAMES.values()
                      if f"ort_test_acc_fixed_{m}" in c), key=lambda pair: pair[1])
    return best, top1, top1 - c["ort_test_acc_ensemble64"]


def reference_net(card: dict):
    """The PyTorch network of a card with the weights of its vsonnx export (eval mode)."""
    import torch
    from onnx import numpy_helper

    from vsonnx.nets import DropoutConfig, build

    kept = load_model(ROOT / card["onnx"])
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in kept.graph.initializer}
    train_config = json.loads((MODELS / "train" / card["name"] / "config.json").read_text())
    options = {k: train_config[k] for k in ("widen", "cardinality", "base_width", "growth")}
    net = build(card["arch"], card["depth"], 10, DropoutConfig(**card["dropout"]), **options).eval()
    state = net.state_dict()
    state.update({k: weights[k] for k in state if k in weights})
    net.load_state_dict(state)
    return net, kept


def dropout_sites(kept, placement: str, by_module: bool) -> dict[str, float]:
    """Where the vsonnx export's Dropouts act, as a stock export would name them: placement b the layer after
    each dropout, placement a the BN after it (folded by a stock export into the conv before it: by tensor
    name, the conv's output, where the dropout acted inside the fold); ``by_module``: PyTorch module names."""
    from vsonnx.graph import GraphIndex, module_of

    index = GraphIndex(kept)
    sites = {}
    for d in (n for n in kept.graph.node if n.op_type == "Dropout"):
        ratio = float(index.constant(d.input[1]))
        for consumer in index.consumers[d.output[0]]:
            if by_module:
                weight = consumer.input[1] if placement == "b" else ""
                sites[weight[:-len(".weight")] if weight.endswith(".weight") else module_of(consumer)] = ratio
            elif placement == "b":
                sites[index.node_name(consumer)] = ratio
            else:
                sites[index.producer[d.input[0]].output[0]] = ratio
    return sites


def folded_experiment(card: dict, data: Path, threads: int | None, exporter: str = "torchscript") -> dict | None:
    """Stock torch.onnx.export of the same weights (Dropout removed, Conv+BN folded; the TorchScript
    exporter, sites named by tensor, or torch's default exporter, sites named by PyTorch module), fixed with
    `fix --dropout`, against the population fix of the vsonnx export."""
    placement = card["dropout"]["placement"]
    if placement not in ("a", "b"):
        return None
    import contextlib
    import io
    import warnings

    import onnx
    import torch

    net, kept = reference_net(card)
    sites = dropout_sites(kept, placement, by_module=exporter == "dynamo")
    pre = json.loads(dict((p.key, p.value) for p in kept.metadata_props)["vsonnx.preprocess"])
    pre = {"mean": pre["mean"], "std": pre["std"]}
    with tempfile.TemporaryDirectory() as tmp:
        stock = Path(tmp) / "stock.onnx"
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            shapes = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if exporter == "dynamo" else \
                {"dynamo": False, "dynamic_axes": {"input": {0: "batch"}}}
            torch.onnx.export(net, (torch.randn(2, 3, 32, 32),), str(stock), input_names=["input"], **shapes)
        folded_bn = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(stock)).graph.node)
        calib = open_source(data / "train", load_model(stock), shuffle=True, seed=0, limit=CALIB_SAMPLES, preprocess=pre)
        fixed = Path(tmp) / "stock.fixed.onnx"
        result = fix_named_sites(stock, calib, sites, FixOptions.of(output=fixed, threads=threads))
        test = open_source(data / "test", load_model(stock), shuffle=False, preprocess=pre)
        reports = score_together({"stock": load_model(stock), "fixed": load_model(fixed)}, test, device="cpu",
                                 threads=threads)
        acc = {k: round(r.top1, 2) for k, r in reports.items()}
    return {"exporter": exporter, "stock_bn_left": folded_bn, "sites_named": len(sites),
            "named_by": "PyTorch module" if exporter == "dynamo" else "tensor or node",
            "folded_layers_corrected": len(result.notes),
            "stock_ort_test_acc": acc["stock"], "stock_fixed_ort_test_acc": acc["fixed"],
            "vsonnx_export_population_fix": card.get("ort_test_acc_fixed_population"),
            "difference_points": round(acc["fixed"] - card.get("ort_test_acc_fixed_population", float("nan")), 2)}


def card_markdown(c: dict) -> str:
    d = c["dropout"]
    lines = [
        f"# {c['name']}: {c['arch']}-{c['depth']}, {d['noise']} {d['ratio']} placement {d['placement']} ({c['dataset']})",
        "",
        f"- training: `{c['train_command']}` (seed {c['seed']}, {c['epochs']} epochs, {c['train_wall_s']} s on "
        f"{c['train_device']}; PyTorch test accuracy {c['pytorch_test_acc']:.2f}% on "
        f"{c.get('pytorch_test_samples', 10000)} images)",
        f"- graph: {c['batchnorms']} BatchNormalization, {c['sites']} Dropout->BN sites ({', '.join(c['site_paths']) or 'none'})",
        f"- onnxruntime test accuracy of the file: {c['ort_test_acc']:.2f}% ({c['test_samples']} images)",
    ]
    hows = {"data-free": "--data-free` (no data: 64 synthetic inputs",
            "data-free-closed-form": "--data-free --synthetic 0` (no data: closed-form site formulas",
            LABEL_FREE: f"--val-split {VAL_SPLIT}` (every method calibrated on {1 - VAL_SPLIT:.0%} of the calibration "
                        f"images, chosen without labels on the rest: {c.get('label_free_chosen')}"}
    for m in FIXES:
        if f"ort_test_acc_fixed_{m}" in c:
            how = hows.get(m, f"--method {m}` ({c['calibration']}")
            lines.append(f"- after `vsonnx fix {how}, {c[f'fix_{m}_s']} s): "
                         f"{c[f'ort_test_acc_fixed_{m}']:.2f}% "
                         f"({c[f'ort_test_acc_fixed_{m}'] - c['ort_test_acc']:+.2f} points)")
    if "distill_minus_relative" in c:
        d = c["distill_minus_relative"]
        lines.append(f"- distill - relative on the same test images: {d['points']:+.2f} points, paired 95% interval "
                     f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]")
    if "ort_test_acc_ensemble64" in c:
        best, _, gap = ensemble_gap(c)
        lines.append(f"- the same weights with dropout on, softmax averaged over {ENSEMBLE_MASKS} masks (what the "
                     f"weights hold; {c['ensemble64_s']} s): {c['ort_test_acc_ensemble64']:.2f}%; best fix ({best}) "
                     f"{gap:+.2f} points from it")
    if "shift_plot" in c:
        lines.append(f"- shift at the sites (median over sites of max(real/moving, moving/real)): "
                     f"{c['median_site_shift_before']} as trained, {c['median_site_shift_after']} after the "
                     f"population fix; theory vs measurement: median relative error {c['median_prediction_error']} "
                     f"([plot]({c['shift_plot']}))")
    if c.get("folded"):
        f = c["folded"]
        lines.append(f"- stock `torch.onnx.export` of the same weights (Dropout removed, {f['stock_bn_left']} BN left, "
                     f"the rest folded): {f['stock_ort_test_acc']:.2f}%; after `vsonnx fix --dropout` naming "
                     f"{f['sites_named']} sites ({f['folded_layers_corrected']} folded layers corrected): "
                     f"{f['stock_fixed_ort_test_acc']:.2f}% ({f['difference_points']:+.2f} points vs the population "
                     "fix of the vsonnx export)")
    lines += ["", "Reproduce:", "", *[f"    {cmd}" for cmd in c["fix_commands"]],
              f"    {c['eval_command']}", ""]
    return "\n".join(lines)


def _median(values):
    import statistics

    return statistics.median(v for v in values if v is not None)


def table3_row(c: dict, twin: dict | None) -> str:
    """One model's row of RESULTS.md: errors before and after each fix, gap closed, the paper's numbers."""
    placement = c["dropout"]["placement"]
    err = {k: round(100 - c[f"ort_test_acc{s}"], 2) for k, s in
           (("before", ""), ("batch", "_fixed_batch"), ("population", "_fixed_population"),
            ("relative", "_fixed_relative"), ("distill", "_fixed_distill"), ("label-free", f"_fixed_{LABEL_FREE}"),
            ("data-free", "_fixed_data-free"), ("closed", "_fixed_data-free-closed-form"))
           if f"ort_test_acc{s}" in c}
    population_gain = err["before"] - err.get("population", err["before"])
    relative = (f"{(err['before'] - err['data-free']) / population_gain:.0%}"
                if population_gain > 0 and "data-free" in err else "- (population gains nothing)")
    if twin is not None and err["before"] > 100 - twin["ort_test_acc"]:
        gap = err["before"] - (100 - twin["ort_test_acc"])
        closed = " / ".join(f"{(err['before'] - err[k]) / gap:+.0%}" if k in err else "-"
                            for k in ("batch", "population", "relative", "distill", "data-free"))
    else:
        closed = "- (no no-dropout twin)" if twin is None else "- (no gap)"
    paper = PAPER.get(c["arch"], {})
    before, after = paper.get(placement, (None, None))
    paper_gap = f"{(before - after) / (before - paper['none']):+.0%}" if before and before > paper["none"] else "-"
    chosen = f" ({c['label_free_chosen']})" if "label_free_chosen" in c else ""
    return (f"| {c['name']} | {placement} {c['dropout']['ratio']} | {err['before']:.2f} | {err.get('batch', '-')} | "
            f"{err.get('population', '-')} | {err.get('relative', '-')} | {err.get('distill', '-')} | "
            f"{err.get('label-free', '-')}{chosen} | {err.get('data-free', '-')} | "
            f"{err.get('closed', '-')} | {closed} | "
            f"{relative} | {paper.get('net', '-')} | "
            f"{f'{before} -> {after}' if before else '-'} | {paper_gap} |")


RESULTS_INTRO = [
    "# Reproduction of the paper's Table 3 on the reference models",
    "",
    "Generated by `python tools/reproduce.py --data ../shared/data/cifar10`; do not edit by hand.",
    "Test error (%) on the 10,000 CIFAR-10 test images with onnxruntime. Fixes are calibrated on 5,000",
    "shuffled training images; data-free fixes use none: `--data-free` synthesises 64 inputs from the BN",
    "statistics (100 steps, seed 0), `--synthetic 0` applies the closed-form site formulas only. The relative",
    "fix (`--method relative`) carries the dropout-on -> off change measured on the calibration images over to",
    "the stored statistics instead of replacing them. The distill fix (`--method distill`, 200 steps) fits the",
    "BN constants so that the network with dropout off matches its own dropout ensemble (no labels). The",
    f"label-free choice (`--val-split {VAL_SPLIT}`) calibrates every method on {1 - VAL_SPLIT:.0%} of the calibration images",
    "and ranks them by agreement with the dropout ensemble's classes (8 masks) on the other "
    f"{VAL_SPLIT:.0%}: population where population agrees less than the original (an ensemble not trusted), else",
    "relative unless a candidate agrees more with a paired 95% test, or nothing; the chosen",
    "method is then run again on all 5,000 images.",
    "\"Gap closed\" = (error before - error after) /",
    "(error before - error of the no-dropout twin trained with the same recipe); the paper's column uses its",
    "own no-dropout error. Our networks are short-trained (see the cards) and all but preresnet110-a05 are small;",
    "preresnet110-a05 is the paper's PreResNet-110 with Dropout-(a) 0.5, trained on a GPU for fewer epochs than",
    "the paper's 160-300, so compare directions and fractions, not errors.",
    "",
]


def _recipe(card: dict) -> tuple:
    """What a no-dropout twin must share with a model: architecture, depth and training length."""
    return card["arch"], card["depth"], card["epochs"]


def results(cards: list[dict]) -> str:
    """models/RESULTS.md: our test errors before/after next to the paper's Table 3."""
    twins = {_recipe(c): c for c in cards if c["dropout"]["placement"] == "none"}
    rows = ["| model | placement | error % as trained | batch fix | population fix | relative fix | distill fix | "
            "label-free choice (chosen) | data-free fix | data-free, closed form | gap closed (batch / population / "
            "relative / distill / data-free) | data-free gain / population gain | paper net | paper before -> Adjust | "
            "paper gap closed |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows += [table3_row(c, twins.get(_recipe(c))) for c in cards if c["dropout"]["placement"] != "none"]
    plots = [f"![{c['name']}]({c['shift_plot']})" for c in cards if "shift_plot" in c]
    folded = [f"| {c['name']} | {f['exporter']} | {f['named_by']} | {f['stock_ort_test_acc']:.2f} | "
              f"{f['stock_fixed_ort_test_acc']:.2f} | {f['vsonnx_export_population_fix']:.2f} | "
              f"{f['difference_points']:+.2f} |"
              for c in cards for f in (c.get("folded"), c.get("folded_default_exporter")) if f]
    paired = [f"| {c['name']} | {c['ort_test_acc_fixed_relative']:.2f} | {c['ort_test_acc_fixed_distill']:.2f} | "
              f"{c['distill_minus_relative']['points']:+.2f} | [{c['distill_minus_relative']['ci95'][0]:+.2f}, "
              f"{c['distill_minus_relative']['ci95'][1]:+.2f}] |"
              for c in cards if "distill_minus_relative" in c and "ort_test_acc_fixed_relative" in c]
    ensembles = [f"| {c['name']} | {c['ort_test_acc']:.2f} | {top1:.2f} ({best}) | "
                 f"{c['ort_test_acc_ensemble64']:.2f} | {gap:+.2f} |"
                 for c in cards if "ort_test_acc_ensemble64" in c for best, top1, gap in [ensemble_gap(c)]]
    errors = [f"- {c['name']}: median relative error of the predicted Var_test/Var_train at the sites "
              f"{c['median_prediction_error']}; median site shift {c['median_site_shift_before']} -> "
              f"{c['median_site_shift_after']} after the population fix" for c in cards if "shift_plot" in c]
    return "\n".join([
        *RESULTS_INTRO,
        *rows,
        "",
        "Distill against relative on the same 10,000 test images (accuracy %; paired 95% interval of the",
        "difference):",
        "",
        "| model | relative | distill | distill - relative | 95% interval |",
        "|---|---|---|---|---|",
        *paired,
        "",
        f"The best fix against the dropout ensemble of the same weights ({ENSEMBLE_MASKS} masks, softmax averaged; "
        "test accuracy %;",
        "`--steps ensemble`, measured where listed): how far BN constants alone get from what the weights hold.",
        "",
        "| model | as trained | best fix | ensemble | best fix - ensemble |",
        "|---|---|---|---|---|",
        *ensembles,
        "",
        "Stock `torch.onnx.export` (Dropout removed, Conv+BN folded) fixed with `vsonnx fix --dropout` naming the",
        "dropout sites, against the population fix of the `vsonnx.export` model (test accuracy %; target: within",
        "0.3 points):",
        "",
        "| model | exporter | sites named by | stock export | stock, fixed | vsonnx export, fixed | difference |",
        "|---|---|---|---|---|---|---|",
        *folded,
        "",
        *imagenet_nets(),
        "Shift per BN layer, as trained and after the fix (the paper's Fig. 1 metric, measured on 2,000",
        "training images with dropout off):",
        "",
        *errors,
        "",
        *plots,
        "",
    ])


def imagenet_nets() -> list[str]:
    """The 224 x 224 networks' table (tools/bench_nets.py --out models/bench_nets.json), when it was measured."""
    path = MODELS / "bench_nets.json"
    if not path.exists():
        return []
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_nets import TABLE_HEAD, table_row

    bench = json.loads(path.read_text())
    return ["ImageNet-size networks at 224 x 224 (vsonnx.nets.imagenet, after torchvision's architectures; random",
            "weights, Dropout-(a) 0.2 before the last BN of every block): sites found by `scan` with each",
            "exporter, and `vsonnx fix` of every BN in scope on random inputs in a fresh process (seconds per 100",
            f"calibration images, peak resident memory with the model loaded). Generated by `{bench['command']}`:",
            "", TABLE_HEAD, *[table_row(r) for r in bench["rows"]], ""]


def readme(cards: list[dict]) -> str:
    rows = ["| model | dropout | sites | PyTorch | ORT | fixed (batch) | fixed (population) | fixed (relative) | "
            "fixed (distill) | label-free choice | fixed (data-free) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(value):
        return "-" if value is None else f"{value:.2f}"

    for c in cards:
        d = c["dropout"]
        pytorch = cell(c["pytorch_test_acc"]) + ("" if c.get("pytorch_test_samples", 10000) == 10000
                                                  else f" ({c['pytorch_test_samples']} images)")
        rows.append(f"| [{c['name']}]({c['name']}.md) | {d['placement']} {d['ratio']} | {c['sites']} | "
                    f"{pytorch} | {c['ort_test_acc']:.2f} | {cell(c.get('ort_test_acc_fixed_batch'))} | "
                    f"{cell(c.get('ort_test_acc_fixed_population'))} | {cell(c.get('ort_test_acc_fixed_relative'))} | "
                    f"{cell(c.get('ort_test_acc_fixed_distill'))} | {cell(c.get(f'ort_test_acc_fixed_{LABEL_FREE}'))}"
                    f"{' (' + c['label_free_chosen'] + ')' if 'label_free_chosen' in c else ''} | "
                    f"{cell(c.get('ort_test_acc_fixed_data-free'))} |")
    return "\n".join([
        "# Reference models",
        "",
        "CIFAR-10 networks trained by `tools/train.py` (commands in each card), exported with `vsonnx.export`",
        "(Dropout and BN kept), and measured by `tools/reproduce.py`: test accuracy (%) on the 10,000 test",
        "images with onnxruntime before and after `vsonnx fix` (calibration: 5,000 shuffled training images).",
        "This table is generated; do not edit it by hand.",
        "",
        *rows,
        "",
        "Training logs and configurations are in `train/<name>/`. The DenseNet runs shared the GPU machine with",
        "a test split cut to 1,429 images (to fit the transfer to it), so their PyTorch column counts those only;",
        "the ORT columns always use all 10,000 test images.",
        "",
    ])


GUIDE_START, GUIDE_END = "<!-- reproduce: generated by tools/reproduce.py -->", "<!-- reproduce: end -->"
ARCH_NAMES = {"preresnet": "PreResNet", "densenet": "DenseNet", "wrn": "WRN", "resnext": "ResNeXt"}


def display_name(c: dict) -> str:
    """'PreResNet-20', 'WRN-16-4' (the width from the card's name)."""
    width = f"-{c['name'].split('-')[1]}" if c["arch"] == "wrn" else ""
    return f"{ARCH_NAMES.get(c['arch'], c['arch'])}-{c['depth']}{width}"


def placement(c: dict) -> str:
    return "stochastic depth" if c["dropout"]["placement"] == "depth" else c["dropout"]["placement"]


def readme_guide(cards: dict[str, dict]) -> list[str]:
    """README.md's 'What to expect' paragraph, from the cards (by name)."""
    def acc(name, fix=""):
        value = cards[name].get(f"ort_test_acc_fixed_{fix}" if fix else "ort_test_acc")
        return "-" if value is None else f"{value:.2f}%"

    def fixes(name):
        return " / ".join(acc(name, f) for f in ("batch", "population", "relative", "distill", "data-free"))

    placed_a = [n for n in ("preresnet20-a05", "densenet40-a05") if n in cards]
    chosen = [n for n, c in sorted(cards.items()) if "label_free_chosen" in c]
    return [wrap(
        "What to expect on the reference models (CIFAR-10 test accuracy with onnxruntime; this paragraph is generated "
        "by `tools/reproduce.py` from `models/*.json`, see `models/README.md` and `models/RESULTS.md`): "
        + "; ".join(f"{display_name(cards[n])} with Dropout-({cards[n]['dropout']['placement']}) "
                    f"{cards[n]['dropout']['ratio']} goes from {acc(n)} to {fixes(n)}" for n in placed_a)
        + " (batch / population / relative / distill / data-free). With Dropout-(b) the shift is small and so is "
        f"the change ({display_name(cards['preresnet20-b05'])}: {acc('preresnet20-b05')} -> {fixes('preresnet20-b05')}), "
        "which is why `fix --val` can refuse to write a model that is not better. The label-free choice "
        "(`--val-split 0.2`) wrote "
        + "; ".join(f"{display_name(cards[n])} ({placement(cards[n])}): {cards[n]['label_free_chosen']}, "
                    f"{acc(n, LABEL_FREE)}" for n in chosen) + ".", indent="")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="CIFAR-10 folder with train/ and test/")
    p.add_argument("--names", nargs="*", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--steps", default="cards,folded",
                   help="cards (measure, fix, plot), fixes (only --fixes, into existing cards), ensemble (the "
                        "64-mask dropout ensemble's accuracy) and/or folded (stock export)")
    p.add_argument("--fixes", default=",".join(FIXES), help=f"with --steps fixes: some of {','.join(FIXES)}")
    args = p.parse_args()
    steps = set(args.steps.split(","))
    names = args.names or sorted(d.name for d in (MODELS / "train").iterdir()
                                 if (MODELS / f"{d.name}.onnx").exists())
    for name in names:
        path = MODELS / f"{name}.json"
        if "cards" in steps:
            card = measure(name, args.data, args.threads)
        elif "fixes" in steps:
            fixes = tuple(f for f in args.fixes.split(",") if f)
            unknown = sorted(set(fixes) - set(FIXES))
            if unknown:
                p.error(f"unknown fixes {unknown}; choose from {FIXES}")
            card = measure(name, args.data, args.threads, fixes, json.loads(path.read_text()))
        else:
            card = json.loads(path.read_text())
        if "ensemble" in steps:
            ensemble_accuracy(card, args.data, args.threads)
        if "folded" in steps:
            card["folded"] = folded_experiment(card, args.data, args.threads)
            card["folded_default_exporter"] = folded_experiment(card, args.data, args.threads, exporter="dynamo")
        (MODELS / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
        (MODELS / f"{name}.md").write_text(card_markdown(card))
        print(json.dumps({k: card[k] for k in card if "acc" in k}), name, flush=True)
    cards = [json.loads(p.read_text()) for p in sorted(MODELS.glob("*.json")) if p.with_suffix(".onnx").exists()]
    (MODELS / "README.md").write_text(readme(cards))
    (MODELS / "RESULTS.md").write_text(results(cards))
    replace_block(GUIDE_START, GUIDE_END, readme_guide({c["name"]: c for c in cards}))


if __name__ == "__main__":
    main()
