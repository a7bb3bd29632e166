#!/usr/bin/env python
"""Do fix and eval on onnxruntime's CUDA execution provider agree with its CPU provider? (issue 23)

    python tools/gpu_check.py --data ../shared/data/cifar10 [--model models/preresnet20-a05.onnx]
        [--methods batch,population] [--devices cpu,cuda] [--calib-limit 5000] [--test-limit 10000]

A device is ``cpu`` or ``cuda``, optionally with a thread count, ``cpu:1``: ``--devices cpu:1,cpu:2`` compares
two computation paths of the CPU provider (at one thread the batch fix reads onnxruntime's training-mode BN, from
two on it computes the batch statistics with operators in the graph), which needs no GPU.

For each method, `fix` runs once per device on the same calibration images (DIR/train, seeded shuffle, the same
batches in the same order); then every written model and the original are evaluated on every device on the same
test images (DIR/test). Agreement, the first device being the reference:
- statistics: per BN and statistic (mean, var), max_c |s_c - r_c| / max_c |r_c| <= --rtol (1e-3), s the BN
  constants another device's fix wrote and r the reference device's (a norm-relative error: a channel whose mean
  is near 0 does not blow it up);
- top-1: every (fixed on, evaluated on) pair of a method scores the same top-1 as the reference pair, and the
  original scores the same on every device.
Printed with the times: each fix's seconds and each evaluation's images/s, per device. Exit 0 when everything
agrees, 1 when something does not, 3 when a device cannot run (e.g. `cuda` without the CUDA provider:
pip install onnxruntime-gpu). Only the methods that draw no random numbers are compared: relative's simulated
dropout draws on the CUDA provider (RandomUniformLike) but from numpy on the CPU one, and distill and data-free
draw in torch on the device, so their statistics differ between devices by Monte-Carlo noise, by design.

Measured on an H200 (onnxruntime-gpu 1.31.1, CUDA 13; 16 cores for the CPU provider; calibration 5,000, test
10,000 images for preresnet20-a05 and 5,000 for densenet40-a05; models/train/gpu_check/): with the CUDA
provider's default TF32 the statistics agreed (3.1e-4, 7.6e-4) but the fixed models scored 2 of 10,000 and
1 of 5,000 test images differently; vsonnx now asks for float32 (vsonnx.runtime.CUDA_PROVIDER), which gave
1.2e-7 to 2.8e-7 and equal top-1 on both. Times (CPU / CUDA): fix batch 2.4 / 3.1 s and 5.1 / 3.9 s,
population 5.8 / 3.9 s and 21.7 / 13.3 s; evaluation about 3,000 / 16,000 images/s (preresnet20) and
1,100 / 4,500 (densenet40).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vsonnx.accuracy import score_together  # noqa: E402
from vsonnx.data import open_source  # noqa: E402
from vsonnx.errors import VsonnxError  # noqa: E402
from vsonnx.graph import GraphIndex  # noqa: E402
from vsonnx.model import load_model  # noqa: E402
from vsonnx.recalibrate import FixOptions, fix_calibrated  # noqa: E402

COMPARABLE = ("batch", "population")  # the calibrated fixes that draw no random numbers


def bn_statistics(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """BN name -> (running mean, running var) the model holds, in float64."""
    names = [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    return {n: (s.mean, s.var) for n, s in GraphIndex(model).stored_statistics(names).items()}


def statistics_error(ours: dict, reference: dict) -> float:
    """Largest norm-relative difference over every BN and statistic: max_c |s_c - r_c| / max_c |r_c|."""
    worst = 0.0
    for name, stats in reference.items():
        for s, r in zip(ours[name], stats):
            worst = max(worst, float(np.abs(s - r).max() / max(np.abs(r).max(), 1e-12)))
    return worst


def device_spec(spec: str) -> tuple[str, int | None]:
    """'cuda' -> ('cuda', None); 'cpu:2' -> ('cpu', 2)."""
    device, _, threads = spec.partition(":")
    return device, int(threads) if threads else None


def fix_on_devices(model_path: Path, calib: Path, method: str, devices: list[str], out: Path, args) -> dict:
    """device spec -> (written model, FixReport) for one method."""
    fixed = {}
    for spec in devices:
        device, threads = device_spec(spec)
        options = FixOptions.of(limit=args.calib_limit, seed=0, device=device, threads=threads,
                                batch_size=args.batch_size, output=out / f"{method}.{spec.replace(':', '-')}.onnx")
        report = fix_calibrated(model_path, calib, method, options)
        if not report.written:
            raise VsonnxError(f"{method} on {device} wrote nothing: {report.message}", "try another model.")
        fixed[spec] = (load_model(report.output), report)
    return fixed


def top1_agrees(top1: dict[str, dict[str, float]], reference: str) -> bool:
    """``top1``: model ("original" or "METHOD@DEVICE", the device it was fixed on) -> evaluation device -> top-1.
    True when every model of a method scores on every device what the method fixed and evaluated on the
    reference device scores, and the original scores the same everywhere."""
    def expected(name: str) -> float:
        return top1[name if name == "original" else f"{name.split('@')[0]}@{reference}"][reference]
    return all(value == expected(name) for name, by_device in top1.items() for value in by_device.values())


def check(args) -> dict:
    """Every comparison of the module docstring, as a JSON-ready dict with ``agree``."""
    original = load_model(args.model)
    test = open_source(args.data / "test", original, shuffle=True, seed=0, limit=args.test_limit)
    rows, models = [], {"original": original}
    with tempfile.TemporaryDirectory(prefix="vsonnx-gpu-check-") as tmp:
        for method in args.methods:
            fixed = fix_on_devices(args.model, args.data / "train", method, args.devices, Path(tmp), args)
            reference = bn_statistics(fixed[args.devices[0]][0])
            for device, (model, report) in fixed.items():
                models[f"{method}@{device}"] = model
                rows.append({"method": method, "fixed_on": device, "provider": report.provider,
                             "fix_s": round(report.seconds, 2),
                             "stat_error": statistics_error(bn_statistics(model), reference)})
    evals = {}
    for spec in args.devices:
        device, threads = device_spec(spec)
        evals[spec] = score_together(models, test, batch_size=args.batch_size or 256, device=device, threads=threads)
    top1 = {name: {d: evals[d][name].top1 for d in args.devices} for name in models}
    speed = {name: {d: round(evals[d][name].images_per_s) for d in args.devices} for name in models}
    same_top1 = top1_agrees(top1, args.devices[0])
    same_stats = all(r["stat_error"] <= args.rtol for r in rows)
    return {"model": str(args.model), "devices": args.devices, "rtol": args.rtol, "fixes": rows, "top1": top1,
            "images_per_s": speed, "statistics_agree": same_stats, "top1_agree": same_top1,
            "agree": same_stats and same_top1}


def print_result(result: dict) -> None:
    devices = result["devices"]
    print(f"{result['model']}: reference device {devices[0]}")
    for r in result["fixes"]:
        print(f"  fix {r['method']:<10} on {r['fixed_on']:<5} ({r['provider']}): {r['fix_s']:7.2f} s, "
              f"statistics max norm-relative difference {r['stat_error']:.2e}")
    for name, by in result["top1"].items():
        cells = ", ".join(f"{d} {by[d]:.2f}% ({result['images_per_s'][name][d]} img/s)" for d in devices)
        print(f"  eval {name:<22} {cells}")
    print(f"statistics within {result['rtol']:g}: {result['statistics_agree']}; "
          f"top-1 equal: {result['top1_agree']}")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a folder with train/ and test/ image trees")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "preresnet20-a05.onnx")
    p.add_argument("--methods", default=",".join(COMPARABLE))
    p.add_argument("--devices", default="cpu,cuda", help="DEVICE[:THREADS],...; the first is the reference")
    p.add_argument("--calib-limit", type=int, default=5000)
    p.add_argument("--test-limit", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    args.methods, args.devices = args.methods.split(","), args.devices.split(",")
    refused = [m for m in args.methods if m not in COMPARABLE]
    if refused:
        p.error(f"not comparable across devices (their draws differ by design): {', '.join(refused)}")
    if len(set(args.devices)) != len(args.devices) or any(device_spec(d)[0] not in ("cpu", "cuda")
                                                          for d in args.devices):
        p.error("--devices: distinct cpu or cuda entries, each optionally :THREADS")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    try:
        result = check(args)
    except VsonnxError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 3
    print_result(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
