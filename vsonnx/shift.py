"""Measuring and explaining the variance shift: `vsonnx scan --calib` (DESIGN 2, the paper's Fig. 1).

One pass over calibration data with the model as deployed (dropout off, every BN with its stored
statistics) measures, per BN and channel, the real mean and variance of its input and, for every Dropout
that reaches a site, E[x^2] of the dropout's input. Per BN (means over channels):

- real_var_ratio = real_var / moving_var;
- shift_metric = max(real_var / moving_var, moving_var / real_var), the paper's Fig. 1 quantity;
- mean_shift = |real_mean - moving_mean| / sqrt(moving_var).

Prediction for a site whose dropout paths are all *additive* (at most one weight layer and sums on the way):
the dropout noise is zero-mean given x, so at training time the BN input had variance
Var_train = Var_test + sum over paths of noise, with, per output channel o and retain probability p,
  direct path:       noise_o = (1/p - 1) * E[x_o^2]                      (this is Eq. 8: c^2 + v = E[x^2])
  through weights W: noise_o = (1/p - 1) * sum_(i, taps) W[o, i, tap]^2 * E[x_i^2]
(exact for element-wise masks, whatever the correlation of x; zero padding at borders makes it a slight
over-estimate). The predicted Var_test/Var_train is real_var / (real_var + noise), compared with the
measured real_var / moving_var. Not predicted (null): channel-wise dropout behind a weight layer (masks
shared across taps), Concat or other ops on the way, unknown ratios, ConvTranspose.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .calibrate import bn_tap, measure_moments, tensor_shapes, tensor_tap, working_copy
from .data import open_source
from .graph import GraphIndex, attribute
from .model import load_model
from .sites import BatchNormInfo, ScanReport, find_sites


def _noise(index: GraphIndex, bn: BatchNormInfo, dropouts: dict, second_moment: dict) -> np.ndarray | None:
    """Per-channel training-time noise variance at the BN input, or None when not predictable."""
    if bn.noise_paths is None:
        return None
    total = np.zeros(bn.channels, np.float64)
    nodes = {index.node_name(n): n for n in index.graph.node}
    for drop_name, weight_name in bn.noise_paths:
        drop = dropouts[drop_name]
        ex2 = second_moment.get(drop_name)
        if drop.ratio is None or ex2 is None or drop.ratio >= 1:
            return None
        scale = 1.0 / (1.0 - drop.ratio) - 1.0
        if weight_name is None:
            if ex2.size != bn.channels:
                return None
            total += scale * ex2
            continue
        if drop.channelwise:
            return None
        w2 = _squared_weight_rows(index, nodes[weight_name])
        if w2 is None or w2.shape[0] != bn.channels:
            return None
        groups = w2.shape[1] and ex2.size // w2.shape[1]
        if groups * w2.shape[1] != ex2.size:
            return None
        per_group = bn.channels // groups
        for g in range(groups):
            rows = slice(g * per_group, (g + 1) * per_group)
            total[rows] += scale * w2[rows] @ ex2[g * w2.shape[1]:(g + 1) * w2.shape[1]]
    return total


def _squared_weight_rows(index: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    """[outputs, inputs per group] sums of squared weights over kernel taps."""
    w = index.constant(node.input[1])
    if w is None:
        return None
    w = np.asarray(w, np.float64)
    if node.op_type == "Conv":
        return (w * w).reshape(w.shape[0], w.shape[1], -1).sum(axis=2)
    if node.op_type == "Gemm":
        rows = w if attribute(node, "transB", 0) else w.T
        return rows * rows
    if node.op_type == "MatMul" and w.ndim == 2:
        return (w * w).T
    return None


def measure_shift(model, calib, *, limit: int | None = 5000, shuffle: bool = True, seed: int = 0,
                  preprocess: dict | None = None, batch_size: int = 128, device: str = "auto",
                  threads: int | None = None, progress: bool = False, model_name: str | None = None) -> ScanReport:
    """``find_sites`` plus measured and predicted shift per BN (fields set on each BatchNormInfo)."""
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    name = model_name or ("<memory>" if isinstance(model, onnx.ModelProto) else str(model))
    report = find_sites(proto, name)
    if not report.batchnorms:
        return report
    index = GraphIndex(proto)
    shapes = tensor_shapes(working_copy(proto))
    bn_nodes = {index.node_name(n): n for n in proto.graph.node if n.op_type == "BatchNormalization"}
    taps = {f"bn:{b.name}": bn_tap(index, bn_nodes[b.name], shapes) for b in report.batchnorms}
    dropout_nodes = {index.node_name(n): n for n in proto.graph.node if n.op_type == "Dropout"}
    reaching = {d.name for b in report.sites for d in b.dropouts}
    for d in reaching:
        tap = tensor_tap(dropout_nodes[d].input[0], shapes)
        if tap is not None:
            taps[f"drop:{d}"] = tap
    source = open_source(calib, proto, shuffle=shuffle, seed=seed, limit=limit, preprocess=preprocess)
    moments, samples, _, provider = measure_moments(proto, source, taps, batch_size=batch_size, device=device,
                                                     threads=threads, progress=progress, label="measuring shift")
    second = {k[5:]: m.var + m.mean ** 2 for k, m in moments.items() if k.startswith("drop:")}
    dropouts = {d.name: d for d in report.dropouts}
    for b in report.batchnorms:
        node = bn_nodes[b.name]
        moving_mean = np.asarray(index.constant(node.input[3]), np.float64).reshape(-1)
        moving_var = np.asarray(index.constant(node.input[4]), np.float64).reshape(-1)
        real = moments[f"bn:{b.name}"]
        ok = moving_var > 0
        ratio = real.var[ok] / moving_var[ok]
        b.real_var_ratio = _mean(ratio)
        b.shift_metric = _mean(np.maximum(ratio, 1 / np.maximum(ratio, 1e-12)))
        b.mean_shift = _mean(np.abs(real.mean[ok] - moving_mean[ok]) / np.sqrt(moving_var[ok]))
        if b.site:
            noise = _noise(index, b, dropouts, second)
            b.predicted_var_ratio = None if noise is None else _mean(real.var / np.maximum(real.var + noise, 1e-30))
            b.prediction_error = (None if b.predicted_var_ratio is None or not b.real_var_ratio else
                                  round(abs(b.predicted_var_ratio - b.real_var_ratio) / b.real_var_ratio, 6))
    report.calibration = {"source": str(calib), "samples": samples, "provider": provider}
    return report


def _mean(values: np.ndarray) -> float | None:
    return round(float(np.mean(values)), 6) if values.size else None


def median_prediction_error(report: ScanReport) -> float | None:
    errors = [b.prediction_error for b in report.sites if getattr(b, "prediction_error", None) is not None]
    return float(np.median(errors)) if errors else None


def plot_shift(reports: list[ScanReport], path: str | Path, labels: list[str] | None = None) -> Path:
    """A PNG like the paper's Fig. 1: shift metric against BN index, sites marked, one line per report."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import VsonnxError

        raise VsonnxError("--plot needs matplotlib.", "pip install 'vsonnx[plot]' (or matplotlib).") from None
    fig, ax = plt.subplots(figsize=(8, 4))
    for k, report in enumerate(reports):
        label = labels[k] if labels else Path(report.model).name
        ys = [b.shift_metric for b in report.batchnorms]
        xs = list(range(len(ys)))
        line, = ax.plot(xs, ys, marker=".", label=label)
        sx = [i for i, b in enumerate(report.batchnorms) if b.site]
        ax.scatter(sx, [ys[i] for i in sx], s=60, facecolors="none", edgecolors=line.get_color())
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("BatchNormalization layer index (circles: Dropout->BN sites)")
    ax.set_ylabel("max(real/moving, moving/real) variance")
    ax.set_title("Variance shift per BN layer (model as deployed, dropout off)")
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
