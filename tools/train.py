#!/usr/bin/env python
"""Train a reference CIFAR network with the paper's dropout placements and export it with vsonnx.export.

    python tools/train.py --arch preresnet --depth 20 --dropout 0.5 --placement a \
        --dataset cifar10 --data ../shared/data/cifar10 --epochs 30 --out runs/preresnet20-a05
    torchrun --nproc_per_node 2 tools/train.py ...        # DistributedDataParallel (nccl on CUDA, gloo on CPU)

Writes to --out: config.json (every choice), log.csv and log.json (per epoch), checkpoint.pt (each epoch;
--resume continues from it), model.onnx (vsonnx.export, with metadata) and card.json / card.md.
A run trained with --no-export (a GPU machine without the exporter) is exported later, on the CPU, with
`--export-only --out RUN --data DIR` (the network and facts come from RUN's config.json and card.json).
The whole dataset is decoded once into memory as uint8 (150 MB for CIFAR); augmentation (pad 4 + random
crop, horizontal flip) and normalisation run per batch on the training device.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

import vsonnx  # noqa: E402
from vsonnx.data.cifar import CIFAR_MEAN, CIFAR_STD, load_cifar  # noqa: E402
from vsonnx.nets import ARCHITECTURES, NOISES, PLACEMENTS, DropoutConfig, build  # noqa: E402
from vsonnx.runtime import progress_bar  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default="preresnet")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--widen", type=int, default=4, help="Wide ResNet width k")
    p.add_argument("--cardinality", type=int, default=8, help="ResNeXt groups")
    p.add_argument("--base-width", type=int, default=64, help="ResNeXt width per group")
    p.add_argument("--growth", type=int, default=12, help="DenseNet growth rate k")
    p.add_argument("--width", type=int, default=None,
                   help="stem / first-stage channels: plain CNN (default 32), ResNeXt (default 64)")
    p.add_argument("--head", choices=("linear", "mlp"), default="linear",
                   help="plain CNN: classifier head (mlp: Linear -> [a] -> BatchNorm1d -> ReLU -> fc)")
    p.add_argument("--bn-momentum", type=bn_momentum, default=0.1,
                   help="BN running-statistics momentum, or 'cumulative' (the plain average of every batch)")
    p.add_argument("--dropout", type=float, default=0.0, help="drop ratio (or Uout beta)")
    p.add_argument("--placement", choices=PLACEMENTS, default="none")
    p.add_argument("--noise", choices=NOISES, default="dropout")
    p.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10")
    p.add_argument("--data", type=Path, default=None, help="image folder tree (train/, test/) or python release")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="pad-4 random crop and horizontal flip")
    p.add_argument("--schedule", choices=("cosine", "step", "onecycle"), default="cosine")
    p.add_argument("--milestones", default="0.5,0.75", help="step schedule: fractions of training, x0.1 each")
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="on CUDA")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--export-only", action="store_true",
                   help="train nothing: export OUT/checkpoint.pt of a finished run (one trained with --no-export, "
                        "e.g. on a GPU machine without the exporter) with the network and facts of its "
                        "config.json and card.json")
    return p.parse_args(argv)


def bn_momentum(text: str) -> float | None:
    """``--bn-momentum``: a number in (0, 1], or ``cumulative`` (PyTorch's momentum=None)."""
    if text == "cumulative":
        return None
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"BN momentum must be in (0, 1] or 'cumulative', got {text}")
    return value


def setup_distributed(device_kind: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def lr_at(step: int, total: int, args) -> float:
    warm = int(args.warmup_epochs * total / max(args.epochs, 1))
    if step < warm:
        return args.lr * (step + 1) / warm
    t = (step - warm) / max(total - warm, 1)
    if args.schedule == "cosine":
        return 0.5 * args.lr * (1 + math.cos(math.pi * t))
    if args.schedule == "onecycle":
        return args.lr * (t / 0.3 if t < 0.3 else 0.5 * (1 + math.cos(math.pi * (t - 0.3) / 0.7)))
    return args.lr * 0.1 ** sum(t >= float(m) for m in args.milestones.split(","))


class GpuAugment:
    """Pad-4 random crop + horizontal flip + per-channel normalisation of a uint8 NHWC batch, on device."""

    def __init__(self, mean, std, device):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def normalise(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = x_uint8.permute(0, 3, 1, 2).float().div_(255)
        return (x - self.mean) / self.std

    def train(self, x_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = self.normalise(x_uint8)
        n, _, h, w = x.shape
        padded = F.pad(x, (4, 4, 4, 4))
        dev = x.device
        oy = torch.randint(0, 9, (n,), generator=generator).to(dev)
        ox = torch.randint(0, 9, (n,), generator=generator).to(dev)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        chan = torch.arange(3, device=dev)[None, :, None, None]
        x = padded[torch.arange(n, device=dev)[:, None, None, None], chan, rows, cols]
        flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
        return torch.where(flip[:, None, None, None], x.flip(3), x)


def evaluate(model, x, y, aug, batch, device, autocast) -> float:
    model.eval()
    correct = 0
    with torch.no_grad(), autocast():
        for i in range(0, len(x), batch):
            xb = aug.normalise(x[i:i + batch].to(device, non_blocking=True))
            correct += (model(xb).argmax(1).cpu() == y[i:i + batch]).sum().item()
    return 100.0 * correct / max(len(x), 1)


@dataclass
class Run:
    """Where and how this process trains: its rank in the job, its device and the precision switches."""

    args: argparse.Namespace
    rank: int
    world: int
    local_rank: int
    device_kind: str
    device: torch.device

    @property
    def channels_last(self) -> bool:
        return self.device_kind == "cuda" and self.args.channels_last

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device_kind == "cuda" and self.args.bf16)


def start(args: argparse.Namespace) -> Run:
    """Pick the device, join the distributed job (torchrun), seed, create the output folder."""
    device_kind = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    rank, world, local_rank = setup_distributed(device_kind)
    device = torch.device(f"cuda:{local_rank}" if device_kind == "cuda" else "cpu")
    if device_kind == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed + rank)
    args.out.mkdir(parents=True, exist_ok=True)
    return Run(args, rank, world, local_rank, device_kind, device)


def build_network(run: Run, num_classes: int):
    """(model, net to train (DDP-wrapped when distributed), dropout config); same initial weights on every rank."""
    args = run.args
    dropout = DropoutConfig(args.placement, args.dropout if args.placement != "none" else 0.0, args.noise)
    options = {"widen": args.widen, "cardinality": args.cardinality, "base_width": args.base_width,
               "growth": args.growth, "width": args.width, "head": args.head}
    torch.manual_seed(args.seed)
    model = build(args.arch, args.depth, num_classes, dropout, **options).to(run.device)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = args.bn_momentum
    if run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if run.world > 1 and args.sync_bn:
        if run.device_kind == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif run.rank == 0:
            print("warning: --sync-bn ignored: SyncBatchNorm runs on CUDA only", file=sys.stderr)
    net = model
    if run.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.local_rank] if run.device_kind == "cuda" else None)
    return model, net, dropout


def make_optimizer(model, args) -> torch.optim.Optimizer:
    """SGD (or Adam, with decoupled weight decay: AdamW) with weight decay on weights of rank >= 2 only (not on
    BN parameters and biases)."""
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=args.lr)
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov)


def train_epoch(run: Run, net, optimizer, aug, data, order, generator, epoch: int, steps_per_epoch: int) -> dict:
    """One epoch over ``order`` (this rank's sample indices); returns the loss sum, hits and samples seen."""
    args = run.args
    train_x, train_y = data
    total = steps_per_epoch * args.epochs
    loss_sum, correct, seen = 0.0, 0, 0
    show = run.rank == 0 and not args.no_progress
    with progress_bar(f"epoch {epoch + 1}/{args.epochs}", steps_per_epoch, show, unit="step") as bar:
        for step in range(steps_per_epoch):
            bar.update(1)
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            if len(idx) < 2:
                continue
            raw = train_x[idx.to(train_x.device)]
            xb = aug.train(raw, generator) if args.augment else aug.normalise(raw)
            yb = train_y[idx].to(run.device, non_blocking=True)
            if run.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + step, total, args)
            with run.autocast():
                logits = net(xb)
                loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", refresh=False)
    return {"loss_sum": loss_sum, "correct": correct, "seen": seen}


def run_config(run: Run, argv, num_classes: int, dropout) -> dict:
    """Every choice of the run, as config.json records it."""
    return {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(run.args).items()},
            "world_size": run.world, "device_kind": run.device_kind, "num_classes": num_classes,
            "dropout_config": dropout.to_dict(), "optimizer": "AdamW" if run.args.optimizer == "adam" else "SGD",
            "loss": "cross-entropy", "augmentation": ("pad 4 + random crop 32, horizontal flip, " if run.args.augment
                                                      else "") + "per-channel normalisation",
            "command": "python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.export_only:
        return export_finished(args)
    run = start(args)
    data = load_cifar(args.dataset, args.data, args.limit_train, args.limit_test)
    train_x, train_y = (torch.from_numpy(a) for a in data["train"])
    test_x, test_y = (torch.from_numpy(a) for a in data["test"])
    if run.device_kind == "cuda":
        train_x, test_x = train_x.to(run.device), test_x.to(run.device)
    model, net, dropout = build_network(run, len(data["classes"]))
    optimizer = make_optimizer(model, args)
    aug = GpuAugment(CIFAR_MEAN[args.dataset], CIFAR_STD[args.dataset], run.device)
    sampler = torch.utils.data.DistributedSampler(range(len(train_x)), num_replicas=run.world, rank=run.rank,
                                                  shuffle=True, seed=args.seed, drop_last=True)
    steps_per_epoch = math.ceil(len(sampler) / args.batch_size)
    config = run_config(run, argv, len(data["classes"]), dropout)
    start_epoch, history, elapsed = 0, [], 0.0
    ckpt_path = args.out / "checkpoint.pt"
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=run.device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, history, elapsed = ckpt["epoch"], ckpt["history"], ckpt["elapsed"]
    if run.rank == 0:
        (args.out / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(args.seed * 1000 + run.rank)
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        net.train()
        sampler.set_epoch(epoch)
        generator.manual_seed(args.seed * 1000 + run.rank * 100003 + epoch)
        sums = train_epoch(run, net, optimizer, aug, (train_x, train_y), torch.tensor(list(iter(sampler))), generator,
                           epoch, steps_per_epoch)
        elapsed += time.time() - t0
        test_acc = None
        if run.rank == 0 and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            test_acc = evaluate(model, test_x, test_y, aug, 512, run.device, run.autocast)
        history.append({"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                        "train_loss": sums["loss_sum"] / max(sums["seen"], 1),
                        "train_acc": 100.0 * sums["correct"] / max(sums["seen"], 1), "test_acc": test_acc,
                        "epoch_s": time.time() - t0})
        if run.rank == 0:
            print(json.dumps(history[-1]), flush=True)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                        "history": history, "elapsed": elapsed}, ckpt_path)
            write_logs(args.out, history)
    result = finish(run, model, aug, (test_x, test_y), data, config, elapsed, dropout) if run.rank == 0 else {}
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def finish(run: Run, model, aug, test, data, config: dict, elapsed: float, dropout) -> dict:
    """Rank 0 after training: final test accuracy, export, card."""
    args = run.args
    test_x, test_y = test
    result = {"pytorch_test_acc": evaluate(model, test_x, test_y, aug, 512, run.device, run.autocast),
              "train_wall_s": round(elapsed, 1), "epochs": args.epochs, "seed": args.seed, "command": config["command"],
              "arch": args.arch, "depth": args.depth, "dropout": dropout.to_dict(), "dataset": args.dataset,
              "test_samples": len(test_x), "train_samples": len(data["train"][0]), "device": str(run.device),
              "world_size": run.world,
              "recipe": {k: getattr(args, k) for k in ("optimizer", "lr", "bn_momentum", "augment", "batch_size",
                                                       "weight_decay", "schedule", "width", "head", "widen",
                                                       "growth", "cardinality", "base_width")}}
    if not args.no_export:
        export_model(model, args, data["classes"], result)
    (args.out / "card.json").write_text(json.dumps(result, indent=2))
    (args.out / "card.md").write_text(card_markdown(result))
    return result


# The options of config.json that define the network: --export-only rebuilds it from these.
NETWORK_OPTIONS = ("arch", "depth", "widen", "cardinality", "base_width", "growth", "width", "head", "bn_momentum",
                   "dropout", "placement", "noise", "dataset")


def export_finished(args: argparse.Namespace) -> dict:
    """Export a finished run's last checkpoint on the CPU and rewrite its card, keeping the run's own facts
    (device, command, wall time, PyTorch test accuracy). Refuses a run whose checkpoint stopped before its
    last epoch (the card would describe another network)."""
    files = {name: args.out / name for name in ("config.json", "card.json", "checkpoint.pt")}
    missing = [name for name, path in files.items() if not path.exists()]
    if missing:
        raise vsonnx.VsonnxError(f"--export-only: no {', '.join(missing)} in '{args.out}'.",
                                 "pass --out of a finished tools/train.py run.")
    config, result = (json.loads(files[n].read_text()) for n in ("config.json", "card.json"))
    checkpoint = torch.load(files["checkpoint.pt"], map_location="cpu", weights_only=False)
    if checkpoint["epoch"] != result["epochs"]:
        raise vsonnx.VsonnxError(f"--export-only: the checkpoint holds epoch {checkpoint['epoch']} of "
                                 f"{result['epochs']}.", "finish the run with --resume first.")
    for option in NETWORK_OPTIONS:
        setattr(args, option, config[option])
    classes = load_cifar(args.dataset, args.data, 1, 1)["classes"]
    model, _, _ = build_network(Run(args, 0, 1, 0, "cpu", torch.device("cpu")), len(classes))
    model.load_state_dict(checkpoint["model"])
    export_model(model, args, classes, result)
    (args.out / "card.json").write_text(json.dumps(result, indent=2))
    (args.out / "card.md").write_text(card_markdown(result))
    return result


def export_model(model, args, classes, result: dict) -> None:
    cpu = model.float().cpu().to(memory_format=torch.contiguous_format).eval()
    preprocess = {"mean": list(CIFAR_MEAN[args.dataset]), "std": list(CIFAR_STD[args.dataset]),
                  "size": [32, 32], "layout": "nchw", "scale": 1 / 255}
    vsonnx.export(cpu, torch.randn(2, 3, 32, 32), args.out / "model.onnx", preprocess=preprocess,
                  class_names=classes, metadata={"train": {k: v for k, v in result.items()}})
    result["onnx"] = str(args.out / "model.onnx")


def write_logs(out: Path, history: list[dict]) -> None:
    (out / "log.json").write_text(json.dumps(history, indent=1))
    with open(out / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def card_markdown(r: dict) -> str:
    d = r["dropout"]
    return (f"# {r['arch']}-{r['depth']} ({r['dataset']}), dropout {d['noise']} {d['ratio']} placement {d['placement']}\n\n"
            f"- command: `{r['command']}`\n- seed {r['seed']}, {r['epochs']} epochs, {r['train_wall_s']} s on {r['device']}\n"
            f"- PyTorch test accuracy: {r['pytorch_test_acc']:.2f}% on {r['test_samples']} images\n")


if __name__ == "__main__":
    try:
        main()
    except vsonnx.VsonnxError as exc:  # user errors: one line and a hint, no traceback
        print(f"Error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"Hint: {exc.hint}", file=sys.stderr)
        sys.exit(exc.exit_code)
