import numpy as np

from vsonnx.stats import BatchAverage, BnStatistics, ChannelMoments


def data(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((60, 3, 4, 4)) * [[[[1.0]], [[5.0]], [[0.1]]]] + [[[[1000.0]], [[-3.0]], [[0.0]]]])


def test_moments_match_numpy_and_ignore_batching():
    x = data()
    ref_mean = x.transpose(1, 0, 2, 3).reshape(3, -1).mean(1)
    ref_var = x.transpose(1, 0, 2, 3).reshape(3, -1).var(1)
    for bs in (1, 7, 60):
        m = ChannelMoments(3)
        for i in range(0, 60, bs):
            m.update_array(x[i:i + bs])
        np.testing.assert_allclose(m.mean, ref_mean, rtol=1e-12)
        np.testing.assert_allclose(m.var, ref_var, rtol=1e-9)  # large |mean|: Chan keeps it exact


def test_merge_of_two_halves_equals_the_whole():
    x = data(1)
    whole, a, b = ChannelMoments(3), ChannelMoments(3), ChannelMoments(3)
    whole.update_array(x)
    a.update_array(x[:23])
    b.update_array(x[23:])
    merged = a.merge(b)
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-10)
    assert merged.count == whole.count


def test_sample_moments_equal_raw_update():
    x = data(2)
    raw, per_sample = ChannelMoments(3), ChannelMoments(3)
    raw.update_array(x)
    flat = x.reshape(60, 3, -1)
    means = flat.mean(2)
    m2 = ((flat - means[..., None]) ** 2).sum(2)
    per_sample.update_samples(16, means, m2)
    np.testing.assert_allclose(per_sample.mean, raw.mean, rtol=1e-12)
    np.testing.assert_allclose(per_sample.var, raw.var, rtol=1e-10)


def test_batch_average_is_equal_weight_of_unbiased_variances():
    x = data(3)
    avg = BatchAverage(3)
    batches = [x[:10], x[10:60]]
    for b in batches:
        c = b.transpose(1, 0, 2, 3).reshape(3, -1)
        avg.update(c.shape[1], c.mean(1), c.var(1))
    expected_var = np.mean([b.transpose(1, 0, 2, 3).reshape(3, -1).var(1, ddof=1) for b in batches], axis=0)
    expected_mean = np.mean([b.transpose(1, 0, 2, 3).reshape(3, -1).mean(1) for b in batches], axis=0)
    np.testing.assert_allclose(avg.var, expected_var, rtol=1e-12)
    np.testing.assert_allclose(avg.mean, expected_mean, rtol=1e-12)
    assert avg.count == 2


def test_interpolation_family_is_geometric_in_the_variance():
    from vsonnx.stats import interpolate

    old = {"bn": BnStatistics("bn", np.array([0.0, 1.0, 2.0]), np.array([4.0, 1.0, 0.0]), 1)}
    new = {"bn": BnStatistics("bn", np.array([1.0, 1.0, 0.0]), np.array([1.0, 1.0, 2.0]), 5, 40)}
    half = interpolate(old, new, 0.5)["bn"]
    np.testing.assert_allclose(half.mean, [0.5, 1.0, 1.0])
    np.testing.assert_allclose(half.var, [2.0, 1.0, 1.0])  # sqrt(4 * 1); a zero stored variance moves linearly
    for a, want in ((0.0, old["bn"]), (1.0, new["bn"])):
        got = interpolate(old, new, a)["bn"]
        np.testing.assert_allclose(got.mean, want.mean)
        np.testing.assert_allclose(got.var, want.var)
    assert (half.count, half.values) == (5, 40)
