"""The paper's formulas against seeded Monte-Carlo simulations in numpy.

Tolerances: with n samples the relative standard error of a variance estimate is about sqrt(2/n)
(~0.3% for n = 200,000, a few times more for heavy-tailed products), so 2-3% bounds are > 5 sigma."""
import numpy as np
import pytest

from vsonnx import theory

RNG = np.random.default_rng(0)
N = 200_000


def dropout(x, p, rng=RNG):
    return x * (rng.random(x.shape) < p) / p


@pytest.mark.parametrize("p,c,v", [(0.5, 0.0, 1.0), (0.7, 1.5, 0.5), (0.9, -2.0, 2.0)])
def test_eq8_direct(p, c, v):
    x = c + np.sqrt(v) * RNG.standard_normal(N)
    assert dropout(x, p).var() == pytest.approx(theory.train_var_direct(c, v, p), rel=0.02)
    assert dropout(x, p).mean() == pytest.approx(c, abs=0.02 * (abs(c) + np.sqrt(v)))
    assert theory.var_ratio_direct(0.0, v, p) == pytest.approx(p)
    assert theory.test_var_from_train_direct(c, theory.train_var_direct(c, v, p), p) == pytest.approx(v)


@pytest.mark.parametrize("rho", [0.0, 0.3])
def test_eq12_14_weight_layer_with_correlation(rho):
    d, p, c, v = 9, 0.6, 0.5, 1.0
    w = RNG.standard_normal(d) + 0.3
    shared = RNG.standard_normal((N, 1))
    x = c + np.sqrt(v) * (np.sqrt(rho) * shared + np.sqrt(1 - rho) * RNG.standard_normal((N, d)))
    test, train = x @ w, dropout(x, p) @ w
    cos2 = w.sum() ** 2 / (d * (w * w).sum())
    assert test.var() / train.var() == pytest.approx(theory.var_ratio_weight(c, v, p, d, cos2, rho), rel=0.03)


def test_exact_elementwise_noise_term():
    d, p = 5, 0.5
    w = RNG.standard_normal((3, d))
    x = RNG.standard_normal((N, d)) * [1, 2, 0.5, 1, 3] + [0, 1, -1, 2, 0]  # any correlation-free mix
    x[:, 1] += 0.8 * x[:, 0]  # and correlated inputs
    ex2 = (x * x).mean(0)
    diff = (dropout(x, p) @ w.T).var(0) - (x @ w.T).var(0)
    np.testing.assert_allclose(diff, theory.weight_noise_var(w * w, ex2, p), rtol=0.04)


def test_uout_ratio():
    beta = 0.5
    x = RNG.standard_normal(N)
    train = x + x * RNG.uniform(-beta, beta, N)
    assert x.var() / train.var() == pytest.approx(theory.uout_var_ratio(beta), rel=0.02)


@pytest.mark.parametrize("mu,sigma", [(0.0, 1.0), (1.0, 0.5), (-1.0, 2.0)])
def test_relu_gaussian_moments(mu, sigma):
    y = np.maximum(mu + sigma * RNG.standard_normal(N), 0)
    m1, m2 = theory.relu_gaussian_moments(mu, sigma)
    assert y.mean() == pytest.approx(float(m1), rel=0.02, abs=1e-3)
    assert (y * y).mean() == pytest.approx(float(m2), rel=0.02, abs=1e-3)


def test_weight_cos2_matches_definition():
    w = RNG.standard_normal((4, 2, 3, 3))
    d, cos2 = theory.weight_cos2(w, "Conv")
    rows = w.reshape(4, -1)
    assert d == 18 and cos2 == pytest.approx(np.mean(rows.sum(1) ** 2 / (18 * (rows ** 2).sum(1))))
    assert theory.weight_cos2(np.ones((6, 4)), "Gemm", trans_b=True) == (4, pytest.approx(1.0))


def test_stochastic_depth_train_variance_monte_carlo():
    """Per-sample drops of a residual branch (torchvision StochasticDepth "row" mode), correlated s and y:
    the BN after the Add sees (1/p - 1) E[y^2] more variance than at test time, per unit."""
    import torch

    from vsonnx.nets import StochasticDepth

    torch.manual_seed(0)
    n, p = 200_000, 0.7  # retain probability (drop 0.3)
    s = torch.randn(n, 3, 2, 2) * torch.tensor([1.0, 0.5, 2.0]).view(1, 3, 1, 1) + 0.3
    y = 0.6 * s + torch.randn(n, 3, 2, 2) + torch.tensor([0.5, -1.0, 0.0]).view(1, 3, 1, 1)
    depth = StochasticDepth(1 - p).train()
    z = s + depth(y)
    per_channel = lambda t: t.transpose(0, 1).reshape(3, -1).double()  # noqa: E731
    measured = per_channel(z).var(1).numpy()
    predicted = theory.residual_train_var(per_channel(s + y).var(1).numpy(), (per_channel(y) ** 2).mean(1).numpy(), p)
    np.testing.assert_allclose(measured, predicted, rtol=0.02)
    kept = depth(torch.ones(1000, 3, 2, 2))
    assert (kept.amax((1, 2, 3)) == kept.amin((1, 2, 3))).all()  # whole samples kept or dropped
