#!/usr/bin/env python
"""How much of a fix's wall time the onnx-graphsurgeon round trips (import, edits' cleanup/toposort, export)
take, per method, measured in the same run.

    python tools/bench_graph_edits.py --data ../shared/data/cifar10/train [--model models/densenet40-a05.onnx]

Wraps gs.import_onnx, Graph.cleanup, Graph.toposort and gs.export_onnx with timers, runs each calibrated
method of the registry once on --samples images (decoded beforehand) and prints the share of the fix's wall
time spent in them. The target is under 10% on the largest reference model.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import onnx_graphsurgeon as gs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_fix import load_samples  # noqa: E402  (tools/ is on the path when run as a script)
from vsonnx.methods import CALIBRATED, estimate  # noqa: E402


class Timer:
    """Accumulates the time spent inside the wrapped functions."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, owner, name: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        setattr(owner, name, timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "densenet40-a05.onnx")
    p.add_argument("--data", required=True)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    model, source, names = load_samples(args.model, args.data, args.samples)
    timer = Timer()
    for owner, name in ((gs, "import_onnx"), (gs, "export_onnx"), (gs.Graph, "cleanup"), (gs.Graph, "toposort")):
        timer.wrap(owner, name)
    print(f"model {args.model.name}: {len(model.graph.node)} nodes, {len(names)} BN in scope, {source.size} samples")
    for method in CALIBRATED:
        timer.seconds = 0.0
        t0 = time.perf_counter()
        estimate(method, model, names, source, threads=args.threads, device="cpu")
        wall = time.perf_counter() - t0
        print(f"{method:12s} fix {wall:7.2f} s, graph edits {timer.seconds:6.3f} s = {timer.seconds / wall:.1%}")


if __name__ == "__main__":
    main()
