#!/usr/bin/env python
"""The variance-shift suite (issue 23): train its members, fix the design/check halves, evaluate.

    python tools/suite.py assign                                   # models/suite/halves.json (seeded, first)
    python tools/suite.py train --data ../shared/data/cifar10      # train what is missing, one after another

Members and their training arguments are in ``tools/suite_members.py``. Each trained member lands in
``models/suite/NAME.onnx`` with its training card, configuration and log in ``models/suite/train/NAME/``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite_members import HALVES_SEED, MEMBERS, TRAIN_THREADS, halves  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "models" / "suite"
KEPT = ("card.json", "config.json", "log.csv")


def assign() -> Path:
    """Write the seeded design/check assignment; refuses to change one already written."""
    path = SUITE / "halves.json"
    table = {"seed": HALVES_SEED, "halves": halves(HALVES_SEED)}
    if path.exists() and json.loads(path.read_text()) != table:
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    sub.add_parser("assign", help="write models/suite/halves.json")
    t = sub.add_parser("train", help="train the members not yet in models/suite")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--only", default=None, help="comma-separated member names")
    t.add_argument("--runs", type=Path, default=ROOT / "runs" / "suite")
    args = p.parse_args(argv)
    if args.step == "assign":
        print(assign())
    elif args.step == "train":
        names = args.only.split(",") if args.only else list(MEMBERS)
        unknown = sorted(set(names) - set(MEMBERS))
        if unknown:
            raise SystemExit(f"unknown members: {unknown}")
        train(args.data, names, args.runs)


if __name__ == "__main__":
    main()
