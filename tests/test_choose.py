"""The candidates of --val and the ranking rule (vsonnx.choose)."""
import numpy as np

from vsonnx.choose import INTERPOLATION, Ranking, family
from vsonnx.stats import BnStatistics


def test_ranking_picks_the_best_candidate_only_when_it_beats_the_original():
    assert Ranking("top1", [80.0, 79.0, 82.0, 81.0]).best() == 1
    assert Ranking("top1", [80.0, 80.0, 79.0]).best() is None  # a tie keeps the original
    assert Ranking("ensemble_ce", [0.10, 0.12, 0.08, 0.09]).best() == 1  # lower is better
    assert Ranking("ensemble_mse", [0.05, 0.06, 0.07]).best() is None


def test_population_and_relative_give_the_interpolation_family():
    old = {"bn": BnStatistics("bn", np.zeros(2), np.ones(2), 1)}
    new = {"bn": BnStatistics("bn", np.ones(2), 4 * np.ones(2), 1)}
    names = [name for name, _ in family("relative", old, new)]
    assert names == ["relative a=0.25", "relative a=0.5", "relative a=0.75", "relative a=0.875", "relative"]
    assert len(INTERPOLATION) == 5 and INTERPOLATION[-1] == 1.0
    assert [name for name, _ in family("batch", old, new)] == ["batch"]
    assert family("distill", old, new)[0][1] is new
