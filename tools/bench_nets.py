#!/usr/bin/env python
"""Scan and fix the ImageNet-size networks (vsonnx.nets.imagenet) at 224 x 224: sites per exporter, fix time
per 100 calibration images and peak memory per method.

    python tools/bench_nets.py [--archs resnet50 ...] [--samples 256] [--batch-size 32] [--threads N]

Each network (random weights, BN statistics at initialisation, Dropout-(a) 0.2, 1000 classes) is exported
with both exporters of `vsonnx.export`; `scan` must find the expected sites in both. Then `vsonnx fix` runs
with each calibrated re-estimation (batch, population, relative) on ``--samples`` random inputs in a fresh
process, which reports its wall time and its peak resident memory (ru_maxrss), model loading included.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vsonnx.model import load_model  # noqa: E402
from vsonnx.nets.imagenet import IMAGENET_SITES, build_imagenet  # noqa: E402
from vsonnx.sites import find_sites  # noqa: E402

METHODS = ("batch", "population", "relative")
CHILD = """
import json, resource, sys, time
import vsonnx
t0 = time.perf_counter()
r = vsonnx.fix(sys.argv[1], sys.argv[2], method=sys.argv[3], batch_size=int(sys.argv[4]), output=sys.argv[5],
               threads=int(sys.argv[6]) or None)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "written": r.written, "recalibrated": len(r.batchnorms), "samples": r.samples}))
"""


def export(arch: str, exporter: str, path: Path) -> float:
    import torch

    import vsonnx

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        vsonnx.export(build_imagenet(arch), torch.randn(2, 3, 224, 224), path, exporter=exporter)
    return time.perf_counter() - t0


def fix_in_child(path: Path, data: Path, method: str, batch_size: int, threads: int | None, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(data), method, str(batch_size), str(out),
                           str(threads or 0)], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="*", default=list(IMAGENET_SITES))
    p.add_argument("--exporters", nargs="*", default=["torchscript", "dynamo"])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None,
                   help="also write the rows as JSON (models/bench_nets.json: tools/reproduce.py puts them in RESULTS.md)")
    args = p.parse_args()
    print(TABLE_HEAD)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = folder / "x.npy"
        np.save(data, np.random.default_rng(0).standard_normal((args.samples, 3, 224, 224)).astype(np.float32))
        for arch in args.archs:
            for exporter in args.exporters:
                path = folder / f"{arch}.{exporter}.onnx"
                seconds = export(arch, exporter, path)
                scan = find_sites(load_model(path))
                for method in METHODS:
                    r = fix_in_child(path, data, method, args.batch_size, args.threads, folder / "fixed.onnx")
                    row = {"network": arch, "exporter": exporter, "batchnorms": len(scan.batchnorms),
                           "sites": len(scan.sites), "expected_sites": IMAGENET_SITES[arch],
                           "export_s": round(seconds, 1), "method": method, **r}
                    rows.append(row)
                    print(table_row(row), flush=True)
    if args.out:
        command = "python tools/bench_nets.py" + "".join(
            f" --{k.replace('_', '-')} {v}" for k, v in (("samples", args.samples), ("batch_size", args.batch_size),
                                                          ("threads", args.threads)) if v is not None)
        args.out.write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")


TABLE_HEAD = ("| network | exporter | BN | sites (expected) | export s | method | s per 100 images | peak MB | BN written |\n"
              "|---|---|---|---|---|---|---|---|---|")


def table_row(row: dict) -> str:
    """One markdown row of the table (also rendered by tools/reproduce.py from models/bench_nets.json)."""
    head = (f"| {row['network']} | {row['exporter']} | {row['batchnorms']} | {row['sites']} ({row['expected_sites']}) | "
            f"{row['export_s']:.0f} | {row['method']} |")
    if "error" in row:
        return f"{head} failed: {row['error']} | | |"
    return f"{head} {100 * row['seconds'] / row['samples']:.1f} | {row['peak_mb']:.0f} | {row['recalibrated']} |"


if __name__ == "__main__":
    main()
