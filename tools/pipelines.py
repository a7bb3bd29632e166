#!/usr/bin/env python
"""Third-party pipelines as their users run them (issue 22), each checked against its framework's own
re-estimation; writes models/PIPELINES.md (generated, never hand-edited).

    pip install -e ".[pipelines]"          # onnxslim, onnxsim (tensorflow/tf2onnx: a Python of their own)
    python tools/pipelines.py --data ../shared/data/cifar10 --tf-python /path/to/python-with-tensorflow

Each network gets its BN statistics from a statistics-setting run (training-mode passes with dropout on over
2,000 training images: what the stored statistics of a trained network are), goes through the pipeline, is
fixed with `vsonnx fix` as that framework's user would (the names they know, or nothing where vsonnx
restores the sites), and its logits on 1,000 test images are compared with the framework's reference on the
same weights: PyTorch's (Keras's) re-estimation with dropout off for BNs the pipeline kept, and for BNs it
folded the identifiable relative rule done in the framework (the stored statistics moved by the change
between dropout-on and dropout-off moments of the BN input, BN by BN in order; DESIGN 5.6). The distance is
mean |logit difference| / standard deviation of the reference logits (target: within 1%); "unfixed" is the
same distance for the model before the fix. Networks with random weights are compared by logits; the trained
reference model (models/preresnet20-a05.onnx, its PyTorch weights rebuilt by tools/reproduce.py) also by top-1
(target: within 0.3 points of the reference). timm (from the `pipelines` extra) imports torchvision, whose PyPI
build is a CUDA build: ``import_timm`` says how it is imported beside the CPU torch; without timm its rows
are left out and the table says so.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/reproduce.py: the reference models in PyTorch

import vsonnx  # noqa: E402
from vsonnx.data.cifar import CIFAR_MEAN, CIFAR_STD, load_cifar  # noqa: E402
from vsonnx.nets import DropoutConfig, StochasticDepth, build  # noqa: E402
from vsonnx.runtime import make_session  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STATS_IMAGES, TEST_IMAGES = 2000, 1000
NOISE = (nn.Dropout, StochasticDepth)  # modules whose noise is on in training only


class Unit(nn.Module):
    """torchvision-style nesting: a ``block`` Sequential conv -> drop -> bn -> relu."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                               drop=nn.Dropout(0.3), bn=nn.BatchNorm2d(cout), relu=nn.ReLU()))

    def forward(self, x):
        return self.block(x)


class NestedNet(nn.Module):
    """features.0.0, features.1.0, features.1.1 (Units in Sequentials in a Sequential) -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Sequential(Unit(3, 16, 1)), nn.Sequential(Unit(16, 32, 2), Unit(32, 32, 1)))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def cifar(data: Path):
    """(stats images, test images, test labels): images normalised float32 NCHW; the first STATS_IMAGES
    training images (shuffled, seed 0) and TEST_IMAGES test images."""
    d = load_cifar("cifar10", data, None, TEST_IMAGES)
    mean, std = np.array(CIFAR_MEAN["cifar10"], np.float32), np.array(CIFAR_STD["cifar10"], np.float32)
    train = d["train"][0][np.random.default_rng(0).permutation(len(d["train"][0]))[:STATS_IMAGES]]
    prep = [((x.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2).copy() for x in (train, d["test"][0])]
    return prep[0], prep[1], d["test"][1]


def set_statistics(net: nn.Module, x: np.ndarray) -> nn.Module:
    """Training-mode passes with dropout on, BN running statistics the plain average over them."""
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        for _ in range(3):
            for i in range(0, len(x), 128):
                net(torch.from_numpy(x[i:i + 128]))
    return net.eval()


def bn_input_moments(net: nn.Module, bn: nn.Module, x: np.ndarray, dropout: bool) -> tuple:
    seen = []
    handle = bn.register_forward_pre_hook(lambda m, args: seen.append(args[0].double()))
    for m in net.modules():
        if isinstance(m, NOISE):
            m.train(dropout)
    torch.manual_seed(1)
    with torch.no_grad():
        net(torch.from_numpy(x))
    handle.remove()
    net.eval()
    z = seen[0]
    return z.mean((0, 2, 3)).numpy(), z.var((0, 2, 3), unbiased=False).numpy()


def pytorch_reference(net: nn.Module, x: np.ndarray, folded: set[str]) -> nn.Module:
    """PyTorch's own correction of a copy of ``net``: every BN after the first dropout, in order, gets the
    dropout-off moments of its input (re-estimation), or where the pipeline folded it (``folded``: module
    names) the relative rule: stored statistics moved by the dropout-on -> dropout-off change."""
    original, ref = net, copy.deepcopy(net)
    order = []
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: order.append(n)) for n, m in ref.named_modules()
             if isinstance(m, (nn.BatchNorm2d, *NOISE))]
    with torch.no_grad():
        ref(torch.from_numpy(x[:2]))
    for h in hooks:
        h.remove()
    modules = dict(ref.named_modules())
    first_drop = next(k for k, n in enumerate(order) if isinstance(modules[n], NOISE))
    for name in [n for n in order[first_drop:] if isinstance(modules[n], nn.BatchNorm2d)]:
        bn = modules[name]
        m_off, v_off = bn_input_moments(ref, bn, x, dropout=False)
        if name in folded:
            m_on, v_on = bn_input_moments(original, dict(original.named_modules())[name], x, dropout=True)
            mu_s, v_s = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
            scale = np.sqrt(v_on / v_off)
            m_off, v_off = m_off - (m_on - mu_s) / scale, (v_s + bn.eps) / scale ** 2 - bn.eps
        bn.running_mean.copy_(torch.from_numpy(m_off))
        bn.running_var.copy_(torch.from_numpy(v_off))
    return ref


def logits_of(path: Path, x: np.ndarray) -> np.ndarray:
    return make_session(onnx.load(str(path)), device="cpu").run(None, {onnx.load(str(path)).graph.input[0].name: x})[0]


def distance(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).mean() / ref.std())


def export_default(net, x, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.from_numpy(x[:2]),), str(path), input_names=["input"],
                          dynamic_shapes=({0: torch.export.Dim("n")},), verbose=False)


def export_torchscript(net, x, path: Path, fold: bool = False) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.from_numpy(x[:2]),), str(path), dynamo=False, input_names=["input"],
                          dynamic_axes={"input": {0: "n"}}, do_constant_folding=fold)


def kept_batchnorm_modules(path: Path) -> set[str]:
    from vsonnx.graph import module_of

    return {module_of(n) for n in onnx.load(str(path)).graph.node if n.op_type == "BatchNormalization"}


def torch_pipelines(folder: Path, x_stats: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> list[dict]:
    """Every PyTorch pipeline of pipeline_models, fixed and compared with PyTorch's own correction."""
    calib = folder / "calib.npy"
    np.save(calib, x_stats)
    results = []
    for pipeline, network, net, path, named, command, labelled in pipeline_models(folder, x_stats):
        folded = {n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)} - kept_batchnorm_modules(path)
        report = vsonnx.fix(path, calib, output=folder / "fixed.onnx", dropout_sites=named or None,
                            method="population")
        with torch.no_grad():
            ref = pytorch_reference(net, x_stats, folded)(torch.from_numpy(x_test)).numpy()
        results.append(row(pipeline, network, command, report, folded, logits_of(folder / "fixed.onnx", x_test),
                           logits_of(path, x_test), ref, "PyTorch", y_test if labelled else None))
    return results


def pipeline_models(folder: Path, x_stats: np.ndarray) -> list[tuple]:
    """(pipeline, network, PyTorch net, ONNX path the pipeline wrote, names for --dropout, command, trained)."""
    import onnxsim
    import onnxslim

    rows = []
    torch.manual_seed(0)  # every network's initial weights, seeded: the table reproduces
    preresnet = set_statistics(build("preresnet", 8, 10, DropoutConfig("a", 0.5)), x_stats)
    kept = folder / "preresnet8.onnx"
    vsonnx.export(preresnet, torch.from_numpy(x_stats[:2]), kept, exporter="torchscript")
    slim = folder / "slim.onnx"
    onnx.save(onnxslim.slim(str(kept)), str(slim))
    rows.append(("onnxslim of a vsonnx export (Conv+BN fused, Dropout removed)", "PreResNet-8, Dropout-(a) 0.5",
                 preresnet, slim, {}, "`vsonnx fix slim.onnx --calib DATA` (sites restored from metadata)"))
    kept_bn = folder / "slim_keep_bn.onnx"
    onnx.save(onnxslim.slim(str(kept), skip_fusion_patterns=["FusionConvBN", "FusionConvTransposeBN"]), str(kept_bn))
    rows.append(("onnxslim --skip-fusion-patterns FusionConvBN FusionConvTransposeBN", "PreResNet-8, Dropout-(a) 0.5",
                 preresnet, kept_bn, {}, "`vsonnx fix slim.onnx --calib DATA` (sites restored from metadata)"))
    simplified, ok = onnxsim.simplify(onnx.load(str(kept)))
    sim = folder / "sim.onnx"
    onnx.save(simplified, str(sim))
    rows.append(("onnxsim of a vsonnx export", "PreResNet-8, Dropout-(a) 0.5", preresnet, sim, {},
                 "`vsonnx fix sim.onnx --calib DATA --method population`"))
    torch.manual_seed(0)
    nested = set_statistics(NestedNet(), x_stats)
    stock = folder / "nested_default.onnx"
    export_default(nested, x_stats, stock)
    rows.append(("torch.onnx.export (default exporter: Dropout removed, BN folded)", "torchvision-style nested "
                 "Sequentials, Dropout 0.3 before each BN", nested, stock, {"features.*.block.bn": 0.3},
                 "`vsonnx fix m.onnx --calib DATA --dropout 'features.*.block.bn=0.3'`"))
    scripted = folder / "nested_torchscript.onnx"
    export_torchscript(nested, x_stats, scripted)
    rows.append(("torch.onnx.export(dynamo=False, do_constant_folding=False) (Dropout removed, BN kept)",
                 "torchvision-style nested Sequentials, Dropout 0.3 before each BN", nested, scripted,
                 {"features.*.block.bn": 0.3}, "`vsonnx fix m.onnx --calib DATA --dropout 'features.*.block.bn=0.3'`"))
    from reproduce import reference_net  # the trained reference model with its own weights in PyTorch

    trained, _ = reference_net(json.loads((ROOT / "models" / "preresnet20-a05.json").read_text()))
    trained_slim = folder / "reference_slim.onnx"
    onnx.save(onnxslim.slim(str(ROOT / "models" / "preresnet20-a05.onnx")), str(trained_slim))
    rows.append(("onnxslim of models/preresnet20-a05.onnx (trained; metadata older than 'feeds')",
                 "PreResNet-20, Dropout-(a) 0.5, 30 epochs", trained, trained_slim, {"blocks.*.bn2": 0.5},
                 "`vsonnx fix slim.onnx --calib DATA --dropout 'blocks.*.bn2=0.5'`"))
    torch.manual_seed(0)
    depth = set_statistics(build("preresnet", 8, 10, DropoutConfig("depth", 0.2)), x_stats)
    for exporter, export in (("default exporter", export_default),
                             ("dynamo=False", lambda n, x, p: export_torchscript(n, x, p, fold=True))):
        path = folder / f"depth_{len(rows)}.onnx"
        export(depth, x_stats, path)
        rows.append((f"torch.onnx.export ({exporter}: drop paths erased, BN after a conv folded)",
                     "PreResNet-8 with stochastic depth 0.2 (a timm-style `drop_path` module per block)", depth, path,
                     {"blocks.*.drop_path": 0.2}, "`vsonnx fix m.onnx --calib DATA --dropout 'blocks.*.drop_path=0.2'`"))
    rows += timm_models(folder, x_stats)
    return [(*r, r[2] is trained) for r in rows]


def import_timm():
    """timm, or None where it is not installed. PyPI's torchvision (which timm imports) is a CUDA build: beside
    the CPU torch its compiled operators do not load, and its import then stops at registering fake kernels of
    two of them (``torchvision::nms``, ``qnms``); declaring those two schemas first lets the pure-Python rest
    (models, transforms) import. Nothing of torchvision's compiled code is used here."""
    try:
        import timm
    except ImportError:
        return None
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [k for k in sys.modules if k.startswith(("timm", "torchvision"))]:
            del sys.modules[name]
        global _TORCHVISION_SCHEMAS
        _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _TORCHVISION_SCHEMAS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import timm
    return timm


def timm_models(folder: Path, x_stats: np.ndarray) -> list[tuple]:
    """A small timm ResNetV2 (pre-activation, BN) with drop_path_rate 0.2 through both torch exporters, named
    as its user would: each ``drop_path`` module with its own rate (timm spaces them linearly over blocks)."""
    timm = import_timm()
    if timm is None:
        return []
    from timm.layers import BatchNormAct2d, DropPath
    from timm.models.resnetv2 import ResNetV2

    global NOISE
    NOISE = (*NOISE, DropPath)
    torch.manual_seed(0)
    net = set_statistics(ResNetV2(layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), num_classes=10, stem_chs=16,
                                  stem_type="", drop_path_rate=0.2, norm_layer=BatchNormAct2d), x_stats)
    named = {n: round(m.drop_prob, 4) for n, m in net.named_modules() if isinstance(m, DropPath)}
    command = "`vsonnx fix m.onnx --calib DATA " + " ".join(f"--dropout {n}={r:g}" for n, r in named.items()) + "`"
    rows = []
    for exporter, export in (("default exporter", export_default),
                             ("dynamo=False", lambda n, x, p: export_torchscript(n, x, p, fold=True))):
        path = folder / f"timm_{len(rows)}.onnx"
        export(net, x_stats, path)
        rows.append((f"timm {timm.__version__} through torch.onnx.export ({exporter}: drop paths erased)",
                     "timm ResNetV2 (pre-activation, BatchNormAct2d, 4 blocks), drop_path_rate 0.2", net, path, named,
                     command))
    return rows


def row(pipeline, network, command, report, folded, fixed, before, ref, framework, labels=None) -> dict:
    """One table row; ``labels`` (a trained network's test labels) add top-1 of the fixed model, of the
    framework's reference and of the model before the fix."""
    restored = next((w for w in report.warnings if "vsonnx.dropouts metadata" in w and "; restored" in w), None)
    top1 = None if labels is None else {k: round(100 * float(np.mean(v.argmax(1) == labels)), 2)
                                         for k, v in (("fixed", fixed), ("reference", ref), ("unfixed", before))}
    return {"top1": top1, "pipeline": pipeline, "network": network, "command": command, "written": report.written,
            "sites": "restored from metadata" if restored else "named" if "--dropout" in command else "found",
            "folded_layers": len(report.folded), "folded_said": any("folded into the weights" in w for w in report.warnings),
            "reference": f"{framework}: " + ("relative rule for the folded BNs, re-estimation for the kept ones"
                                             if folded else "re-estimation (dropout off)"),
            "distance": round(distance(fixed, ref), 4), "unfixed": round(distance(before, ref), 4)}


def keras_pipeline(folder: Path, x_stats: np.ndarray, x_test: np.ndarray, tf_python: str) -> dict:
    np.savez(folder / "keras_in.npz", x_calib=x_stats.transpose(0, 2, 3, 1), x_test=x_test.transpose(0, 2, 3, 1))
    subprocess.run([tf_python, str(ROOT / "tools" / "pipelines_keras.py"), str(folder / "keras_in.npz"), str(folder)],
                   check=True)
    ref = np.load(folder / "keras_reference.npz")
    np.save(folder / "keras_calib.npy", x_stats.transpose(0, 2, 3, 1))
    report = vsonnx.fix(folder / "keras.onnx", folder / "keras_calib.npy", output=folder / "keras_fixed.onnx",
                        dropout_sites={"bn1": 0.5, "bn2": 0.5}, method="population")
    x = x_test.transpose(0, 2, 3, 1).copy()
    tf_version, tf2onnx_version = (str(v) for v in ref["versions"])
    return row(f"Keras (TF {tf_version}) through tf2onnx {tf2onnx_version} (every BN folded, Dropout removed)",
               "Keras CNN conv -> Dropout 0.5 -> BatchNormalization, twice", "`vsonnx fix keras.onnx --calib DATA "
               "--dropout bn1=0.5 --dropout bn2=0.5` (Keras layer names; NHWC from the input shape)", report, {"bn1", "bn2"},
               logits_of(folder / "keras_fixed.onnx", x), ref["original"], ref["reference"], "Keras")


def markdown(results: list[dict]) -> str:
    lines = ["# Third-party pipelines", "", "Generated by `python tools/pipelines.py` (see its docstring for the "
             "method); do not edit by hand. Distance: mean |logit difference| / std of the reference logits on "
             f"{TEST_IMAGES} CIFAR-10 test images (target: within 0.01).", "",
             "| pipeline | network | fixed with | sites | folded layers corrected (said) | reference | distance | unfixed "
             "| top-1 fixed / reference / unfixed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        top1 = "/".join(f"{r['top1'][k]:.2f}" for k in ("fixed", "reference", "unfixed")) if r["top1"] else "-"
        lines.append(f"| {r['pipeline']} | {r['network']} | {r['command']} | {r['sites']} | {r['folded_layers']} "
                     f"({'yes' if r['folded_said'] else 'no'}) | {r['reference']} | {r['distance']:.4f} | {r['unfixed']:.4f} "
                     f"| {top1} |")
    if not any(r["pipeline"].startswith("timm") for r in results):
        lines += ["", "Not run: timm (not installed here; `pip install -e \".[pipelines]\"`)."]
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--tf-python", default=None, help="a Python with tensorflow and tf2onnx (Keras pipeline)")
    p.add_argument("--out", type=Path, default=ROOT / "models" / "PIPELINES.md")
    args = p.parse_args(argv)
    x_stats, x_test, y_test = cifar(args.data)
    with tempfile.TemporaryDirectory(prefix="vsonnx-pipelines-") as tmp:
        results = torch_pipelines(Path(tmp), x_stats, x_test, y_test)
        if args.tf_python:
            results.append(keras_pipeline(Path(tmp), x_stats, x_test, args.tf_python))
    args.out.write_text(markdown(results))
    (args.out.with_suffix(".json")).write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
