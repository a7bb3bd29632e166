"""What a fix did: ``FixReport`` and how it is filled (per-BN rows, the message, provenance of a synthesis,
the digest of statistics written into provenance).

JSON schema of ``FixReport.to_dict()`` (``schema_version`` 1; keys are only ever added):
  model, output (str|null), written (bool), message (str), method (label of the method whose constants were
  written, or that was asked for when nothing was), chosen (candidate written, or null), samples (int),
  provider, seconds, passes, refused {bn: "N: reason"}, candidates [{name, val_top1, val_ensemble}] (top-1
  with labels, else null; share disagreeing with the dropout ensemble's classes, or the distance for --loss
  mse), criterion ("top1", "ensemble_disagreement", "ensemble_mse" or null), val_samples (images the
  candidates were ranked on, or null), evidence [{candidate, over, over_is, gain, ci95 [low, high]}]: the chosen
  candidate (or the best, where none was) against the original, and the choice against the candidate it had
  to beat (the label-free choice on the same images with labels, relative without; vsonnx.choose.Choice.evidence),
  the mean per-image gain by the criterion (top-1 or agreement with the ensemble in points, mse in its units;
  positive: better) with its paired 95% interval,
  batchnorms [{name, site (the site's path, "downstream", or "none" for a BN --all re-estimates with no site
  before it), old_mean, old_var, new_mean, new_var}], notes {name: str}, warnings [str],
  folded [layer]: Conv/Gemm layers whose folded BN was corrected relative to its lost statistics (named sites).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields

import numpy as np

from .sites import ScanReport
from .stats import BnStatistics, Estimate

SCHEMA_VERSION = 1


@dataclass
class FixReport:
    """What a fix did (see the module docstring for the JSON schema)."""

    model: str
    method: str
    samples: int
    output: str | None
    written: bool
    message: str
    batchnorms: list[dict] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    candidates: list[dict] = field(default_factory=list)
    chosen: str | None = None
    provider: str | None = None
    seconds: float | None = None
    passes: int | None = None
    warnings: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    criterion: str | None = None
    val_samples: int | None = None
    evidence: list[dict] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)  # layers whose folded BN was corrected relative to lost statistics

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, **{f.name: getattr(self, f.name) for f in fields(self)}}


def written_message(result: Estimate, n: int) -> str:
    """What was written: ``n`` BNs corrected by ``result``."""
    if result.method == "synthesized":
        f = result.fitting
        return (f"corrected {n} BatchNormalization layer(s) from {f.synthetic_samples} synthetic inputs "
                f"({f.steps} steps, statistics-matching loss {f.loss_first:.3g} -> {f.loss_last:.3g}).")
    if result.method == "closed_form":
        skipped = len(result.site_notes) - n
        return (f"corrected {n} site(s) without data" + (f", left {skipped} unchanged" if skipped else "")
                + "; downstream BNs unchanged.")
    return f"re-estimated {n} BatchNormalization layer(s) on {result.samples} samples."


def describe(report: FixReport, result: Estimate | None, stats: dict[str, BnStatistics], scan: ScanReport,
             old: dict[str, BnStatistics]) -> None:
    """Fill the report's per-BN rows (``stats`` written over ``old``) and run facts from ``result``."""
    if result is not None:
        report.samples, report.provider, report.seconds, report.passes = (result.samples, result.provider,
                                                                          result.seconds, result.passes)
        report.warnings += result.notes
    kinds = {b.name: (b.path or "downstream") if b.site else "downstream" if b.downstream_of_site else "none"
             for b in scan.batchnorms}  # "none": re-estimated by --all, no site before it
    report.batchnorms = [
        {"name": n, "site": kinds.get(n), "old_mean": old[n].mean.tolist(), "old_var": old[n].var.tolist(),
         "new_mean": np.asarray(s.mean).tolist(), "new_var": np.asarray(s.var).tolist()}
        for n, s in stats.items() if n in old]


def site_notes(closed: Estimate, result: Estimate, old: dict[str, BnStatistics]) -> dict[str, str]:
    """Per site: the closed-form result, and next to it the synthetic one when the synthesis ran (variance
    ratios against the ``old`` stored statistics)."""
    notes = dict(closed.site_notes)
    if result is closed:
        return notes

    def var_ratio(stats: BnStatistics) -> str:
        return f"median var x{float(np.median(stats.var / np.maximum(old[stats.name].var, 1e-30))):.3f}"

    for name in [n for n in notes if n in result.statistics]:
        formula = closed.statistics.get(name)
        notes[name] = f"synthetic: {var_ratio(result.statistics[name])}" + (
            f"; closed form: {var_ratio(formula)}" if formula is not None else f"; closed form: {notes[name]}")
    return notes


def synthesis_provenance(result: Estimate) -> dict[str, str]:
    if result.method != "synthesized":
        return {}
    f = result.fitting
    return {"synthetic_samples": str(f.synthetic_samples), "synthetic_steps": str(f.steps),
            "synthesis_loss": f"{f.loss_first:.4g} -> {f.loss_last:.4g}"}


def digest(stats: dict[str, BnStatistics]) -> str:
    h = hashlib.sha256()
    for name in sorted(stats):
        h.update(name.encode())
        h.update(np.asarray(stats[name].mean, np.float32).tobytes())
        h.update(np.asarray(stats[name].var, np.float32).tobytes())
    return h.hexdigest()[:16]
