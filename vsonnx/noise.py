"""Training-time dropout noise reaching a BN input, per channel: shared by `scan --calib` (with measured
E[x^2]) and `fix --data-free` (with E[x^2] derived from the constants).

For a BN whose dropout paths are all additive (see sites._Path.additive), with retain probability p
(element-wise, channel-wise or per-sample masks alike on a direct path: each unit is kept with probability
p and scaled by 1/p, whatever else shares its mask):
  direct path:       noise_o = (1/p - 1) * E[x_o^2]       (Eq. 8 of vsonnx.theory, with c^2 + v = E[x^2])
  through weights W: noise_o = (1/p - 1) * sum_(i, taps) W[o, i, tap]^2 * frac(tap) * E[x_i^2]
where frac(tap) is the fraction of output positions at which the tap reads inside the input (zero padding;
1 for Gemm/MatMul). Exact for element-wise masks whatever the correlation of x, given E[x_i^2] constant over
positions. Refuses (None): channel-wise dropout behind a weight layer (masks shared across taps), unknown
ratios, ConvTranspose or non-constant weights, channel counts that do not line up; per-sample masks
(stochastic depth) behind a weight layer, for the same reason.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from . import theory
from .graph import GraphIndex, attribute
from .sites import BatchNormInfo, DropoutInfo


def squared_weight_rows(index: GraphIndex, node: onnx.NodeProto, shapes: dict) -> np.ndarray | None:
    """[outputs, inputs per group]: sum over kernel taps of W^2 times the tap's in-bounds fraction."""
    w = index.constant(node.input[1])
    if w is None or np.ndim(w) < (3 if node.op_type == "Conv" else 2):  # not a weight of this op's rank
        return None
    w = np.asarray(w, np.float64)
    if node.op_type == "Conv":
        kernel = w.shape[2:]
        frac = np.ones(kernel)
        x_shape, y_shape = shapes.get(node.input[0]), shapes.get(node.output[0])
        if (x_shape and y_shape and len(x_shape) == len(y_shape) == len(kernel) + 2  # else a declared shape lies
                and all(isinstance(d, int) for d in (*x_shape[2:], *y_shape[2:]))):
            nd = len(kernel)
            pads = attribute(node, "pads", [0] * 2 * nd)
            if attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                pads = None  # SAME_* padding: positions not derived here; assume no border effect
            if pads is not None:
                frac = theory.tap_fractions(kernel, x_shape[2:], y_shape[2:], attribute(node, "strides", [1] * nd),
                                            pads[:nd], attribute(node, "dilations", [1] * nd))
        return (w * w * frac).reshape(w.shape[0], w.shape[1], -1).sum(axis=2)
    if node.op_type == "Gemm":
        rows = w if attribute(node, "transB", 0) else w.T
        return rows * rows
    if node.op_type == "MatMul" and w.ndim == 2:
        return (w * w).T
    return None


def noise_variance(index: GraphIndex, bn: BatchNormInfo, dropouts: dict[str, DropoutInfo], shapes: dict,
                   second_moment: Callable[[DropoutInfo], np.ndarray | None]) -> tuple[np.ndarray | None, str]:
    """(per-channel noise variance or None, reason when None). ``second_moment(d)`` gives E[x^2] per channel
    of dropout d's input, or None when it cannot."""
    if bn.noise_paths is None:
        return None, "a Concat, activation, pooling or second weight layer lies on the dropout path"
    total = np.zeros(bn.channels, np.float64)
    nodes = index.by_name
    for drop_name, weight_name in bn.noise_paths:
        drop = dropouts[drop_name]
        if drop.ratio is None or not 0 <= drop.ratio < 1:
            return None, f"the ratio of '{drop_name}' is not a constant in [0, 1)"
        ex2 = second_moment(drop)
        if ex2 is None:
            return None, f"E[x^2] at the input of '{drop_name}' is not known"
        scale = 1.0 / (1.0 - drop.ratio) - 1.0
        if weight_name is None:
            if ex2.size != bn.channels:
                return None, f"'{drop_name}' and the BN have different channel counts"
            total += scale * ex2
            continue
        if drop.channelwise or drop.per_sample:
            return None, f"'{drop_name}' drops whole {'samples' if drop.per_sample else 'channels'} and a weight layer follows it"
        w2 = squared_weight_rows(index, nodes[weight_name], shapes)
        if w2 is None or w2.shape[0] != bn.channels or ex2.size % w2.shape[1]:
            return None, f"weight layer '{weight_name}' is not a Conv/Gemm/MatMul with a constant weight"
        groups, per_in = ex2.size // w2.shape[1], w2.shape[1]
        per_out = bn.channels // groups
        for g in range(groups):
            rows = slice(g * per_out, (g + 1) * per_out)
            total[rows] += scale * w2[rows] @ ex2[g * per_in:(g + 1) * per_in]
    return total, ""
