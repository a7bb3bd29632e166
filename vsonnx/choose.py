"""What ``fix --val`` / ``--val-split`` chooses from, and how it ranks without labels.

Candidates: every calibrated method of the registry (distill only where torch is installed); population and
relative each give the interpolation family between the stored (m_s, v_s) and their re-estimated (m_r, v_r)
statistics (vsonnx.stats.interpolate)

    m = m_s + a (m_r - m_s),   v = v_s (v_r / v_s)^a,   a in INTERPOLATION,

named ``population`` (a = 1) and ``population a=0.875`` etc. Ranking, against the original model:
- ``top1``: top-1 on labelled validation data (``--val`` with labels). The label-free choice on the same
  images (labels unused) is kept unless another candidate has a higher top-1 with a paired test (per image,
  the difference of hits; 95%), and is written only if its top-1 beats the original's. Two thousand labelled
  images resolve about one point: on the suite the plain best top-1 missed the best test accuracy by up to
  1.0 points (plain6-a03: relative 63.70% vs distill 63.45% on the validation images, distill +1.02 on the
  test images) where the label-free choice was right;
- ``ensemble_disagreement``: without labels (``--val`` data without labels, or ``--val-split F``: a seeded
  fraction of ``--calib`` held out), the share of images on which the candidate's class differs from the
  class the dropout ensemble predicts, argmax q != argmax p, the ensemble p being the original model with
  dropout on, softmax averaged over ``masks`` seeded masks (vsonnx.ensemble). Lower is better. (Outputs
  compared with ``--loss mse``: ``ensemble_mse``, the mean squared difference from the ensemble's mean output.)

The label-free rule (``Ranking.choice``), chosen on the design half of the variance-shift suite
(models/SUITE.md, tools/suite_signals.py):
1. Trust: the ensemble runs the *stored* statistics with dropout on. Where they are stale (BN momentum None, a
   cumulative average over training) the ensemble is worse than the data's own statistics, and every candidate
   fitted towards it too: pre8-a03-cumulative's ensemble scores 36.9%, distill 37.2%, relative 45.2%, population
   63.7%. Population (statistics measured on the data, blind to the stored ones) then agrees with the ensemble's
   classes less often than the unfixed original does (42% vs 69% of held-out images), while on every other design
   member it agrees more (by 0.5 to 50 points): removing the variance shift moves a model towards what its
   ensemble predicts. On the check half it also fired without a cumulative average, twice, both right
   (dense10-2d-b03, Dropout2d before a conv: the ensemble 1.15 points below batch, distill 1.10 below, population
   0.06 below; resnext11-b03-bnm001, BN momentum 0.01: the ensemble 2.98 below batch, distill 3.20, relative
   2.49, population 0.06). So where population disagrees with the ensemble more often than the original, with a
   paired 95% interval (per image) above zero, the ensemble is not trusted and population is chosen (with a
   warning saying why).
   Nor is it trusted where every site's noise is stochastic depth (a residual branch dropped per sample;
   ``ScanReport.stochastic_depth``): population is chosen (with a warning). Its ensemble drops whole branches and
   was less accurate than population on eight of the suite's ten such networks; distill, which it ranks first,
   was below population on nine (by 0.17-1.46 points), relative on eight (by 0.03-0.59). Not chosen on the design
   half (its one such member, pre8-sd02, had relative 0.04 above population): suggested by the check half's three
   (relative 0.14-0.35 below population on each; so no longer a check of it) and kept by a test registered before
   two more were trained (tools/suite_members.py: population at least relative's top-1 on both; it was, by 0.04
   and 0.06, where the rule before chose distill on pre8-sd05, 0.74 below batch, resolved on the test images),
   and by two trained after it was adopted (pre8-sd04-bnm001: population 0.01 below batch, relative 0.50 below
   population; pre14-sd03: population the best, relative 0.59 below). Off PreResNets it was registered again
   before two Wide ResNets were trained (population at least relative's top-1 and within 0.2 of the best on both)
   and missed by 0.03 points (wrn10-2-sd03: population 46.04, relative and batch 46.07; wrn10-2-sd04-adam:
   population 41.37, relative 41.34): there the candidates tie and the rule costs nothing measurable (label-free
   0.03 and 0.04 below the best, distill 0.34 below on the first). It costs 0.11 points on the reference
   PreResNet-20 with stochastic depth (models/: population 68.75%, relative 68.86%).
2. Otherwise ``relative`` (the correction the theory backs), replaced by the candidate agreeing most with the
   ensemble only where that one agrees more with a paired test (per image, the difference of their
   disagreements; the lower end of its 95% interval above zero, ``Ranking.best(anchor)``). Agreement, not
   cross-entropy: cross-entropy rewards a candidate's confidence, which the interpolation family and distill
   change, while what the user gets is the class; on the design half cross-entropy ranked distill below
   relative where distill was 0.5-1.4 points better on the test images (plain6-b03, plain6mlp-a05).
   The paired test keeps relative where distill's fit to the ensemble does not change the classes.
On the design half (label-free choice minus the best single method's test top-1, per member) this rule gives
median +0.00, worst -0.13 points (pre8-sd02, the stochastic-depth rule; -0.09 without it); ranking by
cross-entropy with the relative anchor gave median -0.94, worst -26.58 (models/SUITE.md has both halves). On the
thirty-three members trained after rules 1 and 2 were fixed and not used to decide the stochastic-depth rule
(SUITE.md's fresh members without a dagger, thirteen batches): label-free median -0.05, worst -0.38
(dense10-2d-a02: relative, population best, resolved on the test images), never below the original; the trust
test chose population on both fresh cumulative-average members, where relative and distill were 5.5 and 7.4
points below (pre8-a04-cumulative) and 28.2 and 35.3 below (plain6mlp-a04-cumulative, an MLP head). A margin on
the replacement (the challenger also disagreeing with the ensemble on 2 points fewer images than relative),
suggested by the check half, failed the test registered before the twelfth batch (resnext11-b02: relative 0.11
below distill) and was not adopted (tools/suite_signals.py, ``agreement_margin``); nor was population on a small
shift (the original disagreeing with the ensemble on under 16% of held-out images), which failed the test
registered before the thirteenth batch (pre8-a01 and dense10-a01: population 0.22 below the choice, distill, on
both; -0.66 against -0.27 over the batch; ``small_shift_population``).
Its known miss is with labels: on plain6-2d-b03 (Dropout2d before a conv, the ensemble 0.6 points below batch)
the label-free choice on the validation images was distill, and 2,000 labelled images favoured relative by
0.55 points, not enough to overrule it: distill scored 0.67 below batch on the test images; with 8,000
labelled images (``python tools/suite.py choose --val-samples 8000``) the labels chose batch there, but over
the first twelve fresh members they came within 0.1 of the best no more often (8 of 12 with either). Nor could
any labelled choice: an ideal chooser taking the best single method on 2,000 labelled images drawn from the test
images themselves is expected within 0.1 on 35.6 of the 47 check members (10,000 images: 41.6; the label-free
choice is within on 36, the labelled one on 33; ``python tools/suite.py ideal``). A
candidate that does not beat the original by the criterion is never written (except population when the
ensemble is not trusted, which is then not a measure of anything). With ``--val-split`` the chosen method
(and strength a) is then run again on all of ``--calib`` (vsonnx.recalibrate), so the split costs no
calibration data. The fix reports the paired intervals behind a choice (``Choice.evidence``): how firmly the
images ranked on separate the chosen candidate from the original and from the candidate it had to beat.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .data import Source
from .errors import warn
from .methods import CALIBRATED, REGISTRY
from .stats import BnStatistics, interpolate

INTERPOLATION = (0.25, 0.5, 0.75, 0.875, 1.0)
FAMILY_METHODS = ("population", "relative")
ANCHOR = "relative"  # the label-free default, replaced only by a significantly better candidate
FALLBACK = "population"  # chosen where the dropout ensemble is not trusted
Z95 = 1.959964  # the paired tests of the rule (compare's interval takes 1.96)


def candidate_methods() -> list[str]:
    """The calibrated methods that can run here (a warning names those skipped for want of torch)."""
    skipped = [m for m in CALIBRATED if not REGISTRY[m].available]
    if skipped:
        warn(f"candidate(s) {', '.join(skipped)} skipped: torch is not installed (pip install 'vsonnx[train]').")
    return [m for m in CALIBRATED if m not in skipped]


def family(method: str, old: dict[str, BnStatistics], new: dict[str, BnStatistics]) -> list[tuple[str, float, dict]]:
    """(candidate name, strength a, statistics) for ``method``'s result: the interpolation family, or the
    result alone (a = 1)."""
    if method not in FAMILY_METHODS:
        return [(method, 1.0, new)]
    return [(method if a == 1 else f"{method} a={a:g}", a, interpolate(old, new, a)) for a in INTERPOLATION]


@dataclass
class Ranking:
    """Scores of the original (first) and of every candidate, by ``criterion``."""

    criterion: str  # "top1" (higher is better), "ensemble_disagreement" or "ensemble_mse" (lower is better)
    scores: list[float]
    per_sample: list[np.ndarray] | None = None  # per-image losses behind ``scores`` (top1: 1 - hit)
    samples: int = 0  # images ranked on

    def best(self, anchor: int | None = None) -> int | None:
        """Index (among the candidates, from 0) of the best candidate that beats the original, or None. With
        ``anchor`` (a candidate index) and per-sample losses, the anchor is kept unless the best is lower
        with a paired 95% interval entirely below zero (``paired_gain``)."""
        sign = 1 if self.criterion == "top1" else -1
        original, candidates = sign * self.scores[0], [sign * s for s in self.scores[1:]]
        k = self.best_raw()
        if anchor is not None and self.per_sample is not None and k != anchor:
            low, _ = self.paired_gain(anchor, k)
            k = k if low > 0 else anchor
        return k if candidates[k] > original else None

    def choice(self, names: list[str], prior: int | None = None,
               stochastic_depth: bool = False) -> tuple[int | None, str | None]:
        """The candidate (index into ``names``, the candidates' names) the rule of the module docstring
        chooses, or None for the original; and why, where the dropout ensemble was not trusted. By top-1,
        ``prior`` (the label-free choice on the same images) is kept unless labels show another candidate
        better with a paired test. ``stochastic_depth``: every site's noise drops a residual branch per
        sample."""
        if self.criterion == "top1":
            return self.best(prior), None
        if stochastic_depth and FALLBACK in names:
            return names.index(FALLBACK), (
                f"the dropout ensemble is not trusted: every site's noise is stochastic depth (a residual branch "
                f"dropped per sample), whose ensemble was less accurate than {FALLBACK} (statistics measured on "
                f"the data) on most such networks of the variance-shift suite; chose {FALLBACK}.")
        if self.criterion == "ensemble_disagreement" and FALLBACK in names:
            k = names.index(FALLBACK)
            if self.per_sample is not None and self.gain(k)[2] < 0:  # more disagreement than the original
                return k, (f"the dropout ensemble is not trusted: {FALLBACK} (statistics measured on the data) "
                           f"disagrees with its classes on {self.scores[k + 1]:.0%} of the held-out samples, the "
                           f"original on {self.scores[0]:.0%}, so the stored statistics it runs look stale (e.g. a "
                           f"cumulative BN average) or its noise makes it less accurate than they are; chose "
                           f"{FALLBACK}.")
        return self.best(names.index(ANCHOR) if ANCHOR in names else None), None

    def best_raw(self) -> int:
        """Index of the best candidate by the criterion alone (no anchor, no test against the original)."""
        sign = 1 if self.criterion == "top1" else -1
        return max(range(len(self.scores) - 1), key=lambda k: sign * self.scores[k + 1])

    def paired_gain(self, anchor: int, k: int) -> tuple[float, float]:
        """95% interval of the mean per-image loss of candidate ``anchor`` minus that of candidate ``k``
        (positive: ``k`` is better), over the same held-out images."""
        return self.gain(k, anchor)[1:]

    def gain(self, k: int, over: int | None = None) -> tuple[float, float, float]:
        """Mean per-image loss of candidate ``over`` (None: the original) minus that of candidate ``k``
        (positive: ``k`` is better), with its paired 95% interval (normal approximation)."""
        from .accuracy import mean_interval

        return mean_interval(self.per_sample[0 if over is None else over + 1] - self.per_sample[k + 1], Z95)


def rank(model: onnx.ModelProto, candidates: list[onnx.ModelProto], source: Source, *, label_free: bool,
         channelwise: frozenset[str] = frozenset(), masks: int = 8, seed: int = 0, scores: tuple = (None, None),
         batch_size: int = 128, device: str = "auto", threads: int | None = None, progress: bool = False) -> Ranking:
    """Rank ``model`` (first) and ``candidates`` on ``source``: by top-1 when it has labels and not
    ``label_free``, else by divergence from the dropout ensemble (``scores``: (output, loss) overrides)."""
    models = [model] + candidates
    if source.has_labels and not label_free:
        from .accuracy import run_scorers

        scorers = run_scorers({str(k): m for k, m in enumerate(models)}, source, batch_size=batch_size,
                              device=device, threads=threads, progress=progress, scores=scores[0])
        reports = [s.report(k) for k, s in scorers.items()]
        misses = [1.0 - np.concatenate(s.hits).astype(np.float64) for s in scorers.values()]
        return Ranking("top1", [r.top1 for r in reports], misses, reports[0].samples)
    from .ensemble import ensemble_divergence, scores_tensor

    compared = scores_tensor(model, *scores)
    loss = "disagree" if compared.loss == "kl" else compared.loss
    per_sample = ensemble_divergence(model, models, source, compared, masks=masks, seed=seed,
                                     channelwise=channelwise, batch_size=batch_size, device=device,
                                     threads=threads, progress=progress, loss=loss)
    criterion = "ensemble_disagreement" if loss == "disagree" else f"ensemble_{loss}"
    return Ranking(criterion, [float(d.mean()) for d in per_sample], per_sample, len(per_sample[0]))


@dataclass
class Choice:
    """What --val / --val-split chose: ``index`` into the candidates (None: the original), the ranking by the
    criterion used, the label-free ranking on the same images (the same object without labels), why the
    ensemble was not trusted, where it was not, and ``prior``: the candidate the labels had to beat (the
    label-free choice on the same images) or, without labels, the anchor (relative)."""

    index: int | None
    ranking: Ranking
    unlabelled: Ranking
    why: str | None = None
    prior: int | None = None

    def evidence(self, names: list[str]) -> list[dict]:
        """How far the images ranked on separate what was chosen from what it was chosen over, per comparison:
        the chosen candidate against the original, then against ``prior`` where it replaced it, or, where
        ``prior`` was kept, the best candidate by the criterion against it; with nothing chosen, the best
        candidate against the original. Each: the mean per-image gain in the criterion's units with its
        paired 95% interval (positive: the first is better); top-1 and disagreement in points (percent of
        samples). Empty below two samples."""
        r = self.ranking
        if r.per_sample is None or len(r.scores) < 2 or r.samples < 2:
            return []
        unit = 1.0 if r.criterion == "ensemble_mse" else 100.0
        best = r.best_raw()
        pairs = [(best if self.index is None else self.index, None)]
        if self.index is not None and self.prior is not None:
            pairs += [(self.index, self.prior)] if self.prior != self.index else \
                [(best, self.prior)] if best != self.prior else []

        role = "the default" if r.criterion != "top1" else "the label-free choice on the same samples"

        def row(k: int, over: int | None) -> dict:
            mean, low, high = r.gain(k, over)
            return {"candidate": names[k], "over": "original" if over is None else names[over],
                    "over_is": "the original" if over is None else role,
                    "gain": round(unit * mean, 6), "ci95": [round(unit * low, 6), round(unit * high, 6)]}
        return [row(k, over) for k, over in pairs]


def choose(model: onnx.ModelProto, candidates: list[onnx.ModelProto], names: list[str], source: Source, *,
           label_free: bool, stochastic_depth: bool = False, **settings) -> Choice:
    """Rank (``rank``, with ``settings``) and choose by the rule of the module docstring: without labels
    ``Ranking.choice``; with labels the label-free choice on the same images is the prior that top-1 must
    beat with a paired test. ``stochastic_depth``: every site's noise drops a residual branch per sample."""
    ranking = rank(model, candidates, source, label_free=label_free, **settings)
    if ranking.criterion != "top1":
        index, why = ranking.choice(names, stochastic_depth=stochastic_depth)
        return Choice(index, ranking, ranking, why, names.index(ANCHOR) if ANCHOR in names and not why else None)
    unlabelled = rank(model, candidates, source, label_free=True, **settings)
    prior, _ = unlabelled.choice(names, stochastic_depth=stochastic_depth)
    return Choice(ranking.choice(names, prior)[0], ranking, unlabelled, prior=prior)
