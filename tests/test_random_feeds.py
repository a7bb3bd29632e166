"""Fed dropout draws: the 16-bit draws themselves and the session wrapper that feeds them (a stub session;
the graphs that read them are tested in test_simulate.py)."""
from types import SimpleNamespace

import numpy as np
import pytest

from vsonnx.random_feeds import RANDOM_PREFIX, RandomFeeding, uniform16


def test_uniform16_is_uniform_and_seeded():
    """Mean and variance of 400,001 draws within 5 standard errors of the uniform on 0..65535 (each 64-bit
    word gives four draws: an odd count cuts the last word); the same seed gives the same draws."""
    draws = uniform16(np.random.PCG64(3), 400_001)
    assert draws.dtype == np.uint16 and draws.shape == (400_001,)
    mean, var = (65536 - 1) / 2, (65536 ** 2 - 1) / 12
    assert abs(draws.mean() - mean) < 5 * np.sqrt(var / draws.size)
    assert abs(draws.astype(np.float64).var() / var - 1) < 5 * np.sqrt(0.8 / draws.size)  # uniform: kurtosis 1.8
    for lane in range(4):  # every 16-bit lane of the 64-bit words is used, and uniform
        assert abs(draws[lane::4].mean() - mean) < 5 * np.sqrt(var / draws[lane::4].size)
    np.testing.assert_array_equal(uniform16(np.random.PCG64(3), 400_001), draws)


class StubSession:
    """Inputs x [batch, 3] and one random input [batch, 5] (or ``random_shape``); returns the random input."""

    def __init__(self, random_shape=("vsonnx_batch", 5)):
        self.inputs = [SimpleNamespace(name="x", shape=["vsonnx_batch", 3]),
                       SimpleNamespace(name=f"{RANDOM_PREFIX}0", shape=list(random_shape))]

    def get_inputs(self):
        return self.inputs

    def get_providers(self):
        return ["CPUExecutionProvider"]

    def run(self, fetch, feeds, run_options=None):
        return [feeds[f"{RANDOM_PREFIX}0"]]


def test_random_feeding_draws_the_batch_size_of_each_run_and_hides_its_inputs():
    session = RandomFeeding(StubSession(), seed=0)
    assert [i.name for i in session.get_inputs()] == ["x"]
    assert session.get_providers() == ["CPUExecutionProvider"]  # the rest is the session's
    first = session.run(None, {"x": np.zeros((7, 3), np.float32)})[0]
    second = session.run(None, {"x": np.zeros((2, 3), np.float32)})[0]
    assert first.shape == (7, 5) and second.shape == (2, 5) and first.dtype == np.uint16
    again = RandomFeeding(StubSession(), seed=0).run(None, {"x": np.zeros((7, 3), np.float32)})[0]
    np.testing.assert_array_equal(again, first)  # seeded
    assert not np.array_equal(first[:2], second)  # fresh draws every run


def test_random_feeding_refuses_a_dimension_no_input_has():
    session = RandomFeeding(StubSession(random_shape=("height", 5)), seed=0)
    with pytest.raises(ValueError, match="height"):
        session.run(None, {"x": np.zeros((7, 3), np.float32)})
