"""What ``fix --val`` / ``--val-split`` chooses from, and how it ranks without labels.

Candidates: every calibrated method of the registry (distill only where torch is installed); population and
relative each give the interpolation family between the stored (m_s, v_s) and their re-estimated (m_r, v_r)
statistics (vsonnx.stats.interpolate)

    m = m_s + a (m_r - m_s),   v = v_s (v_r / v_s)^a,   a in INTERPOLATION,

named ``population`` (a = 1) and ``population a=0.875`` etc. Ranking, against the original model:
- ``top1``: top-1 on labelled validation data (``--val`` with labels);
- ``ensemble_ce``: without labels (``--val`` data without labels, or ``--val-split F``: a seeded fraction of
  ``--calib`` held out), the mean cross-entropy of the candidate against the classes the dropout ensemble
  predicts, -log q(argmax p), the ensemble p being the original model with dropout on averaged over
  ``masks`` seeded masks (vsonnx.ensemble). Lower is better. (Outputs compared with ``--loss mse``:
  ``ensemble_mse``, the mean squared difference from the ensemble's mean output.)
  Why not KL(ensemble || candidate): distill minimises exactly that, so KL ranks it first even where it is
  less accurate; on the held-out 20% of preresnet20-b05's calibration images KL put distill first (0.018
  vs relative 0.052) although it is 0.24 points below relative on the test images, while the cross-entropy
  against the ensemble's classes put relative first (0.157, distill 0.219); on preresnet20-a05 both put
  distill first (cross-entropy 0.224 vs relative 0.273; +1.6 points on the test images).
Without labels the default is ``relative`` (full strength), the correction the theory backs: another
candidate replaces it only when it is better on the held-out images with a paired test (per image, the
difference of their losses; the upper end of its 95% interval below zero, ``Ranking.best(anchor)``). On
densenet40-b05 the lowest mean was relative a=0.75, 0.39 points below relative on the test images; a small
held-out set ranks the family members on noise. A candidate that does not beat the original by the
criterion is never written. With ``--val-split`` the chosen method (and strength a) is then run again on all
of ``--calib`` (vsonnx.recalibrate), so the split costs no calibration data.
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
Z95 = 1.959964


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

    criterion: str  # "top1" (higher is better), "ensemble_ce" or "ensemble_mse" (lower is better)
    scores: list[float]
    per_sample: list[np.ndarray] | None = None  # the per-image losses behind ``scores`` (label-free criteria)
    samples: int = 0  # images ranked on

    def best(self, anchor: int | None = None) -> int | None:
        """Index (among the candidates, from 0) of the best candidate that beats the original, or None. With
        ``anchor`` (a candidate index) and per-sample losses, the anchor is kept unless the best is lower
        with a paired 95% interval entirely below zero (``paired_gain``)."""
        sign = 1 if self.criterion == "top1" else -1
        original, candidates = sign * self.scores[0], [sign * s for s in self.scores[1:]]
        k = max(range(len(candidates)), key=candidates.__getitem__)
        if anchor is not None and self.per_sample is not None and k != anchor:
            low, _ = self.paired_gain(anchor, k)
            k = k if low > 0 else anchor
        return k if candidates[k] > original else None

    def paired_gain(self, anchor: int, k: int) -> tuple[float, float]:
        """95% interval of the mean per-image loss of candidate ``anchor`` minus that of candidate ``k``
        (positive: ``k`` is better), over the same held-out images."""
        d = self.per_sample[anchor + 1] - self.per_sample[k + 1]
        half = Z95 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.inf
        return float(d.mean() - half), float(d.mean() + half)


def rank(model: onnx.ModelProto, candidates: list[onnx.ModelProto], source: Source, *, label_free: bool,
         channelwise: frozenset[str] = frozenset(), masks: int = 8, seed: int = 0, scores: tuple = (None, None),
         batch_size: int = 128, device: str = "auto", threads: int | None = None, progress: bool = False) -> Ranking:
    """Rank ``model`` (first) and ``candidates`` on ``source``: by top-1 when it has labels and not
    ``label_free``, else by divergence from the dropout ensemble (``scores``: (output, loss) overrides)."""
    models = [model] + candidates
    if source.has_labels and not label_free:
        from .accuracy import score_together

        reports = score_together({str(k): m for k, m in enumerate(models)}, source, batch_size=batch_size,
                                 device=device, threads=threads, progress=progress)
        return Ranking("top1", [r.top1 for r in reports.values()], samples=next(iter(reports.values())).samples)
    from .ensemble import ensemble_divergence, scores_tensor

    compared = scores_tensor(model, *scores)
    loss = "ce" if compared.loss == "kl" else compared.loss
    per_sample = ensemble_divergence(model, models, source, compared, masks=masks, seed=seed,
                                     channelwise=channelwise, batch_size=batch_size, device=device,
                                     threads=threads, progress=progress, loss=loss)
    return Ranking(f"ensemble_{loss}", [float(d.mean()) for d in per_sample], per_sample, len(per_sample[0]))
