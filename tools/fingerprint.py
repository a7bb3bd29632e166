#!/usr/bin/env python
"""A fingerprint of every fix method's statistics on one model: what a restructuring must leave unchanged.

    python tools/fingerprint.py --model models/preresnet20-a05.onnx --data ../shared/data/cifar10

For each way to fix (batch, population, relative, distill, the label-free and labelled choices, data-free
synthesis and the closed form, the named-sites correction of the model's own sites) it runs ``vsonnx.fix``
through its public keyword API (the script runs on older commits too, leaving out what they lack; without
``method_options`` distill runs its default steps) on a fixed, shuffled set of training images, reads every BatchNormalization's constants back from the
written model with onnx alone, and prints the sha256 of their float32 bytes in node order. Two runs on the same
machine print the same lines exactly when every method's statistics are bit for bit the same.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

CALIB, VAL = 512, 256


def bn_constants(path: Path) -> bytes:
    """Every BatchNormalization's scale, bias, mean and variance as float32 bytes, in node order."""
    model = onnx.load(str(path))
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = b""
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            for name in node.input[1:5]:
                out += np.ascontiguousarray(values[name], np.float32).tobytes()
    return out


def images(data: Path, model_path: Path, out: Path) -> tuple[Path, Path]:
    """calib.npz (CALIB images) and val.npz (VAL other images with labels), shuffled training images, seed 0."""
    from vsonnx.data import open_source
    from vsonnx.model import load_model

    source = open_source(data / "train", load_model(model_path), shuffle=True, seed=0, limit=CALIB + VAL)
    xs, ys = [], []
    for batch in source.batches(256):
        xs.append(next(iter(batch.feeds.values())))
        ys.append(batch.labels)
    x, y = np.concatenate(xs), np.concatenate(ys)
    np.savez(out / "calib.npz", x=x[:CALIB])
    np.savez(out / "val.npz", x=x[CALIB:], y=y[CALIB:])
    return out / "calib.npz", out / "val.npz"


def runs(calib: Path, val: Path) -> dict[str, dict]:
    """Method label -> keyword arguments of vsonnx.fix."""
    quick = {"distill": {"steps": 30}}
    return {"batch": {"calib": calib, "method": "batch"},
            "population": {"calib": calib, "method": "population"},
            "relative": {"calib": calib, "method": "relative"},
            "distill": {"calib": calib, "method": "distill", "method_options": quick},
            "label-free (--val-split 0.25)": {"calib": calib, "val_split": 0.25, "method_options": quick},
            "labelled (--val)": {"calib": calib, "val": val, "method_options": quick},
            "data-free (synthesized)": {"data_free": True, "synthetic": 64, "synthetic_steps": 20},
            "data-free (closed form)": {"data_free": True, "synthetic": 0},
            "all BNs (--all, population)": {"calib": calib, "method": "population", "scope": "all"}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/preresnet20-a05.onnx"))
    p.add_argument("--data", type=Path, required=True, help="CIFAR-10 image folder tree (train/ inside)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import dataclasses

    import vsonnx
    from vsonnx.recalibrate import FixOptions

    flat = getattr(FixOptions, "KEYWORDS", None) or {f.name for f in dataclasses.fields(FixOptions)}  # grouped since
    known = set(flat) | {"calib", "method", "data_free"}
    with tempfile.TemporaryDirectory(prefix="vsonnx-fingerprint-") as tmp:
        calib, val = images(args.data, args.model, Path(tmp))
        for label, kwargs in runs(calib, val).items():
            kwargs = {k: v for k, v in kwargs.items() if k in known or k != "method_options"}
            if set(kwargs) - known:
                print(f"{label:32s} (not in this version)", flush=True)
                continue
            out = Path(tmp) / "fixed.onnx"
            report = vsonnx.fix(args.model, output=out, threads=args.threads, device="cpu", batch_size=64,
                                force=True, **kwargs)
            chosen = f" chose {report.chosen}" if report.chosen and ("val" in kwargs or "val_split" in kwargs) else ""
            digest = hashlib.sha256(bn_constants(out)).hexdigest()[:16] if report.written else "not written"
            print(f"{label:32s} {digest}{chosen}", flush=True)
            out.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
