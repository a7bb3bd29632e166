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


def residual_train_var(skip_branch_var, branch_second_moment, p):
    """Stochastic depth before a BN: z = s + m * y / p with m ~ Bernoulli(p) drawn per *sample* (the branch y
    dropped whole, kept ones scaled by 1/p; s the identity path). Per unit m^2 = m, so
        Var_train(z) = Var(s + y) + (1/p - 1) * E[y^2],
    the same as an element-wise dropout on y (the masks' correlation across units does not enter a
    per-unit moment): a BN after the Add sees Var_test = Var_train - (1/p - 1) E[y^2]."""
    return np.asarray(skip_branch_var, np.float64) + (1.0 / p - 1.0) * np.asarray(branch_second_moment, np.float64)


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


def clipped_gaussian_second_moment(mu, sigma, low: float = -math.inf, high: float = math.inf):
    """E[clip(z, low, high)^2] for z ~ N(mu, sigma^2), elementwise: identity (-inf, inf), ReLU (0, inf),
    ReLU6 (0, 6). Inside the window it is the truncated second moment
    (mu^2 + s^2)(Phi(b) - Phi(a)) + 2 mu s (phi(a) - phi(b)) + s^2 (a phi(a) - b phi(b)), a, b the standardised
    limits; outside, the clipped value squared times its probability."""
    mu = np.asarray(mu, np.float64)
    s = np.maximum(np.abs(np.asarray(sigma, np.float64)), 1e-12)
    a, b = (low - mu) / s, (high - mu) / s

    def pdf(t):
        return np.where(np.isfinite(t), np.exp(-0.5 * np.where(np.isfinite(t), t, 0) ** 2) / math.sqrt(2 * math.pi), 0.0)

    def cdf(t):
        return 0.5 * (1 + _erf(np.clip(t, -40, 40) / math.sqrt(2)))

    ta = np.where(np.isfinite(a), a, 0.0) * pdf(a)
    tb = np.where(np.isfinite(b), b, 0.0) * pdf(b)
    inside = (mu * mu + s * s) * (cdf(b) - cdf(a)) + 2 * mu * s * (pdf(a) - pdf(b)) + s * s * (ta - tb)
    below = (low * low if np.isfinite(low) else 0.0) * cdf(a)
    above = (high * high if np.isfinite(high) else 0.0) * (1 - cdf(b))
    return inside + below + above


def tap_fractions(kernel: tuple[int, ...], in_spatial: tuple[int, ...], out_spatial: tuple[int, ...],
                  strides: tuple[int, ...], pads_begin: tuple[int, ...], dilations: tuple[int, ...]) -> np.ndarray:
    """For each kernel tap, the fraction of output positions where it reads inside the input (zero padding
    makes border outputs sum fewer noisy terms). Shape = kernel."""
    per_axis = []
    for k, n_in, n_out, st, pad, dil in zip(kernel, in_spatial, out_spatial, strides, pads_begin, dilations):
        pos = np.arange(n_out)[:, None] * st - pad + np.arange(k)[None, :] * dil
        per_axis.append(((pos >= 0) & (pos < n_in)).mean(axis=0))
    out = per_axis[0]
    for f in per_axis[1:]:
        out = np.multiply.outer(out, f)
    return np.asarray(out)
