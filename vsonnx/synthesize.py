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

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import VsonnxError

REFUSAL_HINT = "use --synthetic 0 (closed-form correction of the sites only) or --calib DATA."

if TYPE_CHECKING:  # numpy, onnx and torch load inside the functions: the CLI imports the defaults below
    import numpy as np
    import onnx

    from .calibrate import BnStatistics

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
    try:
        import torch
    except ImportError:
        raise VsonnxError("the data-free synthesis needs torch, which is not installed.",
                          "pip install 'vsonnx[train]' (or torch), or use --synthetic 0 for the closed-form "
                          "correction of the sites only.") from None
    return torch


def _input_shape(model: onnx.ModelProto, samples: int) -> tuple[str, tuple[int, ...]]:
    import onnx

    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise VsonnxError(f"the data-free synthesis needs a model with one input, this one has {len(inputs)}.",
                          REFUSAL_HINT)
    tensor_type = inputs[0].type.tensor_type
    if tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        raise VsonnxError(f"input '{inputs[0].name}' is not a float tensor: inputs cannot be synthesised.",
                          REFUSAL_HINT)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    if len(dims) < 2 or any(d is None for d in dims[1:]):
        raise VsonnxError(f"input '{inputs[0].name}' has dimensions {dims[1:]} besides the batch that are not "
                          "static: the synthetic inputs' shape is unknown.", REFUSAL_HINT)
    return inputs[0].name, (samples, *dims[1:])


def pick_device(device: str) -> str:
    torch = _torch()
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise VsonnxError("--device cuda: torch sees no CUDA device.", "use --device cpu or auto.")
    return "cpu"


def synthetic_statistics(model: onnx.ModelProto, names: list[str], *, samples: int = DEFAULT_SAMPLES,
                         steps: int = DEFAULT_STEPS, lr: float = 0.1, draws: int = 4, seed: int = 0,
                         device: str = "auto", channelwise: frozenset[str] = frozenset(),
                         progress: bool = False) -> SynthesisResult:
    """New statistics for the BNs ``names`` (see the module docstring); ``channelwise``: Dropout nodes that
    drop whole channels."""
    torch = _torch()
    import numpy as np

    from .calibrate import BnStatistics, stored_statistics
    from .graph import GraphIndex
    from .stats import transfer_change
    from .torch_graph import TorchGraph

    if samples < 2 or steps < 0:
        raise VsonnxError("the synthesis needs at least 2 samples and 0 or more steps.",
                          "e.g. --synthetic 64 --synthetic-steps 100.")
    start = time.perf_counter()
    device = pick_device(device)
    input_name, shape = _input_shape(model, samples)
    graph = TorchGraph(model, device)
    index = GraphIndex(model)
    stored = stored_statistics(model, [index.node_name(n) for n in model.graph.node if n.op_type == "BatchNormalization"
                                       and all(index.is_constant(i) for i in n.input[3:5])])
    targets = {}  # BN name -> (mean, std, sum of variances) that the synthesis matches, as tensors
    for name, st in stored.items():
        mean_t, var_t = (torch.tensor(v, dtype=torch.float32, device=device) for v in (st.mean, np.maximum(st.var, 0)))
        targets[name] = (mean_t, var_t.sqrt(), var_t.sum().clamp_min(1e-12))
    missing = [n for n in names if n not in stored]
    if missing:
        raise VsonnxError(f"BN '{missing[0]}' has no constant running statistics.", "leave it out of scope.")

    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        torch.manual_seed(seed)
        x = torch.randn(shape, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([x], lr=lr)
        losses: list[float] = []
        for step in range(steps):
            terms = []

            def match(name, mean, var):
                if name in targets:
                    mu, sigma, scale = targets[name]
                    terms.append((((mean - mu) ** 2).sum() + ((var.clamp_min(0) + 1e-12).sqrt() - sigma).pow(2).sum())
                                 / scale)

            optimizer.zero_grad()
            graph({input_name: x}, batch_norm="batch", dropout=True, channelwise=channelwise, observe=match)
            loss = torch.stack(terms).sum()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress and (step % 20 == 0 or step == steps - 1):
                print(f"  synthesis step {step + 1}/{steps}: loss {losses[-1]:.4g}", file=sys.stderr, flush=True)
        with torch.no_grad():
            on = _batch_statistics(graph, input_name, x.detach(), names, draws, channelwise)
            off = _batch_statistics(graph, input_name, x.detach(), names, 0, channelwise)
    statistics = {}
    for name in names:
        statistics[name] = BnStatistics(name, *transfer_change(stored[name].mean, stored[name].var, on[name],
                                                              off[name]), samples)
    return SynthesisResult(statistics, samples, steps, losses[0] if losses else float("nan"),
                           losses[-1] if losses else float("nan"), time.perf_counter() - start, device)


def _batch_statistics(graph, input_name: str, x, names: list[str], draws: int,
                      channelwise: frozenset[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per BN, the batch mean and variance in float64, averaged over ``draws`` dropout masks (0: dropout off)."""
    import numpy as np

    sums: dict[str, list[np.ndarray]] = {}

    def record(name, mean, var):
        if name in names:
            got = (mean.double().cpu().numpy(), var.double().cpu().numpy())
            sums[name] = got if name not in sums else [sums[name][0] + got[0], sums[name][1] + got[1]]

    for _ in range(max(draws, 1)):
        graph({input_name: x}, batch_norm="batch", dropout=draws > 0, channelwise=channelwise, observe=record)
    runs = max(draws, 1)
    return {name: (m / runs, v / runs) for name, (m, v) in sums.items()}
