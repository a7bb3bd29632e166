"""Dropout noise at a BN input (vsonnx.noise) against a numpy Monte-Carlo simulation of the dropout."""
import numpy as np

from vsonnx.graph import GraphIndex, tensor_shapes
from vsonnx.noise import noise_variance
from vsonnx.sites import find_sites

from conftest import GraphBuilder

RATIO = 0.3


def site(model):
    report = find_sites(model)
    return GraphIndex(model), report.sites[0], {d.name: d for d in report.dropouts}, tensor_shapes(model)


def test_direct_path_is_the_second_moment_times_1_over_p_minus_1():
    g = GraphBuilder()
    model = g.build(g.bn(g.dropout("x", RATIO, "d"), 3, "bn"))
    ex2 = np.array([1.0, 2.0, 0.5])
    noise, reason = noise_variance(*site(model), lambda d: ex2)
    np.testing.assert_allclose(noise, (1 / (1 - RATIO) - 1) * ex2)
    assert reason == ""


def test_weight_path_matches_monte_carlo():
    """x [N, 4] -> Dropout -> Gemm (W [3, 4]) -> BN: the variance the masks add to the Gemm output."""
    g = GraphBuilder(seed=1)
    model = g.build(g.bn(g.gemm(g.dropout("x", RATIO, "d"), 4, 3, "fc"), 3, "bn"), input_shape=("N", 4))
    w = GraphIndex(model).constant("fc_w").astype(np.float64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200_000, 4)) * [1.0, 2.0, 0.5, 1.5] + [0.5, -1.0, 0.0, 2.0]
    masks = rng.random(x.shape) >= RATIO
    simulated = ((masks * x / (1 - RATIO) - x) @ w.T).var(axis=0)  # zero-mean noise given x
    noise, _ = noise_variance(*site(model), lambda d: (x * x).mean(axis=0))
    np.testing.assert_allclose(noise, simulated, rtol=0.02)  # 200k samples: Monte-Carlo error well under 1%


def test_refuses_paths_it_cannot_predict():
    g = GraphBuilder()
    model = g.build(g.bn(g.node("Relu", [g.dropout("x", RATIO, "d")]), 3, "bn"))
    noise, reason = noise_variance(*site(model), lambda d: np.ones(3))
    assert noise is None and "activation" in reason
    g = GraphBuilder()
    model = g.build(g.bn(g.dropout("x", RATIO, "d"), 3, "bn"))
    noise, reason = noise_variance(*site(model), lambda d: None)
    assert noise is None and "E[x^2]" in reason
