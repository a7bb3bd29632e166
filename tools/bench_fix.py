#!/usr/bin/env python
"""Time `vsonnx fix` against plain onnxruntime inference over the same samples, in the same run.

    python tools/bench_fix.py --data ../shared/data/cifar10/train [--model models/preresnet20-a05.onnx] [--threads N]

Images are decoded once into memory first, so every timing below is onnxruntime work plus vsonnx's own
overhead (graph rewriting, session creation, statistics), not JPEG decoding. Prints, for each calibrated
method of the registry, the best of --repeat runs over the best plain-inference time, over the floor (the
same inference with every BN unfolded, what a pass normalising with batch statistics cannot beat; two of
them for the relative method) and over PyTorch's own re-estimation of the same network (BN in train mode,
momentum=None, dropout off; same samples, batch size and threads); the distillation (its default steps, once)
over plain inference only. `fix --data-free` (synthesis of 64
inputs, 100 steps, in torch; once, as it is the slowest) is put on the same scale, and `eval`'s images/s
from the image folder (decoding overlapped with inference) is compared with preloaded arrays.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vsonnx.data import ArraySource, open_source  # noqa: E402
from vsonnx.instrument import working_copy  # noqa: E402
from vsonnx.methods import CALIBRATED, REGISTRY, estimate  # noqa: E402
from vsonnx.model import load_model  # noqa: E402
from vsonnx.rewrite import targets  # noqa: E402
from vsonnx.runtime import make_session  # noqa: E402
from vsonnx.sites import find_sites  # noqa: E402


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def load_samples(model_path: Path, data: str, samples: int):
    """(model, its first ``samples`` images of ``data`` decoded into memory as a source, the BNs fix would
    estimate): every timing then measures onnxruntime and vsonnx, not JPEG decoding."""
    model = load_model(model_path)
    decoded = open_source(data, model, limit=samples, seed=0)
    xs = np.concatenate([b.feeds[next(iter(b.feeds))] for b in decoded.batches(512)])
    names = [b.name for b in targets(find_sites(model).batchnorms, "sites")]
    return model, ArraySource.from_arrays(model, xs, None, shuffle=False), names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "preresnet20-a05.onnx")
    p.add_argument("--data", required=True)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-data-free", action="store_true", help="skip timing the data-free synthesis")
    p.add_argument("--methods", default=",".join(CALIBRATED), help="calibrated methods to time (comma-separated)")
    p.add_argument("--no-eval", action="store_true", help="skip the eval images/s comparison")
    args = p.parse_args()

    model, source, names = load_samples(args.model, args.data, args.samples)

    session = make_session(working_copy(model), device=args.device, threads=args.threads)
    out = session.get_outputs()[0].name

    def infer():
        for b in source.batches(args.batch_size):
            session.run([out], b.feeds)

    infer()  # warm-up
    base = best_of(args.repeat, infer)
    print(f"model {args.model.name}: {len(names)} BN re-estimated, {source.size} samples, batch {args.batch_size}, "
          f"provider {session.get_providers()[0]}")
    print(f"plain onnxruntime inference         {base:7.3f} s   1.00x")
    unfolded = make_session(working_copy(model), device=args.device, threads=args.threads,
                            disabled_optimizers=["ConvBNFusion"])

    def infer_unfolded():
        for b in source.batches(args.batch_size):
            unfolded.run([out], b.feeds)

    infer_unfolded()
    floor = best_of(args.repeat, infer_unfolded)
    print(f"{'inference, BN unfolded (the floor)':35s} {floor:7.3f} s   {floor / base:.2f}x")
    eager = pytorch_recalibration(source, args)
    print(f"{'PyTorch eager recalibration':35s} {eager:7.3f} s   {eager / base:.2f}x")
    for method in [m for m in args.methods.split(",") if m]:
        repeat = 1 if REGISTRY[method].needs_torch else args.repeat  # the distillation: once, it is the slowest
        seconds = best_of(repeat, lambda: estimate(method, model, names, source, batch_size=args.batch_size,
                                                   device=args.device, threads=args.threads))
        if method == "distill":
            steps = REGISTRY["distill"].settings["steps"]
            print(f"{'fix --method distill':35s} {seconds:7.3f} s   {seconds / base:.2f}x   ({steps} steps of "
                  f"{args.batch_size} samples: teacher in onnxruntime, student forward and backward in torch)")
            continue
        passes = 2 if method == "relative" else 1
        print(f"{'fix --method ' + method:35s} {seconds:7.3f} s   {seconds / base:.2f}x   "
              f"{seconds / (passes * floor):.2f}x of {passes} floor pass(es), {seconds / eager:.2f}x PyTorch")
    if not args.no_data_free:
        from vsonnx.methods.synthesized import synthetic_statistics

        seconds = best_of(1, lambda: synthetic_statistics(model, names, device=args.device, seed=0))
        print(f"{'fix --data-free (torch)':35s} {seconds:7.3f} s   {seconds / base:.2f}x")
    if not args.no_eval:
        eval_rates(model, args)


def pytorch_recalibration(source, args) -> float:
    """Best time of PyTorch's own BN re-estimation of the same network (vsonnx.nets PreResNet-20 with dropout
    (a) 0.5, random weights): BN modules in train mode with momentum=None, Dropout in eval mode, the same
    samples, batch size and threads, no gradients."""
    import torch

    from vsonnx.nets import DropoutConfig, build

    if args.threads:
        torch.set_num_threads(args.threads)
    net = build("preresnet", 20, 10, DropoutConfig("a", 0.5)).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
            m.train()
    batches = [torch.from_numpy(b.feeds[next(iter(b.feeds))]) for b in source.batches(args.batch_size)]

    def recalibrate():
        with torch.no_grad():
            for x in batches:
                net(x)

    recalibrate()  # warm-up
    return best_of(args.repeat, recalibrate)


def eval_rates(model, args) -> None:
    """vsonnx eval's images/s on the image folder (decoding overlapped with inference) and on the same images
    preloaded as arrays; the ratio shows what decoding still costs."""
    from vsonnx.accuracy import score_together

    def rate(make_source) -> float:
        source = make_source()
        seconds = best_of(1, lambda: score_together({"m": model}, source, batch_size=args.batch_size,
                                                    device=args.device, threads=args.threads))
        return source.size / seconds

    folder = open_source(args.data, model, limit=args.samples, seed=0)
    decoded = [b for b in folder.batches(512)]
    preloaded = ArraySource.from_arrays(model, np.concatenate([b.feeds[next(iter(b.feeds))] for b in decoded]),
                                        np.concatenate([b.labels for b in decoded]), shuffle=False)
    from_folder = rate(lambda: open_source(args.data, model, limit=args.samples, seed=0))
    from_arrays = rate(lambda: preloaded)
    print(f"eval from the image folder          {from_folder:7.0f} images/s   {from_folder / from_arrays:.2f}x "
          f"of preloaded arrays ({from_arrays:.0f} images/s)")


if __name__ == "__main__":
    main()
