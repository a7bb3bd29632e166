"""`vsonnx fix`: new statistics for the variance-shift BNs, written into a copy of the model.

Three entry points over one ``FixOptions`` and one tail (choose a candidate -> validate -> write with
provenance):
- ``fix_calibrated(model, calib, method)``: a calibrated method of the registry (vsonnx.methods: batch,
  population, relative, distill). With ``val`` (or ``val_split``) every calibrated method is a candidate,
  population and relative with their interpolation families (vsonnx.choose); the best by validation top-1
  (labelled ``val``) or, without labels, by how rarely it disagrees with the dropout ensemble's classes is
  written (vsonnx.choose), nothing when the original is best (unless ``force``).
- ``fix_data_free(model)``: ``synthesized`` (inputs synthesised from the BN statistics, every BN in scope),
  or with ``synthetic=0`` ``closed_form`` (the paper's formulas, sites only). With ``val`` the correction is
  written only when it beats the original.
- ``fix_named_sites(model, calib, sites)``: exports that removed Dropout, perhaps folding BN into Conv/Gemm
  (the ``named_sites`` method, or ``distill``; folded layers get an affine correction of their weights).
``fix(model, calib, ...)`` dispatches to them with the keyword arguments of the README.

The rewrite itself is vsonnx.rewrite (find -> check -> apply); ``scan`` shows the same check per BN.
Warnings raised while fixing (vsonnx.errors.warn) are collected into the report (vsonnx.fix_report); the
CLI renders them.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from ._version import __version__
from .data import open_source, replayable, resolve_batch_size, source_identity, split_source
from .errors import VsonnxError, collected_warnings
from .fix_options import FixOptions
from .fix_report import FixReport, describe, digest, site_notes, synthesis_provenance, written_message
from .graph import GraphIndex
from .methods import CALIBRATED, REGISTRY, EstimateRequest, get
from .fix_input import check_not_fixed_before, input_of_fix
from .model import save_model, same_file
from .rewrite import apply_affine, inference_form, invalid_statistics, plan, validate, with_statistics
from .sites import ScanReport, find_sites
from .stats import BnStatistics, Estimate, interpolate


@dataclass
class Candidate:
    """New statistics (and folded-layer corrections) that may be written, with the result behind them."""

    name: str
    stats: dict[str, BnStatistics]
    result: Estimate | None = None
    affine: dict = field(default_factory=dict)
    score: float | None = None  # by the ranking criterion (vsonnx.choose)
    strength: float = 1.0  # a of the interpolation family (vsonnx.choose.family)


@dataclass
class _Job:
    """One fix: the input, where it goes, its scan, the BNs to estimate and the report being filled."""

    path: Path
    model: onnx.ModelProto
    out: Path
    options: FixOptions
    scan: ScanReport
    names: list[str]
    report: FixReport
    index: GraphIndex  # the one index of ``model`` this fix reads (the model is never edited in place)
    val_source: object = None  # the held-out part of the calibration data (val_split)
    calib: object = None  # the calibration data of a calibrated fix
    every_candidate: bool = False  # calibrate every candidate even without validation data (candidate_models)
    given: object = None  # the caller's model argument: a path, or a ModelProto (``path`` is then <memory>)

    @property
    def choosing(self) -> bool:
        return self.options.choice.choosing or self.every_candidate

    def request(self, source=None, method: str | None = None, **method_options) -> EstimateRequest:
        o = self.options
        r = o.runtime
        return EstimateRequest(self.model, self.names, self.scan, source, r.batch_size, r.device, r.threads, r.progress,
                               o.data.seed, {**o.method.settings.get(method, {}), **method_options})


def _start(model_path, options: FixOptions, method: str, every_candidate: bool = False) -> _Job:
    """Load, check the output path and that no fix wrote the model before (vsonnx.fix_input), find the BNs in
    scope and what the rewrite refuses; ``method``: the registry method the job runs."""
    path, model, out = input_of_fix(model_path, options.output.path, options.output.in_place)
    label = REGISTRY[method].label
    again = check_not_fixed_before(model, path, method, label, options.choice.choosing or every_candidate)
    model, converted = inference_form(model)
    options = options.with_batch_size(resolve_batch_size(model, options.runtime.batch_size))
    index = GraphIndex(model)
    scan = find_sites(model, str(path), index)
    report = FixReport(str(path), label, 0, None, False, "",
                       warnings=converted + list(scan.warnings) + ([again] if again else []))
    decisions = plan(model, scan, options.method.scope, index)
    report.refused = {d.name: d.refusal for d in decisions if d.refusal}
    return _Job(path, model, out, options, scan, [d.name for d in decisions if not d.refusal], report, index,
                every_candidate=every_candidate, given=model_path)


def _nothing_to_do(job: _Job) -> str | None:
    """Why a fix of BN statistics has nothing to do (exit 0), or None; a user error when every BN in scope
    is refused (nothing can be written)."""
    if job.names:
        return None
    if job.report.refused:
        _refuse_all(job.report.refused)
    if not job.scan.batchnorms:
        return "the model has no BatchNormalization: nothing to fix."
    return ("no Dropout->BatchNormalization site: nothing to fix (if the export removed Dropout, name where it "
            "acted with --dropout NAME=RATIO; --all re-estimates every BN anyway).")


def _refuse_all(refused: dict[str, str]) -> None:
    listed = "; ".join(f"'{name}': {reason}" for name, reason in refused.items())
    raise VsonnxError(f"every BatchNormalization in scope was refused, nothing was written: {listed}.",
                      "see the numbered rules in `vsonnx scan MODEL` (column 'fix would') and fix what they name.")


def fix_calibrated(model_path, calib, method: str = "batch", options: FixOptions | None = None) -> FixReport:
    """Re-estimate the statistics of the BNs in scope on ``calib`` with a calibrated registry method and write
    the fixed model (default ``MODEL.fixed.onnx``); with ``options.choice.val`` choose among candidates."""
    options = options or FixOptions()
    get(method)  # an unknown method is a user error before any work
    with collected_warnings() as caught:
        job = _start(model_path, options, method)
        job.calib = calib
        if (reason := _nothing_to_do(job)) is None:
            if calib is None:
                raise VsonnxError("fix needs calibration data.", "pass --calib with an image folder, .npy/.npz or "
                                  "FILE.py:FUNC, or use --data-free.")
            if options.choice.val is not None and _same_source(calib, options.choice.val):
                job.report.warnings.append("the validation data is the calibration data: the choice among "
                                           "candidates is biased.")
            source, refit = _calibration_source(job, calib)
            candidates = _calibrated_candidates(job, source, method)
            _finish(job, candidates, source_identity(calib), default=method, expected=job.names,
                    refit=refit)
        elif calib is not None and not job.choosing and (restored := _restored(job, method)) is not None:
            return restored
        else:
            job.report.message = reason
    job.report.warnings += caught
    return job.report


def _open_calibration(job: _Job, calib):
    d = job.options.data
    return open_source(calib, job.model, shuffle=d.shuffle, seed=d.seed, limit=d.limit, preprocess=job.options.preprocess)


def _calibration_source(job: _Job, calib):
    """(the data the candidates are calibrated on, the refit of the chosen one or None): with ``val_split`` the
    part of ``calib`` not held out (the held-out part goes to ``job.val_source``) and a refit on all of it."""
    o = job.options
    source = _open_calibration(job, calib)
    if o.choice.val_split is None:
        return (replayable(source) if job.choosing else source), None
    whole = replayable(source)
    source, job.val_source = split_source(whole, o.choice.val_split, o.data.seed)
    return replayable(source), functools.partial(_refit, job, source=whole)


@dataclass
class CandidateModels:
    """What ``fix --val``/``--val-split`` ranks, as it fits them: the original (inference form), every
    candidate's name and model, the held-out part of the calibration data (``val_split``, else None), the
    batch size the fix runs with, the Dropouts simulated channel-wise in the ensemble and whether every site's
    noise is stochastic depth."""

    original: onnx.ModelProto
    names: list[str]
    models: list[onnx.ModelProto]
    held_out: object
    batch_size: int
    channelwise: frozenset[str]
    stochastic_depth: bool = False


def candidate_models(model_path, calib, options: FixOptions | None = None) -> CandidateModels:
    """Every candidate ``fix_calibrated`` chooses among (vsonnx.choose), calibrated on ``calib`` (less the
    held-out part with ``options.choice.val_split``) exactly as the fix calibrates them; for studying the choice
    (tools/suite.py). A user error when no BN is in scope."""
    options = options or FixOptions()
    job = _start(model_path, options, "batch", every_candidate=True)
    if (reason := _nothing_to_do(job)) is not None:
        raise VsonnxError(reason, "see `vsonnx scan MODEL`.")
    source, _ = _calibration_source(job, calib)
    candidates = [_screened(c, job.names)[0] for c in _calibrated_candidates(job, source, "batch")]
    return CandidateModels(job.model, [c.name for c in candidates], [_with_candidate(job.model, c) for c in candidates],
                           job.val_source, job.options.runtime.batch_size, job.scan.channelwise_dropouts,
                           job.scan.stochastic_depth)


def _with_candidate(model: onnx.ModelProto, candidate: Candidate) -> onnx.ModelProto:
    """``model`` with the candidate's folded-layer corrections and statistics written in."""
    return with_statistics(apply_affine(model, candidate.affine) if candidate.affine else model, candidate.stats)


def _restored(job: _Job, method: str) -> FixReport | None:
    """The fix of the Dropout sites that vsonnx.export recorded in the model's metadata and a tool removed
    since (e.g. onnxslim, which keeps metadata and folds the BNs after them): named-sites correction with
    population semantics (distill with --method distill); None when the metadata restores nothing."""
    from .site_names import restoration_note

    sites, said = restoration_note(job.model, "restored")
    if not sites:
        job.report.warnings += [said] if said else []
        return None
    named = "distill" if method == "distill" else "named_sites"
    report = fix_named_sites(job.given, job.calib, sites, job.options, named)
    if method not in ("population", "distill", "named_sites"):
        said += f" Corrected with population semantics, not {method} (the named-sites correction)."
    report.warnings.insert(0, said)
    return report


def _calibrated_candidates(job: _Job, source, method: str) -> list[Candidate]:
    """``method``'s result, or when choosing every calibrated method with its family (vsonnx.choose)."""
    from .choose import candidate_methods, family

    if not job.choosing:
        return [Candidate(method, (r := REGISTRY[method].run(job.request(source, method))).statistics, r)]
    old = job.index.stored_statistics(job.names)
    candidates = []
    for m in candidate_methods():
        result = REGISTRY[m].run(job.request(source, m))
        candidates += [Candidate(name, stats, result, strength=a) for name, a, stats in family(m, old, result.statistics)]
    return candidates


def _refit(job: _Job, winner: Candidate, source) -> Candidate:
    """The method (and strength a) chosen on the held-out part, run again on all of ``source``."""
    result = REGISTRY[winner.result.method].run(job.request(source, winner.result.method))
    stats = result.statistics
    if winner.strength != 1:
        stats = interpolate(job.index.stored_statistics(list(stats)), stats, winner.strength)
    return replace(winner, stats=stats, result=result)


def fix_data_free(model_path, options: FixOptions | None = None) -> FixReport:
    """Correct the BNs in scope without data: ``synthesized`` (every BN in scope), or with
    ``options.method.synthetic == 0`` ``closed_form`` (the sites only; per-site results reported either way)."""
    options = options or FixOptions()
    _no_split(options, "--data-free")
    method = "synthesized" if options.method.synthetic > 0 else "closed_form"
    with collected_warnings() as caught:
        job = _start(model_path, options, method)
        if (reason := _nothing_to_do(job)) is None:
            closed = REGISTRY["closed_form"].run(job.request())
            result = closed if method == "closed_form" else REGISTRY[method].run(
                job.request(samples=options.method.synthetic, steps=options.method.synthetic_steps))
            job.report.notes = {**site_notes(closed, result, job.index.stored_statistics(list(result.statistics))),
                                **{n: f"refused: {r}" for n, r in job.report.refused.items()}}
            if method == "closed_form" and any(b.downstream_of_site for b in job.scan.batchnorms):
                job.report.warnings.append(
                    "BNs downstream of the corrected sites keep their statistics, which the correction may "
                    "invalidate: check with vsonnx compare (or pass --val), drop --synthetic 0, or fix with --calib.")
            if result.statistics:
                _finish(job, [Candidate("data-free", result.statistics, result)], synthesis_provenance(result),
                        default=None)
            else:
                job.report.message = "no site could be corrected without data (see notes); nothing written."
        else:
            job.report.message = reason
    job.report.warnings += caught
    return job.report


def fix_named_sites(model_path, calib, sites: dict[str, float], options: FixOptions | None = None,
                    method: str = "named_sites") -> FixReport:
    """Exports that removed Dropout: ``sites`` {tensor or node: drop ratio} says where it acted in training;
    BNs there and downstream are re-estimated (``method`` "named_sites") or fitted ("distill"), folded
    Conv/Gemm layers corrected in their weights."""
    from .folding import folded_message
    from .site_names import resolve_sites

    if method not in ("named_sites", "distill"):
        raise VsonnxError(f"--dropout/--sites work with the population or the distill method, not {method}.",
                          "pass --method distill, or leave --method out.")
    options = options or FixOptions()
    _no_split(options, "--dropout/--sites")
    if calib is None:
        raise VsonnxError("--dropout/--sites need calibration data.", "add --calib DATA.")
    with collected_warnings() as caught:
        job = _start(model_path, options, method)
        job.report.warnings = [w for w in job.report.warnings if "no Dropout" not in w and "folded" not in w]
        resolved = resolve_sites(job.model, sites)
        source = _open_calibration(job, calib)
        result = REGISTRY[method].run(job.request(source, method, sites=resolved, scope=options.method.scope))
        affine = result.affine
        job.scan = result.analysis
        job.report.refused.update(result.refused)
        if result.statistics or affine:
            job.report.notes = {name: f"folded BN corrected in the weights, relative to its lost statistics: "
                                      f"scale mean {np.mean(a):.3f}" for name, (a, _) in affine.items()}
            job.report.folded = list(affine)
            if affine:
                job.report.warnings.append(folded_message(list(affine)))
            name = "distill (named dropout sites)" if method == "distill" else "population"
            _finish(job, [Candidate(name, result.statistics, result, affine)], {
                **source_identity(calib), "dropout_sites": json.dumps(resolved),
                "folded_layers_corrected": json.dumps(list(affine))}, default=None)
            job.report.message = (f"{'fitted' if method == 'distill' else 're-estimated'} {len(result.statistics)} "
                                  f"BatchNormalization layer(s) and corrected "
                                  f"{len(affine)} folded weight layer(s) on {result.samples} samples, with dropout at "
                                  f"{len(resolved)} named site(s).")
        else:
            job.report.message = "the named sites reach no BatchNormalization and no folded weight layer: nothing to fix."
    job.report.warnings += caught
    return job.report


def _no_split(options: FixOptions, mode: str) -> None:
    if options.choice.val_split is not None:
        raise VsonnxError(f"--val-split holds out calibration data of a calibrated fix; {mode} does not choose "
                          "among calibrated candidates.", "pass --val DATA instead, or drop --val-split.")


def fix(model_path, calib=None, *, method: str = "batch", data_free: bool = False,
        dropout_sites: dict[str, float] | None = None, **options) -> FixReport:
    """One call for every kind of fix (the README's ``vsonnx.fix``): ``dropout_sites`` -> fix_named_sites,
    ``data_free`` -> fix_data_free, else fix_calibrated with ``method``. ``options``: the flat keywords of
    FixOptions.of (vsonnx.fix_options.KEYWORDS).

    Example:
        report = vsonnx.fix("model.onnx", "data/train", method="population", val="data/val")
    """
    opts = FixOptions.of(**options)
    if dropout_sites:
        return fix_named_sites(model_path, calib, dropout_sites, opts, "distill" if method == "distill" else "named_sites")
    if data_free:
        return fix_data_free(model_path, opts)
    return fix_calibrated(model_path, calib, method, opts)


# --------------------------------------------------------------------------------------------------
# the shared tail: choose -> validate -> write
# --------------------------------------------------------------------------------------------------
def _finish(job: _Job, candidates: list[Candidate], provenance: dict[str, str], default: str | None,
            expected: list[str] = (), refit=None) -> None:
    """Write the chosen candidate (the first one without validation data), or explain why nothing was.
    ``default``: the candidate written under ``force`` when the original wins (None: the first one);
    ``expected``: BNs a candidate must hold statistics for (rule 3 for the others); ``refit``: Candidate ->
    Candidate applied to the chosen one before it is written (--val-split: re-run on all the data)."""
    screened = {c.name: _screened(c, expected) for c in candidates}
    candidates = [c for c, _ in screened.values()]
    report = job.report
    old = job.index.stored_statistics(list(dict.fromkeys(n for c in candidates for n in c.stats)))
    fallback = next((c for c in candidates if c.name == default), candidates[0])
    winner = fallback
    if job.choosing:
        winner = _validate_candidates(job, candidates)
        if winner is None and not job.options.choice.force:
            report.message = ("no candidate beats the original on the validation data: nothing written."
                              if len(candidates) > 1 else
                              "the data-free correction does not beat the original on the validation data: "
                              "nothing written.")
            report.refused.update(screened[fallback.name][1])
            describe(report, fallback.result, fallback.stats, job.scan, old)
            return
        winner = winner or fallback
        if refit is not None:
            chosen_on = winner.result.samples
            winner, refused = _screened(refit(winner), expected)
            screened[winner.name] = (winner, refused)
            report.message = (f"chose {winner.name} on {report.val_samples} held-out samples "
                              f"(candidates calibrated on {chosen_on}), then re-estimated it on all "
                              f"{winner.result.samples} samples.")
    report.refused.update(screened[winner.name][1])
    if not winner.stats and not winner.affine:
        _refuse_all(report.refused)
    fixed = _with_candidate(job.model, winner)
    validate(fixed, job.model)
    written = winner.name if winner.result.method in CALIBRATED else _label(winner)
    given = None if isinstance(job.given, onnx.ModelProto) else job.path
    save_model(fixed, job.out, input_path=given, in_place=job.options.output.in_place, provenance={
        "method": written,
        "samples": str(winner.result.samples), "scope": job.options.method.scope,
        "batch_size": str(job.options.runtime.batch_size), "shuffle": str(job.options.data.shuffle),
        "seed": str(job.options.data.seed),
        **provenance, "old_statistics_sha256": digest({n: old[n] for n in winner.stats}), "version": __version__,
        "recalibrated": json.dumps(list(winner.stats))})
    report.output, report.written, report.chosen, report.method = str(job.out), True, winner.name, written
    report.message = report.message or written_message(winner.result, len(winner.stats))
    describe(report, winner.result, winner.stats, job.scan, old)


def _screened(candidate: Candidate, expected: list[str] = ()) -> tuple[Candidate, dict[str, str]]:
    """The candidate without the statistics that must never be written (rewrite rules 5 and 6), and why;
    BNs of ``expected`` it has no statistics for are refused by rule 3."""
    bad = {n: reason for n, s in candidate.stats.items() if (reason := invalid_statistics(s))}
    bad.update({n: "3: no statistics were measured for it (see the notes)" for n in expected if n not in candidate.stats})
    return replace(candidate, stats={n: s for n, s in candidate.stats.items() if n not in bad}), bad


def _validate_candidates(job: _Job, candidates: list[Candidate]) -> Candidate | None:
    """Rank the original and every candidate on the validation data (vsonnx.choose); the best candidate, or
    None when the original is at least as good. With labels, the label-free choice on the same images is the
    prior that labels must beat."""
    from .choose import choose

    o = job.options
    source = job.val_source or open_source(o.choice.val, job.model, shuffle=True, seed=0, limit=o.choice.val_limit,
                                           preprocess=o.preprocess)
    models = [_with_candidate(job.model, c) for c in candidates]
    names = [c.name for c in candidates]
    distill = {**REGISTRY["distill"].settings, **o.method.settings.get("distill", {})}
    r = o.runtime
    chosen = choose(job.model, models, names, source, label_free=o.choice.val_split is not None,
                    masks=o.choice.val_masks, seed=o.data.seed, channelwise=job.scan.channelwise_dropouts,
                    stochastic_depth=job.scan.stochastic_depth,
                    scores=(distill["scores"], distill["loss"]), batch_size=r.batch_size, device=r.device,
                    threads=r.threads, progress=r.progress)
    ranking, unlabelled = chosen.ranking, chosen.unlabelled
    job.report.criterion = ranking.criterion
    job.report.candidates = [
        {"name": name, "val_top1": float(ranking.scores[k]) if ranking.criterion == "top1" else None,
         "val_ensemble": float(unlabelled.scores[k])} for k, name in enumerate(["original", *names])]
    for c, score in zip(candidates, ranking.scores[1:]):
        c.score = score
    job.report.val_samples = ranking.samples
    job.report.evidence = chosen.evidence(names)
    job.report.warnings += [chosen.why] if chosen.why else []
    return None if chosen.index is None else candidates[chosen.index]


def _label(candidate: Candidate) -> str:
    """The registry label of the method behind ``candidate``."""
    return REGISTRY[candidate.result.method].label


def _same_source(a, b) -> bool:
    """Whether two data sources are one file or folder (a Source object passed from Python is itself)."""
    if not all(isinstance(x, (str, os.PathLike)) for x in (a, b)):
        return a is b
    try:
        return same_file(a, b)
    except OSError:
        return str(a) == str(b)
