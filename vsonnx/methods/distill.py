"""``distill``: fit the BN constants so that the deterministic network matches its own dropout ensemble.

Every other method re-estimates variances; this one asks what the network should output. Per BN in scope
(the sites and every BN downstream; ``--all``: every BN), the inference BN is one scale and shift per
channel, a0 = gamma / sqrt(var + eps), c0 = beta - a0 * mean. The student computes

    BN(x) = a * x + c,    a = exp(min(d, d_max)) * a0,    c = c0 + b,

with d, b learned from 0 (the trained constants). Each step, on a batch of calibration inputs (cycling
through them, decoded once):
- teacher: the original graph with every Dropout on as in training (its ratio, inverted scaling, a fresh
  seeded mask per step, channel-wise where the export says so) and BNs on their stored statistics, run in
  onnxruntime without gradient (vsonnx.ensemble.DropoutEnsemble);
- student: the same graph in torch (vsonnx.torch_graph) with Dropout off and the learned constants;
- loss: KL(softmax(teacher) || softmax(student)) over the class axis (or the mean squared difference of
  the scores with ``loss="mse"``), Adam with cosine decay of the learning rate. Labels are never used,
  weights never change; deterministic for a seed.
The result is written back as running statistics, exact in onnxruntime:
    mean' = (beta - c) / a,    var' = (gamma / a)^2 - eps.
Two cases cannot be written that way and are kept out of the fit: a channel with gamma = 0 (its output is
beta whatever the statistics) keeps its stored statistics (b is frozen there); and the scale may grow at
most to d_max = max(0, log((var + eps) / (2 eps)) / 2), which keeps var' >= eps (var' >= var when the
stored var is below eps), so every BN fitted can be written. ``request.options``: steps, lr, scores (the
output compared), loss (defaults: the registry's settings), sites.
Exports that removed Dropout (``sites`` named with ``--dropout``, vsonnx.methods.named_sites): the teacher
gets Dropout inserted at the sites in training mode (inside a folded Conv/Gemm: between product and bias),
the student fits the BNs in scope and, for each folded layer, y -> exp(d) * y + b per output channel,
written into the layer's weight and bias.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from ..data import check_finite, replayable
from ..ensemble import DropoutEnsemble, scores_tensor
from ..errors import VsonnxError
from ..graph import GraphIndex, attribute
from ..runtime import import_torch, progress_bar, torch_device
from ..stats import BnStatistics, Estimate, Fitting
from . import REGISTRY, EstimateRequest

if TYPE_CHECKING:
    import onnx

TORCH_HINT = "pip install 'vsonnx[train]' (or torch), or use another --method."


class Student:
    """The learnable constants (d, b) of the BNs ``names`` and their write-back (see the module docstring);
    each folded Conv/Gemm of ``layers`` learns y -> exp(d) * y + b per output channel (written into its weights)."""

    def __init__(self, model: onnx.ModelProto, names: list[str], device: str, layers: list[str] = ()):
        torch = import_torch("the distillation", TORCH_HINT)
        index = GraphIndex(model)
        stored = index.stored_statistics(names)
        self.names, self.device, self.layers = names, device, list(layers)
        self.gamma, self.beta, self.eps, self.stored = {}, {}, {}, stored
        self.a0, self.c0, self.d_max, self.free, self.d, self.b = {}, {}, {}, {}, {}, {}
        for name, node in index.batchnorms(names).items():
            gamma, beta = (np.asarray(index.constant(node.input[i]), np.float64) for i in (1, 2))
            eps = float(attribute(node, "epsilon", 1e-5))
            var, mean = np.asarray(stored[name].var, np.float64), np.asarray(stored[name].mean, np.float64)
            a0 = gamma / np.sqrt(var + eps)
            self.gamma[name], self.beta[name], self.eps[name] = gamma, beta, eps

            def tensor(v):
                return torch.tensor(np.asarray(v), dtype=torch.float32, device=device)

            self.a0[name], self.c0[name] = tensor(a0), tensor(beta - a0 * mean)
            self.d_max[name] = tensor(np.maximum(0.0, 0.5 * np.log((var + eps) / (2 * eps))))
            self.free[name] = tensor(gamma != 0)
            self.d[name] = torch.zeros(len(gamma), device=device, requires_grad=True)
            self.b[name] = torch.zeros(len(gamma), device=device, requires_grad=True)
        for name in self.layers:
            node = index.node(name)
            weight = index.constant(node.input[1])
            channels = weight.shape[0] if node.op_type == "Conv" or attribute(node, "transB", 0) else weight.shape[1]
            self.d[name] = torch.zeros(channels, device=device, requires_grad=True)
            self.b[name] = torch.zeros(channels, device=device, requires_grad=True)

    def parameters(self) -> list:
        return [p for name in self.names + self.layers for p in (self.d[name], self.b[name])]

    def output_affine(self) -> dict:
        """{folded layer: (scale, shift)} for TorchGraph's ``output_affine``."""
        import torch

        return {n: (torch.exp(self.d[n]), self.b[n]) for n in self.layers}

    def layer_corrections(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The folded layers' (a, b) for vsonnx.rewrite.apply_affine (float64)."""
        return {n: tuple(t.detach().double().cpu().numpy() for t in ab) for n, ab in self.output_affine().items()}

    def affine(self) -> dict:
        """{bn: (a, c)} for vsonnx.torch_graph.TorchGraph."""
        import torch

        return {n: (torch.exp(torch.minimum(self.d[n], self.d_max[n])) * self.a0[n], self.c0[n] + self.b[n] * self.free[n])
                for n in self.names}

    def statistics(self, samples: int) -> dict[str, BnStatistics]:
        """The fitted constants as running statistics (float64); gamma = 0 channels keep the stored ones."""
        out = {}
        for name, (a, c) in self.affine().items():
            a, c = (t.detach().double().cpu().numpy() for t in (a, c))
            gamma, beta, eps, stored = self.gamma[name], self.beta[name], self.eps[name], self.stored[name]
            free = gamma != 0
            safe_a = np.where(free, a, 1.0)
            mean = np.where(free, (beta - c) / safe_a, stored.mean)
            var = np.where(free, (gamma / safe_a) ** 2 - eps, stored.var)
            out[name] = BnStatistics(name, mean, var, samples)
        return out


def estimate(request: EstimateRequest) -> Estimate:
    """``request.options['sites']`` (named dropout sites, vsonnx.methods.named_sites): the teacher gets Dropout
    inserted there, the student also corrects the folded layers (``affine``), and the result carries named_sites'
    ``analysis`` and ``refused``."""
    torch = import_torch("the distillation", TORCH_HINT)
    from ..torch_graph import TorchGraph

    options = {**REGISTRY["distill"].settings, **request.options}
    steps, lr = int(options["steps"]), float(options["lr"])
    if steps < 1 or not lr > 0:
        raise VsonnxError(f"the distillation needs --steps >= 1 and --lr > 0, got {steps} and {lr:g}.",
                          "e.g. --steps 200 --lr 0.01.")
    start = time.perf_counter()
    teacher_model, names, layers = request.model, request.targets, []
    result = Estimate("distill", 0, 0, {}, 0, 0.0, "")
    if options.get("sites"):
        from .named_sites import analyse, training_copy

        _, names, layers, result = analyse(request, "distill")
        teacher_model = training_copy(request.model, options["sites"])
        if not names and not layers:
            return result
    scores = scores_tensor(request.model, options["scores"], options["loss"])
    teacher = DropoutEnsemble(teacher_model, scores, channelwise=request.report.channelwise_dropouts,
                              seed=request.seed, device=request.device, threads=request.threads,
                              spinning=False)  # it alternates with torch on the same cores (-18% time)
    device = torch_device(request.device)
    student = Student(request.model, names, device, layers)
    graph = TorchGraph(request.model, device, channels_last=True)
    previous_threads = torch.get_num_threads()
    if request.threads:
        torch.set_num_threads(request.threads)
    try:
        losses, samples = _fit(request, graph, teacher, student, steps, lr)
    finally:
        torch.set_num_threads(previous_threads)
    window = max(1, min(10, len(losses)))
    fitting = Fitting(steps, float(np.mean(losses[:window])), float(np.mean(losses[-window:])),
                      settings={"lr": lr, "loss": scores.loss, "scores": scores.tensor})
    return replace(result, samples=samples, batches=steps, statistics=student.statistics(samples), passes=steps,
                   seconds=time.perf_counter() - start, provider=f"{teacher.provider} + torch {device}",
                   affine=student.layer_corrections() if layers else {}, fitting=fitting)


def _fit(request: EstimateRequest, graph, teacher: DropoutEnsemble, student: Student, steps: int, lr: float):
    """Adam with cosine decay for ``steps`` batches (the source cycled); returns (losses, samples seen)."""
    import torch

    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    source = replayable(request.source)
    input_names = [i.name for i in teacher.session.get_inputs()]
    losses: list[float] = []
    per_pass: list[int] = []  # samples of each pass over the source
    with progress_bar("distilling", steps, request.progress, unit="step") as bar:
        while len(losses) < steps:
            per_pass.append(0)
            for batch in source.batches(request.batch_size):
                if len(losses) == steps:
                    break
                check_finite(batch, source)
                feeds = {n: batch.feeds[n] for n in input_names}
                target = torch.from_numpy(teacher.target(feeds).astype(np.float32)).to(student.device)
                got = graph({k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}, affine=student.affine(),
                            output_affine=student.output_affine(), fetch=[teacher.scores.tensor])[teacher.scores.tensor]
                loss = _loss(target, got, teacher.scores.loss)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
                per_pass[-1] += len(batch)
                bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
                bar.update(1)
            if per_pass[-1] == 0 and len(losses) < steps:
                raise VsonnxError(f"data source '{source.describe()}' yielded no samples.", "check the source and --limit.")
    return losses, max(per_pass)  # distinct samples: a full pass, or what the steps reached


def _loss(target, scores, loss: str):
    """Mean over samples (and positions) of KL(target || softmax(scores)) over axis 1, or of the squared
    difference for mse."""
    import torch

    if loss == "mse":
        return ((scores - target) ** 2).mean()
    log_q = torch.log_softmax(scores, dim=1)
    return (target * (torch.log(target.clamp_min(1e-30)) - log_q)).sum(1).mean()
