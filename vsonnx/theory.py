"""The variance-shift formulas of Li, Chen, Hu & Yang (CVPR 2019), notation of DESIGN.md section 2.

p is the *retain* probability (ONNX and PyTorch store the drop ratio r = 1 - p). Inverted dropout
multiplies a kept value by 1/p, so the mean is unchanged and only the variance shifts.
"""
from __future__ import annotations

import math

import numpy as np


def train_var_direct(c, v, p):
    """Eq. 8 denominator: Var_train(X) = (c^2 + v) / p - c^2 for X = a*x/p, a ~ Bernoulli(p)."""
    c, v = np.asarray(c, np.float64), np.asarray(v, np.float64)
    return (c * c + v) / p - c * c


def var_ratio_direct(c, v, p):
    """Eq. 8: Delta(p) = Var_test / Var_train = v / ((c^2 + v)/p - c^2); equals p when c = 0."""
    return np.asarray(v, np.float64) / train_var_direct(c, v, p)


def test_var_from_train_direct(mean, train_var, p):
    """Eq. 8 solved for v: the test-time variance of a BN input whose running statistics (mean c,
    variance Var_train) were measured behind a dropout of retain probability p:
    v = p * (Var_train + c^2) - c^2. It can come out <= 0 when the stored statistics do not fit the
    model (then the caller must clamp or refuse)."""
    mean = np.asarray(mean, np.float64)
    return p * (np.asarray(train_var, np.float64) + mean * mean) - mean * mean


def weight_cos2(weight: np.ndarray, op: str, trans_b: bool = False, group: int = 1) -> tuple[int, float]:
    """Fan-in d and the mean over output units of cos^2(theta) = (sum_i w_i)^2 / (d * sum_i w_i^2).

    Conv weight [C_out, C_in/g, k...]: one row per output channel, d = C_in/g * prod(k).
    ConvTranspose weight [C_in, C_out/g, k...]: d = C_in/g * prod(k) (input channels per group x kernel
    taps; with stride s only about prod(k)/s^2 taps touch each output pixel).
    Gemm B [K, N] (or [N, K] with transB) and MatMul B [K, N]: d = K, one column per output.
    """
    w = np.asarray(weight, np.float64)
    if op == "Conv":
        rows = w.reshape(w.shape[0], -1)
    elif op == "ConvTranspose":
        cin, cout_g = w.shape[0], w.shape[1]
        k = w.shape[2:]
        w = w.reshape(group, cin // group, cout_g, *k)
        rows = np.moveaxis(w, 2, 1).reshape(group * cout_g, -1)
    elif op == "Gemm":
        rows = w if trans_b else w.T
    elif op == "MatMul":
        rows = w.reshape(-1, w.shape[-2], w.shape[-1]).transpose(0, 2, 1).reshape(-1, w.shape[-2])
    else:
        raise ValueError(f"not a weight op: {op}")
    d = rows.shape[1]
    sq = (rows * rows).sum(axis=1)
    keep = sq > 0
    cos2 = (rows.sum(axis=1)[keep] ** 2) / (d * sq[keep])
    return d, float(cos2.mean()) if keep.any() else 0.0


def var_ratio_weight(c, v, p, d, cos2, rho):
    """Eq. 12-14: Var_test/Var_train after a weight layer of fan-in d (common correlation rho):
    [v + v*rho*(d*cos2 - 1)] / [(c^2+v)/p - c^2 + v*rho*(d*cos2 - 1)]; tends to 1 as d*cos2 grows."""
    shared = v * rho * (d * cos2 - 1.0)
    return (v + shared) / (train_var_direct(c, v, p) + shared)


def weight_noise_var(weight_rows_sq_sum_by_input, second_moment, p):
    """Exact for element-wise masks: Var_train - Var_test = (1/p - 1) * sum_i w_i^2 E[x_i^2].

    ``weight_rows_sq_sum_by_input`` [C_out, C_in] holds sum over kernel taps of w^2 per (out, in) pair;
    ``second_moment`` [C_in] is E[x^2] of each input channel."""
    return (1.0 / p - 1.0) * np.asarray(weight_rows_sq_sum_by_input) @ np.asarray(second_moment)


def uout_var_ratio(beta: float) -> float:
    """Uout X = x + x*r, r ~ U(-beta, beta), c = 0: Var_test/Var_train = 3 / (3 + beta^2)."""
    return 3.0 / (3.0 + beta * beta)


def relu_gaussian_moments(mu, sigma):
    """E[y] and E[y^2] of y = ReLU(z), z ~ N(mu, sigma^2), elementwise (closed form)."""
    mu = np.asarray(mu, np.float64)
    sigma = np.maximum(np.asarray(sigma, np.float64), 1e-12)
    a = mu / sigma
    pdf = np.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + _erf(a / math.sqrt(2)))
    m1 = mu * cdf + sigma * pdf
    m2 = (mu * mu + sigma * sigma) * cdf + mu * sigma * pdf
    return m1, m2


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)
