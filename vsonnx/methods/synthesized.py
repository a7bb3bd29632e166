"""Data-free correction of every BN in scope, downstream ones included: synthesise inputs from the stored
BN statistics, then carry the change that switching Dropout off makes on them over to the stored statistics
(needs torch; DESIGN 5.4 extended).

1. Synthesis (as ZeroQ, Cai et al. 2020): a batch x, initialised N(0, 1) in the model's input space,
   minimises  sum over the BNs of (|mean_b(x) - mu|^2 + |std_b(x) - sigma|^2) / sum(sigma^2)  with Adam,
   the batch statistics (mean_b, std_b) taken in the regime in which (mu, sigma^2) were recorded:
   BNs normalising with the batch, Dropout active.
2. Transfer: on that batch, each BN's batch statistics are measured with Dropout active (averaged over
   ``draws`` masks: m_on, v_on) and off (m_off, v_off), upstream BNs normalising with the batch as a
   re-estimation would; the stored statistics change by the same amount relative to the spread:
       new_var = var * v_off / v_on,        new_mean = mean + (m_off - m_on) * sqrt(var / v_on).
   Carrying over the change rather than the synthetic statistics cancels what the synthetic batch gets
   wrong in both regimes alike (re-estimating on it directly loses accuracy; see models/RESULTS.md).
Refused with a VsonnxError: operators vsonnx.torch_graph cannot run, several or non-float graph inputs,
input dimensions other than the batch that are not static.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import SYNTHESIS_HINT, VsonnxError

if TYPE_CHECKING:  # numpy, onnx and torch load inside the functions: the CLI imports the defaults below
    import numpy as np
    import onnx

    from ..stats import BnStatistics, Estimate
    from . import EstimateRequest

DEFAULT_SAMPLES = 64
DEFAULT_STEPS = 100


@dataclass
class SynthesisResult:
    statistics: dict[str, BnStatistics]
    samples: int
    steps: int
    loss_first: float
    loss_last: float
    seconds: float
    device: str


def _torch():
    from ..runtime import import_torch

    return import_torch("the data-free synthesis", "pip install 'vsonnx[train]' (or torch), or use --synthetic 0 "
                        "for the closed-form correction of the sites only.")


def _input_shape(model: onnx.ModelProto, samples: int) -> tuple[str, tuple[int, ...]]:
    import onnx

    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise VsonnxError(f"the data-free synthesis needs a model with one input, this one has {len(inputs)}.",
                          SYNTHESIS_HINT)
    tensor_type = inputs[0].type.tensor_type
    if tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        raise VsonnxError(f"input '{inputs[0].name}' is not a float tensor: inputs cannot be synthesised.",
                          SYNTHESIS_HINT)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    if len(dims) < 2 or any(d is None for d in dims[1:]):
        raise VsonnxError(f"input '{inputs[0].name}' has dimensions {dims[1:]} besides the batch that are not "
                          "static: the synthetic inputs' shape is unknown.", SYNTHESIS_HINT)
    return inputs[0].name, (samples, *dims[1:])


def estimate(request: EstimateRequest) -> Estimate:
    """Registry entry: ``request.options`` may set ``samples`` and ``steps``."""
    from ..stats import Estimate, Fitting

    channelwise = request.report.channelwise_dropouts
    result = synthetic_statistics(request.model, request.targets, samples=request.options.get("samples", DEFAULT_SAMPLES),
                                  steps=request.options.get("steps", DEFAULT_STEPS), seed=request.seed,
                                  device=request.device, channelwise=channelwise, progress=request.progress)
    fitting = Fitting(result.steps, result.loss_first, result.loss_last, synthetic_samples=result.samples)
    return Estimate("synthesized", 0, 0, result.statistics, result.steps, result.seconds, f"torch {result.device}",
                    fitting=fitting)


def synthetic_statistics(model: onnx.ModelProto, names: list[str], *, samples: int = DEFAULT_SAMPLES,
                         steps: int = DEFAULT_STEPS, lr: float = 0.1, draws: int = 4, seed: int = 0,
                         device: str = "auto", channelwise: frozenset[str] = frozenset(),
                         progress: bool = False) -> SynthesisResult:
    """New statistics for the BNs ``names`` (see the module docstring); ``channelwise``: Dropout nodes that
    drop whole channels."""
    torch = _torch()
    import numpy as np

    from ..graph import GraphIndex
    from ..runtime import torch_device
    from ..stats import BnStatistics, transfer_change
    from ..torch_graph import TorchGraph

    if samples < 2 or steps < 0:
        raise VsonnxError("the synthesis needs at least 2 samples and 0 or more steps.",
                          "e.g. --synthetic 64 --synthetic-steps 100.")
    start = time.perf_counter()
    device = torch_device(device)
    input_name, shape = _input_shape(model, samples)
    graph = TorchGraph(model, device, channels_last=True)
    index = GraphIndex(model)
    stored = index.stored_statistics([name for name, n in index.batchnorms().items()
                                      if all(index.is_constant(i) for i in n.input[3:5])])
    stored = {n: s for n, s in stored.items()  # broken BNs (rewrite rule 4) are not matched
              if np.isfinite(s.mean).all() and np.isfinite(s.var).all() and (s.var >= 0).all()}
    missing = [n for n in names if n not in stored]
    if missing:
        raise VsonnxError(f"BN '{missing[0]}' has no constant running statistics.", "leave it out of scope.")
    run = functools.partial(graph, batch_norm="batch", channelwise=channelwise)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        torch.manual_seed(seed)
        x, losses = _optimise(run, input_name, torch.randn(shape, device=device, requires_grad=True),
                              _targets(stored, device), steps, lr, progress)
        with torch.no_grad():
            on = _batch_statistics(run, input_name, x, names, draws)
            off = _batch_statistics(run, input_name, x, names, 0)
    statistics = {name: BnStatistics(name, *transfer_change(stored[name].mean, stored[name].var, on[name], off[name]),
                                     samples) for name in names}
    return SynthesisResult(statistics, samples, steps, losses[0] if losses else float("nan"),
                           losses[-1] if losses else float("nan"), time.perf_counter() - start, device)


def _targets(stored: dict[str, BnStatistics], device: str) -> dict:
    """BN name -> (mean, std, sum of variances) that the synthesis matches, as tensors."""
    import numpy as np
    import torch

    targets = {}
    for name, st in stored.items():
        mean_t, var_t = (torch.tensor(v, dtype=torch.float32, device=device) for v in (st.mean, np.maximum(st.var, 0)))
        targets[name] = (mean_t, var_t.sqrt(), var_t.sum().clamp_min(1e-12))
    return targets


def _optimise(run, input_name: str, x, targets: dict, steps: int, lr: float, progress: bool):
    """Adam on the inputs ``x`` until their batch statistics (BNs on the batch, Dropout on) match ``targets``;
    returns (x detached, losses)."""
    import torch

    from ..runtime import progress_bar

    optimizer = torch.optim.Adam([x], lr=lr)
    losses: list[float] = []
    with progress_bar("synthesising inputs", steps, progress, unit="step") as bar:
        for _ in range(steps):
            terms = []

            def match(name, mean, var):
                if name in targets:
                    mu, sigma, scale = targets[name]
                    terms.append((((mean - mu) ** 2).sum() + ((var.clamp_min(0) + 1e-12).sqrt() - sigma).pow(2).sum())
                                 / scale)

            optimizer.zero_grad()
            run({input_name: x}, dropout=True, observe=match)
            loss = torch.stack(terms).sum()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
            bar.update(1)
    return x.detach(), losses


def _batch_statistics(run, input_name: str, x, names: list[str], draws: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per BN, the batch mean and variance in float64, averaged over ``draws`` dropout masks (0: dropout off)."""
    import numpy as np

    sums: dict[str, list[np.ndarray]] = {}

    def record(name, mean, var):
        if name in names:
            got = (mean.double().cpu().numpy(), var.double().cpu().numpy())
            sums[name] = got if name not in sums else [sums[name][0] + got[0], sums[name][1] + got[1]]

    for _ in range(max(draws, 1)):
        run({input_name: x}, dropout=draws > 0, observe=record)
    runs = max(draws, 1)
    return {name: (m / runs, v / runs) for name, (m, v) in sums.items()}
