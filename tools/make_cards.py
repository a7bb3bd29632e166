#!/usr/bin/env python
"""Measure the reference models with onnxruntime and write their cards and models/README.md.

    python tools/make_cards.py --data ../shared/data/cifar10 [--names preresnet20-a05 ...]

For each models/<name>.onnx (trained by tools/train.py; its training facts are in models/train/<name>/):
ORT test accuracy of the file, then `vsonnx fix` with the batch and the population method, calibrated on
5,000 shuffled training images (seed 0), and ORT test accuracy of both fixed models on the 10,000 test
images. Writes models/<name>.json and models/<name>.md, then the table of all cards in models/README.md.
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

from vsonnx.accuracy import _Scorer  # noqa: E402
from vsonnx.data import check_finite, open_source  # noqa: E402
from vsonnx.model import load_model  # noqa: E402
from vsonnx.recalibrate import fix  # noqa: E402
from vsonnx.sites import find_sites  # noqa: E402

MODELS = ROOT / "models"
CALIB_SAMPLES = 5000


def reproducible_command(train_card: dict, name: str) -> str:
    """The training command with this checkout's data and output paths."""
    words = train_card["command"].split()
    for flag, value in (("--data", "../shared/data/cifar10"), ("--out", f"runs/{name}")):
        if flag in words:
            words[words.index(flag) + 1] = value
    return " ".join(w for w in words if w not in ("--no-progress",))


def measure(name: str, data: Path, threads: int | None) -> dict:
    path = MODELS / f"{name}.onnx"
    model = load_model(path)
    train_card = json.loads((MODELS / "train" / name / "card.json").read_text())
    report = find_sites(model, str(path))
    card = {
        "name": name, "onnx": f"models/{name}.onnx", "arch": train_card["arch"], "depth": train_card["depth"],
        "dropout": train_card["dropout"], "dataset": train_card["dataset"], "seed": train_card["seed"],
        "epochs": train_card["epochs"], "train_wall_s": train_card["train_wall_s"],
        "train_device": train_card["device"], "train_command": reproducible_command(train_card, name),
        "pytorch_test_acc": train_card["pytorch_test_acc"], "batchnorms": len(report.batchnorms),
        "sites": len(report.sites), "site_paths": sorted({b.path for b in report.sites}),
        "calibration": f"{CALIB_SAMPLES} shuffled training images (seed 0)",
        "evaluation": "all 10,000 test images",
    }
    calib = open_source(data / "train", model, shuffle=True, seed=0, limit=CALIB_SAMPLES)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"ort": path}
        for method in ("batch", "population"):
            if not report.sites:
                continue
            out = Path(tmp) / f"{name}.{method}.onnx"
            t0 = time.perf_counter()
            result = fix(path, calib, output=out, method=method, threads=threads)
            card[f"fix_{method}_s"] = round(time.perf_counter() - t0, 1)
            card[f"recalibrated_{method}"] = len(result.batchnorms)
            paths[method] = out
        test = open_source(data / "test", model, shuffle=False)
        scorers = {k: _Scorer(load_model(p), "cpu", threads) for k, p in paths.items()}
        for batch in test.batches(256):
            check_finite(batch, test)
            for s in scorers.values():
                s.run(batch.feeds, batch.labels)
        for key, scorer in scorers.items():
            r = scorer.report(key)
            label = "ort_test_acc" if key == "ort" else f"ort_test_acc_fixed_{key}"
            card[label] = round(r.top1, 2)
            card["test_samples"] = r.samples
    card["fix_commands"] = [f"vsonnx fix models/{name}.onnx --calib ../shared/data/cifar10/train --limit {CALIB_SAMPLES} "
                            f"--method {m} -o {name}.{m}.onnx" for m in ("batch", "population")]
    card["eval_command"] = f"vsonnx eval MODEL --data ../shared/data/cifar10/test"
    return card


def card_markdown(c: dict) -> str:
    d = c["dropout"]
    lines = [
        f"# {c['name']}: {c['arch']}-{c['depth']}, {d['noise']} {d['ratio']} placement {d['placement']} ({c['dataset']})",
        "",
        f"- training: `{c['train_command']}` (seed {c['seed']}, {c['epochs']} epochs, {c['train_wall_s']} s on "
        f"{c['train_device']}; PyTorch test accuracy {c['pytorch_test_acc']:.2f}%)",
        f"- graph: {c['batchnorms']} BatchNormalization, {c['sites']} Dropout->BN sites ({', '.join(c['site_paths']) or 'none'})",
        f"- onnxruntime test accuracy of the file: {c['ort_test_acc']:.2f}% ({c['test_samples']} images)",
    ]
    for m in ("batch", "population"):
        if f"ort_test_acc_fixed_{m}" in c:
            lines.append(f"- after `vsonnx fix --method {m}` ({c['calibration']}, {c[f'fix_{m}_s']} s): "
                         f"{c[f'ort_test_acc_fixed_{m}']:.2f}% "
                         f"({c[f'ort_test_acc_fixed_{m}'] - c['ort_test_acc']:+.2f} points)")
    lines += ["", "Reproduce:", "", *[f"    {cmd}" for cmd in c["fix_commands"]],
              f"    {c['eval_command']}", ""]
    return "\n".join(lines)


def readme(cards: list[dict]) -> str:
    rows = ["| model | dropout | sites | PyTorch | ORT | fixed (batch) | fixed (population) |",
            "|---|---|---|---|---|---|---|"]
    for c in cards:
        d = c["dropout"]
        fb = c.get("ort_test_acc_fixed_batch")
        fp = c.get("ort_test_acc_fixed_population")
        rows.append(f"| [{c['name']}]({c['name']}.md) | {d['placement']} {d['ratio']} | {c['sites']} | "
                    f"{c['pytorch_test_acc']:.2f} | {c['ort_test_acc']:.2f} | {'-' if fb is None else f'{fb:.2f}'} | "
                    f"{'-' if fp is None else f'{fp:.2f}'} |")
    return "\n".join([
        "# Reference models",
        "",
        "CIFAR-10 networks trained by `tools/train.py` (commands in each card), exported with `vsonnx.export`",
        "(Dropout and BN kept), and measured by `tools/make_cards.py`: test accuracy (%) on the 10,000 test",
        "images with onnxruntime before and after `vsonnx fix` (calibration: 5,000 shuffled training images).",
        "This table is generated; do not edit it by hand.",
        "",
        *rows,
        "",
        "Training logs and configurations are in `train/<name>/`. `train/densenet40-a05-incomplete/` is the log",
        "of a DenseNet-BC-40 run that did not finish within the GPU time this project had; it has no model.",
        "",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="CIFAR-10 folder with train/ and test/")
    p.add_argument("--names", nargs="*", default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    names = args.names or sorted(d.name for d in (MODELS / "train").iterdir()
                                 if (MODELS / f"{d.name}.onnx").exists())
    for name in names:
        card = measure(name, args.data, args.threads)
        (MODELS / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
        (MODELS / f"{name}.md").write_text(card_markdown(card))
        print(json.dumps({k: card[k] for k in card if "acc" in k}), name, flush=True)
    cards = [json.loads(p.read_text()) for p in sorted(MODELS.glob("*.json"))]
    (MODELS / "README.md").write_text(readme(cards))


if __name__ == "__main__":
    main()
