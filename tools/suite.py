#!/usr/bin/env python
"""The variance-shift suite (issue 23): train its members, fix the design/check halves, evaluate.

    python tools/suite.py assign                                   # models/suite/halves.json (seeded, first)
    python tools/suite.py train --data ../shared/data/cifar10      # train what is missing, one after another
    python tools/suite.py evaluate --data ../shared/data/cifar10   # models/suite.json and models/SUITE.md
    python tools/suite.py choose --data ../shared/data/cifar10     # both choices again (vsonnx.choose)
    python tools/suite.py resolve --data ../shared/data/cifar10    # paired test intervals of the choices' gaps
    python tools/suite.py ideal --data ../shared/data/cifar10      # what labelled images can choose at best
    python tools/suite.py tables                                   # SUITE.md, README's "Which method when"
    python tools/suite.py merge runs/a.json runs/b.json            # members evaluated in parallel (--results)
    python tools/suite.py merge --field ideal_labelled a.json b.json  # a field that parallel runs added

Members and their training arguments are in ``tools/suite_members.py``. Each trained member lands in
``models/suite/NAME.onnx`` with its training card, configuration and log in ``models/suite/train/NAME/``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite_resolution  # noqa: E402
import suite_signals  # noqa: E402
from suite_members import (DECIDED_ON, FRESH, HALVES_SEED, MEMBERS, RULES_FIXED_AT,  # noqa: E402
                           TRAIN_THREADS, TWINS, arch_of, halves)
from readme_block import replace_block, wrap  # noqa: E402
from suite_signals import SINGLE, gap  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "models" / "suite"
KEPT = ("card.json", "config.json", "log.csv")
RESULTS = ROOT / "models" / "suite.json"
CALIB_SAMPLES, VAL_SAMPLES, VAL_SPLIT, ENSEMBLE_MASKS = 5000, 2000, 0.2, 64
METHODS = ("batch", "population", "relative", "distill")
COLUMNS = ("original", *METHODS, "data-free", "label-free", "labelled", "ensemble64")


def assign() -> Path:
    """Write the seeded design/check assignment (with the FRESH members, all check); refuses to change the
    half of a member already written."""
    path = SUITE / "halves.json"
    table = {"seed": HALVES_SEED, "halves": halves(HALVES_SEED)}
    written = json.loads(path.read_text()) if path.exists() else {"seed": HALVES_SEED, "halves": {}}
    if written["seed"] != HALVES_SEED or any(table["halves"].get(k) != v for k, v in written["halves"].items()):
        raise SystemExit(f"{path} exists and differs from the assignment of seed {HALVES_SEED}: "
                         "the halves are fixed before tuning; do not reassign")
    SUITE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path


def train(data: Path, names: list[str], runs: Path) -> None:
    """Train each missing member with tools/train.py (TRAIN_THREADS torch threads), then keep its ONNX model
    and its card, configuration and log in models/suite."""
    for name in names:
        target = SUITE / f"{name}.onnx"
        if target.exists():
            continue
        out = runs / name
        command = [sys.executable, str(ROOT / "tools" / "train.py"), *MEMBERS[name], "--data", str(data),
                   "--out", str(out), "--threads", str(TRAIN_THREADS), "--no-progress", "--seed", "0"]
        print(f"[suite] training {name}", flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
        kept = SUITE / "train" / name
        kept.mkdir(parents=True, exist_ok=True)
        for file in KEPT:
            shutil.copyfile(out / file, kept / file)
        shutil.copyfile(out / "model.onnx", target)
        print(f"[suite] done {name}: {json.loads((out / 'card.json').read_text())['pytorch_test_acc']:.2f}%",
              flush=True)


def training_sources(model, data: Path, val_samples: int = VAL_SAMPLES) -> tuple:
    """(calibration source, labelled validation source): 5,000 + ``val_samples`` (2,000) disjoint shuffled
    training images (seed 0), preprocessed for ``model`` once."""
    from vsonnx.data import ArraySource, open_source

    source = open_source(data / "train", model, shuffle=True, seed=0, limit=CALIB_SAMPLES + val_samples)
    xs, ys = [], []
    for batch in source.batches(500):
        xs.append(next(iter(batch.feeds.values())))
        ys.append(batch.labels)
    x, y = np.concatenate(xs), np.concatenate(ys)
    return (ArraySource.from_arrays(model, x[:CALIB_SAMPLES], None, shuffle=False, name="calibration images"),
            ArraySource.from_arrays(model, x[CALIB_SAMPLES:], y[CALIB_SAMPLES:], shuffle=False,
                                    name="validation images"))


def describe_member(name: str, report) -> dict:
    """What the member is: half, architecture, placement, rate, noise, recipe, its sites."""
    train = json.loads((SUITE / "train" / name / "config.json").read_text())
    return {"name": name, "half": halves().get(name, "twin"), "arch": arch_of(name),
            "placement": train["placement"], "rate": train["dropout"] if train["placement"] != "none" else 0.0,
            "noise": train["noise"], "recipe": {k: train.get(k) for k in ("epochs", "optimizer", "lr", "bn_momentum",
                                                                           "augment", "depth")},
            "sites": len(report.sites), "site_paths": sorted({b.path for b in report.sites})}


def fix_choice(path: Path, calib, val, threads: int | None) -> tuple[str, object, object]:
    """The candidate the fix writes (or "original"): ``fix --val-split 0.2`` where ``val`` is None, else
    ``fix --val`` on ``val``; the same candidates, calibrated as the fix does, chosen with vsonnx.choose. With
    the candidates and the ranking by the criterion used."""
    from vsonnx.choose import choose
    from vsonnx.recalibrate import FixOptions, candidate_models

    split = None if val is not None else VAL_SPLIT
    got = candidate_models(path, calib, FixOptions.of(val_split=split, threads=threads, device="cpu"))
    chosen = choose(got.original, got.models, got.names, got.held_out if val is None else val,
                    label_free=val is None, batch_size=got.batch_size, channelwise=got.channelwise,
                    stochastic_depth=got.stochastic_depth, device="cpu", threads=threads)
    return (got.names[chosen.index] if chosen.index is not None else "original"), got, chosen.ranking


def choices(path: Path, calib, val, threads: int | None, name: str) -> tuple[dict, dict, list]:
    """The label-free and the labelled choice as ``fix --val-split 0.2`` and ``fix --val`` make them, the
    held-out signals of every candidate (tools/suite_signals.py), and the candidates calibrated on all of
    ``calib`` (what either fix writes)."""
    label_free, split, ranking = fix_choice(path, calib, None, threads)
    signals = suite_signals.measure(name, split, threads, ROOT / "runs" / "suite-signals")
    signals["fix_scores"] = fix_scores(ranking, split.names)
    labelled, full, by_top1 = fix_choice(path, calib, val, threads)
    signals["val_top1"] = dict(zip(["original", *full.names], (round(v, 2) for v in by_top1.scores)))
    return {"label-free": label_free, "labelled": labelled}, signals, list(zip(full.names, full.models))


def fix_scores(ranking, names: list[str]) -> dict:
    """The label-free ranking's criterion and score per model, as the fix reports them."""
    return {"criterion": ranking.criterion,
            **dict(zip(["original", *names], (round(v, 5) for v in ranking.scores)))}


def choose_again(data: Path, names: list[str], threads: int | None, results: Path = RESULTS,
                 val_samples: int = VAL_SAMPLES) -> None:
    """Make the label-free and the labelled choice of each evaluated member again with the current
    vsonnx.choose (its candidates' test top-1 are kept in ``results``: only the rankings are rerun), rewriting
    ``results`` and SUITE.md after each member. ``val_samples``: labelled images of the labelled choice (a
    study of how many it needs: write such a run to other ``results``)."""
    from vsonnx.model import load_model

    done = {e["name"]: e for e in json.loads(results.read_text())}
    for name in names:
        entry = done.get(name)
        if entry is None or "candidates_top1" not in entry:
            continue
        path = SUITE / f"{name}.onnx"
        calib, val = training_sources(load_model(path), data, val_samples)
        label_free, split, ranking = fix_choice(path, calib, None, threads)
        entry["signals"]["fix_scores"] = fix_scores(ranking, split.names)
        entry["signals"].pop("fix_ce", None)
        labelled, _, _ = fix_choice(path, calib, val, threads)
        entry["chosen"] = {"label-free": label_free, "labelled": labelled}
        entry.pop("gap_interval", None)
        every = {**entry["candidates_top1"], **entry["top1"]}
        entry["top1"].update({column: every[choice] for column, choice in entry["chosen"].items()})
        write_results(results, done)
        print(f"[suite] {name}: {entry['chosen']} {entry['top1']}", flush=True)


def rebuilt_models(entry: dict, data: Path, threads: int | None, data_free: bool) -> tuple[dict, object]:
    """The member's models as ``evaluate`` scored them (name -> model: the original, the candidates calibrated
    on all of the calibration images, what either fix writes, and with ``data_free`` data-free) and the test
    images it scored them on."""
    from vsonnx.data import open_source
    from vsonnx.model import load_model
    from vsonnx.recalibrate import FixOptions, candidate_models

    path = SUITE / f"{entry['name']}.onnx"
    model = load_model(path)
    calib, _ = training_sources(model, data)
    got = candidate_models(path, calib, FixOptions.of(threads=threads, device="cpu"))
    models = {"original": got.original, **dict(zip(got.names, got.models))}
    if data_free:
        models["data-free"] = data_free_model(path, model, threads)
    return models, open_source(data / "test", model, shuffle=False, limit=entry["test_samples"])


def resolve(data: Path, names: list[str], threads: int | None, results: Path = RESULTS) -> None:
    """Store each evaluated member's ``gap_interval`` (tools/suite_resolution.py: the paired 95% interval of
    each choice's gap on the test images) of the models ``evaluate`` scored, rebuilt (``rebuilt_models``, with
    data-free where a gap needs it), rewriting ``results`` and SUITE.md after each member."""
    done = {e["name"]: e for e in json.loads(results.read_text())}
    for name in names:
        entry = done.get(name)
        if entry is None or "candidates_top1" not in entry or "gap_interval" in entry:
            continue
        pairs = suite_resolution.needed(entry)
        if pairs:
            models, test = rebuilt_models(entry, data, threads, any("data-free" in p for p in pairs.values()))
            entry["gap_interval"] = suite_resolution.measure(entry, models, test, threads)
        else:
            entry["gap_interval"] = {}  # every choice is the best single method
        write_results(results, done)
        print(f"[suite] {name}: {entry['gap_interval']}", flush=True)


def ideal(data: Path, names: list[str], threads: int | None, results: Path = RESULTS) -> None:
    """Store each evaluated member's ``ideal_labelled`` (tools/suite_resolution.py: per number of labelled
    images, the share of draws in which the ideal labelled chooser comes within 0.1 of the best single method)
    from the single methods' per-image hits on the test images, the models rebuilt (``rebuilt_models``)."""
    done = {e["name"]: e for e in json.loads(results.read_text())}
    for name in names:
        entry = done.get(name)
        if entry is None or "candidates_top1" not in entry or "ideal_labelled" in entry:
            continue
        if all(suite_resolution.within_best(entry, m) for m in SINGLE):
            shares = dict.fromkeys(suite_resolution.IDEAL_SAMPLES, 1.0)  # any choice is within: nothing to draw
        else:
            models, test = rebuilt_models(entry, data, threads, data_free=True)
            hits, moved = suite_resolution.single_hits(entry, models, test, threads)
            shares = {n: round(suite_resolution.ideal_labelled(hits, n), 4) for n in suite_resolution.IDEAL_SAMPLES}
            if moved:
                entry["ideal_rebuilt_top1"] = moved  # the shares are of these rebuilt models
        entry["ideal_labelled"] = {str(n): share for n, share in shares.items()}
        write_results(results, done)
        print(f"[suite] {name}: {entry['ideal_labelled']}", flush=True)


def data_free_model(path: Path, model, threads: int | None):
    """What ``fix --data-free`` writes for the member at ``path`` (``model`` where it writes nothing)."""
    from vsonnx.model import load_model
    from vsonnx.recalibrate import FixOptions, fix_data_free

    with tempfile.TemporaryDirectory(prefix="vsonnx-suite-") as tmp:
        result = fix_data_free(path, FixOptions.of(output=Path(tmp) / "df.onnx", threads=threads, device="cpu"))
        return load_model(result.output) if result.written else model


def evaluate_member(name: str, data: Path, threads: int | None, test_limit: int | None, masks: int,
                    previous: dict | None = None) -> dict:
    """Every column of COLUMNS for one member on the test images, and every candidate's top-1 (original: the
    model as trained; label-free / labelled: the candidate fix --val-split 0.2 / fix --val on 2,000 other
    labelled training images chooses, or the original where it writes nothing); ensemble64 is kept from
    ``previous`` (an earlier evaluation with as many masks)."""
    from vsonnx.accuracy import run_scorers
    from vsonnx.data import open_source
    from vsonnx.ensemble import ensemble_top1
    from vsonnx.model import load_model
    from vsonnx.sites import find_sites

    path = SUITE / f"{name}.onnx"
    model = load_model(path)
    report = find_sites(model, str(path))
    entry = describe_member(name, report)
    test = open_source(data / "test", model, shuffle=False, limit=test_limit)
    models, seconds, chosen = {"original": model}, {}, {}
    if report.sites:
        calib, val = training_sources(model, data)
        t0 = time.perf_counter()
        chosen, entry["signals"], candidates = choices(path, calib, val, threads, name)
        seconds["candidates"] = round(time.perf_counter() - t0, 1)
        models.update(candidates)
        t0 = time.perf_counter()
        models["data-free"] = data_free_model(path, model, threads)
        seconds["data-free"] = round(time.perf_counter() - t0, 1)
    scorers = run_scorers(models, test, device="cpu", threads=threads)
    every = {k: round(s.report(k).top1, 2) for k, s in scorers.items()}
    entry["candidates_top1"] = {k: v for k, v in every.items() if k not in ("original", "data-free")}
    entry["top1"] = {k: every[k] for k in ("original", *METHODS, "data-free") if k in every}
    entry["top1"].update({column: every[choice] for column, choice in chosen.items()})
    entry["test_samples"] = scorers["original"].report("original").samples
    if report.sites:
        kept = (previous or {}).get("top1", {}).get("ensemble64")
        if kept is not None and (previous or {}).get("ensemble_masks") == masks:
            entry["top1"]["ensemble64"] = kept
        else:
            t0 = time.perf_counter()
            entry["top1"]["ensemble64"] = round(ensemble_top1(model, test, masks, threads=threads,
                                                              channelwise=report.channelwise_dropouts), 2)
            seconds["ensemble64"] = round(time.perf_counter() - t0, 1)
    entry.update({"chosen": chosen, "seconds": seconds, "ensemble_masks": masks})
    twin = TWINS.get(name)
    if twin and (SUITE / f"{twin}.onnx").exists():
        entry["twin"] = twin
    return entry


def evaluate(data: Path, names: list[str], threads: int | None, test_limit: int | None, masks: int,
             results: Path = RESULTS) -> None:
    """Evaluate each trained member of ``names`` not yet in ``results``, or evaluated before candidates were
    kept (its ensemble64 is reused), rewriting ``results`` after each member (a stopped run keeps what it
    finished); then regenerate SUITE.md beside it."""
    done = {e["name"]: e for e in (json.loads(results.read_text()) if results.exists() else [])}
    for name in names:
        current = name in done and ("candidates_top1" in done[name] or done[name]["half"] == "twin")
        if current or not (SUITE / f"{name}.onnx").exists():
            continue
        print(f"[suite] evaluating {name}", flush=True)
        done[name] = evaluate_member(name, data, threads, test_limit, masks, done.get(name))
        write_results(results, done)
        print(f"[suite] {name}: {done[name]['top1']}", flush=True)
    write_results(results, done)


def merge(parts: list[Path], results: Path = RESULTS, field: str | None = None) -> list[str]:
    """Copy into ``results`` the members that parallel runs evaluated and resolved into other ``--results``
    files, unchanged; refuses a member already in ``results`` or not yet resolved. With ``field`` (e.g.
    ``ideal_labelled``), copy instead that field of members already in ``results`` from parts run on copies of
    it (the members' stored top-1 equal), refusing a member that has it in ``results`` or in two parts. The
    names merged."""
    done = {e["name"]: e for e in json.loads(results.read_text())}
    added = {}
    for part in parts:
        for e in json.loads(part.read_text()):
            if field is not None:
                have = done.get(e["name"])
                if field not in e or have is not None and have.get(field) == e[field]:
                    continue  # nothing added, or merged already
                if have is None or field in have or e["name"] in added or have["top1"] != e["top1"]:
                    raise SystemExit(f"{part}: {e['name']}'s {field} is already in {results.name} or another part, "
                                     f"or the member is not the one in {results.name}")
                added[e["name"]] = {**have, field: e[field]}
                continue
            if e["name"] in done or e["name"] in added or "gap_interval" not in e:
                raise SystemExit(f"{part}: {e['name']} is already in {results.name} or another part, or not "
                                 "resolved yet (python tools/suite.py resolve --results ...)")
            added[e["name"]] = e
    write_results(results, {**done, **added})
    return sorted(added)


def write_results(results: Path, done: dict[str, dict]) -> None:
    """suite.json and SUITE.md beside it, from the members evaluated so far."""
    entries = sorted(done.values(), key=lambda e: e["name"])
    for e in entries:
        e["fresh"] = e["name"] in FRESH  # trained after the rules were fixed (tools/suite_members.py)
        e["decided_on"] = [rule for rule, names in DECIDED_ON.items() if e["name"] in names]
    results.write_text(json.dumps(entries, indent=1) + "\n")
    (results.parent / "SUITE.md").write_text(suite_markdown(entries))
    if results == RESULTS:
        replace_block(README_START, README_END, readme_which_method(entries))


def suite_markdown(entries: list[dict]) -> str:
    """models/SUITE.md: per half, every column, and the gap of the best fix to the 64-mask ensemble (how far BN
    constants alone are from what the weights hold)."""
    lines = ["# The variance-shift suite", "",
             "Generated by `python tools/suite.py evaluate --data ../shared/data/cifar10` from `models/suite.json`; "
             "do not edit by hand. Top-1 (%) with onnxruntime on the test images; calibration: 5,000 shuffled "
             "training images; label-free: `fix --val-split 0.2`; labelled: `fix --val` on 2,000 other training "
             "images; ensemble64: the same weights with dropout on, softmax averaged over 64 masks. "
             "Members and the seeded design/check halves: `tools/suite_members.py`, `models/suite/halves.json`. "
             f"The models with their training cards, configurations and logs: `models/suite/`, {stored_megabytes()}.",
             ""]
    head = ["member", "arch", "placement", "rate", *COLUMNS, "best fix - ensemble64"]
    for half in ("design", "check", "twin"):
        rows = [e for e in entries if e["half"] == half]
        if not rows:
            continue
        lines += [f"## {half} half" if half != "twin" else "## no-dropout twins", ""]
        if any(e.get("fresh") for e in rows):
            lines += [wrap(f"Fresh (*): chosen and trained after the rules had been fixed (vsonnx at "
                           f"{RULES_FIXED_AT}; `FRESH` in tools/suite_members.py). A later rule decided on a "
                           "member (†, `DECIDED_ON`) makes it no check of that rule: "
                           + "; ".join(f"{rule}: {', '.join(names)}" for rule, names in DECIDED_ON.items()) + ".",
                           indent=""), ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for e in rows:
            top = e["top1"]
            fixes = [top[k] for k in (*METHODS, "data-free") if k in top]
            gap = f"{max(fixes) - top['ensemble64']:+.2f}" if fixes and "ensemble64" in top else "-"
            name = e["name"] + ("*" if e.get("fresh") else "") + ("†" if e.get("decided_on") else "")
            cells = [name, e["arch"], e["placement"], f"{e['rate']:g}",
                     *[f"{top[k]:.2f}" + (f" ({e['chosen'][k]})" if k in e.get("chosen", {}) else "")
                       if k in top else "-" for k in COLUMNS], gap]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    evaluated = [e for e in entries if e["half"] != "twin"]
    lines += ["## The choices per half", "", *choices_per_half(entries), "",
              "## How finely the test images resolve the gaps", "",
              wrap("Per member and choice with a gap to the best single method: the gap (points) with its paired "
                   "95% interval on the same test images (`python tools/suite.py resolve`, "
                   "tools/suite_resolution.py). Resolved: the interval excludes 0.", indent=""), "",
              *suite_resolution.resolution_table(entries), "",
              wrap("Are the labelled choice's validation images biased? They are training images, which the "
                   "networks were trained on (tools/suite_resolution.py, validation_bias):", indent=""), "",
              *suite_resolution.validation_bias(entries), "",
              "## How many labelled images the labelled criterion needs", "",
              wrap("Issue 23 asks the labelled choice to come within 0.1 points of the best single method on every "
                   "check member. An ideal labelled chooser takes the single method with the highest top-1 on n "
                   "labelled images drawn (with replacement) from the test images themselves, and is judged on all "
                   "of them as the choices are (`python tools/suite.py ideal`, tools/suite_resolution.py, "
                   f"{suite_resolution.IDEAL_DRAWS:,} draws per member): per half, the members it is expected to "
                   "bring within 0.1 (the sum of each member's share of draws within) and the chance that it brings "
                   "every member within (their product). It is favoured over any real labelled choice: its images "
                   "are the judged ones, it chooses among five methods only.", indent=""), "",
              *suite_resolution.ideal_table(entries), "",
              "## Which method when", "",
              f"From the {len(evaluated)} evaluated member(s) with dropout, both halves; gap = top-1 minus the best "
              "single method's top-1 on the same member (points).", "", *which_method(entries), ""]
    return "\n".join(lines)


def stored_megabytes() -> str:
    """How much the suite keeps in the repository (models/suite: ONNX models, cards, logs)."""
    files = [f for f in SUITE.rglob("*") if f.is_file()]
    models = sum(f.suffix == ".onnx" for f in files)
    return f"{models} models, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB in all"


def choices_per_half(entries: list[dict]) -> list[str]:
    """Per half, the label-free and labelled choices against the best single method (gap, points) and against
    the original: what issue 23 asks of the check half (label-free median >= -0.2, worst >= -0.5, never below
    the original; labelled within 0.1 of the best), and how many gaps the test images resolve below 0. The
    check half again without the members a later rule was decided on (``decided_on``), and its fresh members
    without them."""
    lines = ["| half | members | label-free gap: median, worst | label-free below the original | labelled gap: "
             "median, worst | labelled within 0.1 of the best | gaps resolved below 0: label-free, labelled |",
             "|---|---|---|---|---|---|---|"]
    complete = [e for e in entries if all(k in e["top1"] for k in (*SINGLE, "label-free", "labelled"))]
    check = [e for e in complete if e["half"] == "check"]
    undecided = [e for e in check if not e.get("decided_on")]
    groups = [("design", [e for e in complete if e["half"] == "design"]), ("check", check)]
    if len(undecided) < len(check):
        groups.append(("check, no rule decided on them (no †)", undecided))
    groups.append(("check, fresh only (*), no †", [e for e in undecided if e.get("fresh")]))
    for half, group in groups:
        if not group:
            continue
        free, labelled = ([gap(e, column) for e in group] for column in ("label-free", "labelled"))
        below = sum(e["top1"]["label-free"] < e["top1"]["original"] for e in group)
        within = sum(suite_resolution.within_best(e, "labelled") for e in group)
        cells = [half, str(len(group)), f"{np.median(free):+.2f}, {min(free):+.2f}", f"{below} of {len(group)}",
                 f"{np.median(labelled):+.2f}, {min(labelled):+.2f}", f"{within} of {len(group)}",
                 suite_resolution.resolved_below(group)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


SITUATIONS = (
    ("dropout right before BN (placement a)", lambda e: e["placement"] == "a" and e.get("noise", "dropout") == "dropout"),
    ("channel dropout (Dropout2d) before BN", lambda e: e.get("noise") == "dropout2d"),
    ("dropout before a conv (placement b)", lambda e: e["placement"] == "b"),
    ("stochastic depth (a residual branch dropped per sample)", lambda e: e["placement"] == "depth"),
    ("Linear -> BatchNorm1d head with dropout", lambda e: "head" in e["name"] or "mlp" in e["name"]),
    ("every member", lambda e: True),
)


def which_method(entries: list[dict]) -> list[str]:
    """'Which method when' from the evaluated members with dropout (both halves): per situation how often each
    single method is the best, each one's median gap to the best, and the choices' median and worst gaps."""
    rows = [e for e in entries if e["half"] != "twin" and all(k in e["top1"] for k in SINGLE)]
    lines = ["| situation | members | use (best median gap) | best (times) | median gap to the best: "
             + " / ".join(SINGLE) + " | label-free choice: median, worst | labelled choice: median, worst |",
             "|---|---|---|---|---|---|---|"]
    for label, belongs in SITUATIONS:
        group = [e for e in rows if belongs(e)]
        if not group:
            continue
        winners = [max(SINGLE, key=lambda m: e["top1"][m]) for e in group]
        counts = ", ".join(f"{m} {winners.count(m)}" for m in SINGLE if winners.count(m))
        gaps = {m: [gap(e, m) for e in group] for m in (*SINGLE, "label-free", "labelled")}
        use = max(SINGLE, key=lambda m: (np.median(gaps[m]), min(gaps[m])))
        median = " / ".join(f"{np.median(gaps[m]):+.2f}" for m in SINGLE)
        choice = [f"{np.median(gaps[c]):+.2f}, {min(gaps[c]):+.2f}" for c in ("label-free", "labelled")]
        lines.append(f"| {label} | {len(group)} | `--method {use}` (worst {min(gaps[use]):+.2f}) | {counts} | {median} "
                     f"| {choice[0]} | {choice[1]} |")
    return lines


README_START, README_END = "<!-- suite: generated by tools/suite.py -->", "<!-- suite: end -->"


def readme_which_method(entries: list[dict]) -> list[str]:
    """README.md's 'Which method when', from the suite (both halves, every member with dropout)."""
    evaluated = [e for e in entries if e["half"] != "twin" and "candidates_top1" in e]
    return [wrap(f"Which method when, measured on the {len(evaluated)} networks of the variance-shift suite "
                 "(`models/SUITE.md`: small CIFAR-10 networks of five architectures, dropout placements a and b, "
                 "Dropout2d, stochastic depth, rates 0.1-0.5, other optimisers, BN momenta and training lengths; "
                 "5,000 calibration images, 10,000 test images). Gap: a method's top-1 minus the best single "
                 "method's on the same network (points). Label-free choice: `fix --val-split 0.2`; labelled "
                 "choice: `fix --val DATA` with labels; no data: `--data-free`.", indent=""), "",
            *which_method(entries)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    sub.add_parser("assign", help="write models/suite/halves.json")
    sub.add_parser("tables", help="rewrite models/SUITE.md and README.md's 'Which method when' from suite.json")
    m = sub.add_parser("merge", help="copy members evaluated into other --results files into models/suite.json")
    m.add_argument("parts", type=Path, nargs="+")
    m.add_argument("--field", default=None, help="copy this field of members already in models/suite.json")
    t = sub.add_parser("train", help="train the members not yet in models/suite")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--only", default=None, help="comma-separated member names")
    t.add_argument("--runs", type=Path, default=ROOT / "runs" / "suite")
    e = sub.add_parser("evaluate", help="evaluate the trained members not yet in models/suite.json")
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--only", default=None, help="comma-separated member names")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--test-limit", type=int, default=None, help="first N test images (default: all 10,000)")
    e.add_argument("--masks", type=int, default=ENSEMBLE_MASKS, help="dropout masks of the ensemble")
    e.add_argument("--results", type=Path, default=RESULTS, help="JSON written (SUITE.md goes beside it)")
    for step, what in (("choose", "make the label-free and labelled choices of evaluated members again"),
                       ("resolve", "paired 95%% test intervals of the choices' gaps to the best single method"),
                       ("ideal", "how often an ideal labelled chooser comes within 0.1 of the best single method")):
        c = sub.add_parser(step, help=what)
        c.add_argument("--data", type=Path, required=True)
        c.add_argument("--only", default=None, help="comma-separated member names")
        c.add_argument("--threads", type=int, default=None)
        c.add_argument("--results", type=Path, default=RESULTS, help="JSON rewritten (SUITE.md goes beside it)")
        if step == "choose":
            c.add_argument("--val-samples", type=int, default=VAL_SAMPLES,
                           help="labelled training images of the labelled choice (default %(default)s)")
    args = p.parse_args(argv)
    if args.step == "assign":
        print(assign())
    elif args.step == "tables":
        write_results(RESULTS, {e["name"]: e for e in json.loads(RESULTS.read_text())})
    elif args.step == "merge":
        print("merged:", ", ".join(merge(args.parts, field=args.field)))
    else:
        names = args.only.split(",") if args.only else list(MEMBERS)
        unknown = sorted(set(names) - set(MEMBERS))
        if unknown:
            raise SystemExit(f"unknown members: {unknown}")
        if args.step == "train":
            train(args.data, names, args.runs)
        elif args.step == "choose":
            choose_again(args.data, names, args.threads, args.results, args.val_samples)
        elif args.step == "resolve":
            resolve(args.data, names, args.threads, args.results)
        elif args.step == "ideal":
            ideal(args.data, names, args.threads, args.results)
        else:
            evaluate(args.data, names, args.threads, args.test_limit, args.masks, args.results)


if __name__ == "__main__":
    main()
