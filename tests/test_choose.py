"""The candidates of --val and the ranking rule (vsonnx.choose)."""
import numpy as np

from vsonnx.choose import INTERPOLATION, Ranking, family
from vsonnx.stats import BnStatistics


def test_ranking_picks_the_best_candidate_only_when_it_beats_the_original():
    assert Ranking("top1", [80.0, 79.0, 82.0, 81.0]).best() == 1
    assert Ranking("top1", [80.0, 80.0, 79.0]).best() is None  # a tie keeps the original
    assert Ranking("ensemble_disagreement", [0.10, 0.12, 0.08, 0.09]).best() == 1  # lower is better
    assert Ranking("ensemble_mse", [0.05, 0.06, 0.07]).best() is None


def test_label_free_ranking_keeps_the_anchor_unless_the_best_is_better_with_a_paired_test():
    rng = np.random.default_rng(0)
    base = rng.exponential(0.3, 2000)
    original, anchor = base + 0.05, base
    noise = base + rng.normal(0, 0.05, 2000) - 0.001  # lower mean, not significantly
    clear = base - 0.02 + rng.normal(0, 0.01, 2000)  # lower by 0.02, the interval far below zero
    ranking = Ranking("ensemble_mse", [float(x.mean()) for x in (original, anchor, noise)], [original, anchor, noise])
    assert ranking.best() == 1 and ranking.best(anchor=0) == 0
    low, high = ranking.paired_gain(0, 1)
    assert low < 0 < high  # independent check: the interval of the gain holds zero
    ranking = Ranking("ensemble_mse", [float(x.mean()) for x in (original, anchor, clear)], [original, anchor, clear])
    assert ranking.best(anchor=0) == 1 and ranking.paired_gain(0, 1)[0] > 0.015
    worse = [original, original + 0.01, original + 0.02]  # nothing beats the original: nothing is chosen
    assert Ranking("ensemble_mse", [float(x.mean()) for x in worse], worse).best(anchor=0) is None


def test_population_and_relative_give_the_interpolation_family():
    old = {"bn": BnStatistics("bn", np.zeros(2), np.ones(2), 1)}
    new = {"bn": BnStatistics("bn", np.ones(2), 4 * np.ones(2), 1)}
    names = [name for name, _, _ in family("relative", old, new)]
    assert names == ["relative a=0.25", "relative a=0.5", "relative a=0.75", "relative a=0.875", "relative"]
    assert len(INTERPOLATION) == 5 and INTERPOLATION[-1] == 1.0
    assert [a for _, a, _ in family("relative", old, new)] == list(INTERPOLATION)
    assert [name for name, _, _ in family("batch", old, new)] == ["batch"]
    assert family("distill", old, new)[0][2] is new


def disagreements(rates: list[float], n: int = 1000, seed: int = 0) -> Ranking:
    """A label-free ranking whose models disagree with the ensemble on about ``rates`` of ``n`` images, the
    same images where the rates allow (nested), plus independent flips."""
    u = np.random.default_rng(seed).random(n)
    per_sample = [(u < r).astype(np.float64) for r in rates]
    return Ranking("ensemble_disagreement", [float(x.mean()) for x in per_sample], per_sample, n)


def test_label_free_choice_trusts_the_ensemble_only_where_population_moves_towards_it():
    names = ["batch", "population", "relative", "distill"]
    # population, relative and distill all move towards the ensemble; distill clearly most: distill
    assert disagreements([0.30, 0.15, 0.15, 0.12, 0.05]).choice(names) == (3, None)
    # distill lower than relative by a hair (nested: 2 images of 1000): relative kept
    assert disagreements([0.30, 0.15, 0.15, 0.120, 0.118]).choice(names) == (2, None)
    # population moves away from the ensemble (stale stored statistics): population, whatever agrees most
    stale = disagreements([0.30, 0.55, 0.55, 0.20, 0.03])
    k, why = stale.choice(names)
    assert k == 1 and "not trusted" in why and f"{stale.scores[2]:.0%} of" in why and f"{stale.scores[0]:.0%}," in why
    # population a hair worse than the original is not evidence: the ensemble stays trusted
    assert disagreements([0.300, 0.15, 0.302, 0.12, 0.05]).choice(names) == (3, None)
    # labelled rankings and output distances are not subject to the trust test
    assert Ranking("top1", [50.0, 40.0, 60.0, 55.0, 45.0]).choice(names) == (1, None)
    mse = disagreements([0.30, 0.15, 0.55, 0.12, 0.05])
    mse.criterion = "ensemble_mse"
    assert mse.choice(names) == (3, None)


def test_on_stochastic_depth_the_ensemble_is_not_trusted_and_population_is_chosen():
    names = ["batch", "population", "relative", "distill"]
    healthy = disagreements([0.30, 0.15, 0.15, 0.12, 0.05])  # distill agrees most, clearly
    assert healthy.choice(names) == (3, None)
    k, why = healthy.choice(names, stochastic_depth=True)
    assert k == 1 and "not trusted" in why and "stochastic depth" in why
    mse = disagreements([0.30, 0.15, 0.15, 0.12, 0.05])
    mse.criterion = "ensemble_mse"
    assert mse.choice(names, stochastic_depth=True)[0] == 1
    without = disagreements([0.30, 0.15, 0.12, 0.05])  # no population candidate: the rule of the others
    assert without.choice(["batch", "relative", "distill"], stochastic_depth=True) == (2, None)
    top1 = Ranking("top1", [50.0, 40.0, 60.0, 55.0, 45.0])
    assert top1.choice(names, stochastic_depth=True) == (1, None)  # labels: the best top-1, no override


def test_labelled_choice_keeps_the_label_free_prior_unless_labels_show_better():
    names = ["batch", "population", "relative", "distill"]
    rng = np.random.default_rng(1)
    u = rng.random(2000)
    near = u + rng.normal(0, 0.1, 2000)  # the same images mostly; 8% differ, both ways
    misses = {"original": u < 0.50, "batch": u < 0.40, "population": u < 0.40, "relative": u < 0.39,
              "distill": near < 0.386}
    per_sample = [misses[n].astype(np.float64) for n in ["original", *names]]
    ranking = Ranking("top1", [100 * (1 - float(m.mean())) for m in per_sample], per_sample, 2000)
    assert ranking.choice(names) == (3, None)  # no prior: the best top-1
    assert ranking.scores[4] > ranking.scores[3] and ranking.choice(names, prior=2) == (2, None)  # the prior stays
    clear = [m.copy() for m in per_sample]
    clear[4] = (u < 0.33).astype(np.float64)  # distill 6 points better: labels win
    ranking = Ranking("top1", [100 * (1 - float(m.mean())) for m in clear], clear, 2000)
    assert ranking.choice(names, prior=2) == (3, None)
    worse = [per_sample[0], *(per_sample[0] + 0 for _ in names)]  # nothing beats the original: nothing
    assert Ranking("top1", [100 * (1 - float(m.mean())) for m in worse], worse, 2000).choice(names, 2) == (None, None)


def test_evidence_is_the_paired_interval_of_each_comparison_behind_a_choice():
    """Hand-built per-image disagreements: the chosen candidate vs the original and vs the prior it replaced,
    or, where the prior was kept, the best candidate vs the prior; each against numpy's textbook interval."""
    from vsonnx.choose import Choice

    rng = np.random.default_rng(1)
    losses = [(rng.random(400) < p).astype(float) for p in (0.30, 0.20, 0.19, 0.10)]  # original, a, b, c

    def textbook(over, k):
        d = losses[over] - losses[k]
        half = 1.959964 * d.std(ddof=1) / np.sqrt(len(d))  # the rule's z (vsonnx.choose.Z95)
        return [100 * d.mean(), 100 * (d.mean() - half), 100 * (d.mean() + half)]

    ranking = Ranking("ensemble_disagreement", [float(x.mean()) for x in losses], losses, 400)
    names = ["a", "b", "c"]
    replaced = Choice(2, ranking, ranking, prior=0).evidence(names)  # c replaced a
    assert [(e["candidate"], e["over"]) for e in replaced] == [("c", "original"), ("c", "a")]
    np.testing.assert_allclose([replaced[1]["gain"], *replaced[1]["ci95"]], textbook(1, 3), atol=1e-5)
    np.testing.assert_allclose([replaced[0]["gain"], *replaced[0]["ci95"]], textbook(0, 3), atol=1e-5)
    kept = Choice(0, ranking, ranking, prior=0).evidence(names)  # a kept: c, the best, against it
    assert [(e["candidate"], e["over"]) for e in kept] == [("a", "original"), ("c", "a")]
    nothing = Choice(None, ranking, ranking, prior=0).evidence(names)
    assert [(e["candidate"], e["over"]) for e in nothing] == [("c", "original")]
    assert Choice(2, Ranking("top1", [1.0, 2.0], None), None).evidence(["x"]) == []  # no per-image losses
