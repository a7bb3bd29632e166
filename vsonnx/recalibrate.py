"""`vsonnx fix`: re-estimate the statistics of the variance-shift BNs and rewrite only those constants.

The pass follows find / check / apply:
- find: ``targets(report, scope)`` = the sites and every BN downstream of one (``scope="sites"``), or every
  BN (``scope="all"``), from the same site finder ``vsonnx scan`` uses;
- check: ``refusal(index, node)`` returns None or why a BN cannot be rewritten:
  1. its running mean/var are not initializers  2. it is in training mode  3. no statistics were measured;
- apply: ``RecalibrateBatchNorm.apply`` writes new mean/var into the BN's initializers (an initializer shared
  with another node is copied first, never edited in place) and returns whether anything changed, so a
  second application of the same statistics changes nothing.

With validation data (``val``) every candidate (original, batch, population, relative and half-way corrections
between the old and new statistics) is evaluated and the best one is written; nothing is written when no
candidate beats the original, unless ``force``.

Two other sources of new statistics share the same apply step: ``data_free`` (vsonnx.synthesize: inputs
synthesised from the BN statistics, every BN in scope; with ``synthetic=0`` vsonnx.datafree: the paper's
formulas on the constants, sites only) and ``dropout_sites`` (vsonnx.stripped: exports that removed Dropout,
possibly folding BN into Conv/Gemm weights, which then get an affine correction instead).
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from . import __version__
from .calibrate import METHODS, BnStatistics, CalibrationResult, calibrate, stored_statistics
from .data import ReplaySource, open_source
from .errors import VsonnxError
from .graph import GraphIndex
from .model import check_output_path, load_model, save_model, same_file
from .runtime import make_session
from .sites import BatchNormInfo, find_sites
from .synthesize import DEFAULT_SAMPLES, DEFAULT_STEPS

SCOPES = ("sites", "all")
PARTIAL = 0.5  # weight of the new statistics in the half-way candidates


def targets(batchnorms: list[BatchNormInfo], scope: str) -> list[BatchNormInfo]:
    if scope not in SCOPES:
        raise VsonnxError(f"unknown scope '{scope}'.", "use sites or all.")
    return [b for b in batchnorms if scope == "all" or b.site or b.downstream_of_site]


def refusal(index: GraphIndex, node: onnx.NodeProto, info: BatchNormInfo) -> str | None:
    """Why this BN cannot be rewritten (None when it can)."""
    if len(node.input) < 5 or not all(n in index.initializers for n in node.input[3:5]):
        return "1: running mean/var are not initializers"
    if info.training_mode:
        return "2: BatchNormalization is in training mode"
    return None


class RecalibrateBatchNorm:
    """Replace a BN's running statistics with re-estimated ones (new_mean, new_var from calibrate)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model

    def apply(self, name: str, stats: BnStatistics | None) -> bool:
        if stats is None:
            raise VsonnxError(f"no statistics were measured for '{name}' (refusal 3).",
                              "calibrate it (it must be in the chosen scope).")
        index = GraphIndex(self.model)
        node = next(n for n in self.model.graph.node if index.node_name(n) == name)
        changed = False
        for slot, value in ((3, stats.mean), (4, stats.var)):
            tensor = index.initializers[node.input[slot]]
            old = numpy_helper.to_array(tensor)
            new = np.asarray(value, dtype=old.dtype).reshape(old.shape)
            if np.array_equal(old, new):
                continue
            users = sum(list(n.input).count(tensor.name) for n in self.model.graph.node)
            if users > 1:  # shared: give this BN its own copy
                tensor = self._copy(tensor, f"{tensor.name}__vsonnx_{slot}_{len(self.model.graph.initializer)}")
                node.input[slot] = tensor.name
            tensor.CopyFrom(numpy_helper.from_array(new, tensor.name))
            changed = True
        return changed

    def _copy(self, tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
        new = self.model.graph.initializer.add()
        new.CopyFrom(tensor)
        new.name = name
        return new


def with_statistics(model: onnx.ModelProto, stats: dict[str, BnStatistics]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rewrite = RecalibrateBatchNorm(out)
    for name, st in stats.items():
        rewrite.apply(name, st)
    return out


def blend(old: dict[str, BnStatistics], new: dict[str, BnStatistics], weight: float) -> dict[str, BnStatistics]:
    """Statistics a fraction ``weight`` of the way from old to new (a partial correction)."""
    return {n: BnStatistics(n, old[n].mean + weight * (s.mean - old[n].mean),
                            old[n].var + weight * (s.var - old[n].var), s.count) for n, s in new.items()}


def digest(stats: dict[str, BnStatistics]) -> str:
    h = hashlib.sha256()
    for name in sorted(stats):
        h.update(name.encode())
        h.update(np.asarray(stats[name].mean, np.float32).tobytes())
        h.update(np.asarray(stats[name].var, np.float32).tobytes())
    return h.hexdigest()[:16]


@dataclass
class Candidate:
    name: str
    stats: dict[str, BnStatistics]
    top1: float | None = None


@dataclass
class FixReport:
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

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def default_output(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + ".fixed.onnx")


def fix(model_path, calib, *, output=None, method: str = "batch", scope: str = "sites", batch_size: int = 128,
        device: str = "auto", threads: int | None = None, limit: int | None = None, shuffle: bool = True,
        seed: int = 0, preprocess: dict | None = None, val=None, val_limit: int | None = None,
        force: bool = False, in_place: bool = False, progress: bool = False, data_free: bool = False,
        synthetic: int = DEFAULT_SAMPLES, synthetic_steps: int = DEFAULT_STEPS,
        dropout_sites: dict[str, float] | None = None) -> FixReport:
    """Re-estimate the statistics of the variance-shift BNs of ``model_path`` on ``calib`` and write the
    fixed model (default ``MODEL.fixed.onnx``). See the module docstring for candidates under ``val``."""
    model_path = Path(model_path)
    model = load_model(model_path)
    out_path = check_output_path(output or default_output(model_path), model_path, in_place)
    if dropout_sites:
        if calib is None:
            raise VsonnxError("--dropout/--sites need calibration data.", "add --calib DATA.")
        source = open_source(calib, model, shuffle=shuffle, seed=seed, limit=limit, preprocess=preprocess)
        return _fix_stripped(model, model_path, out_path, source, dropout_sites, scope, batch_size, device, threads,
                             progress, in_place, str(calib))
    report = find_sites(model, str(model_path))
    base = FixReport(str(model_path), method, 0, None, False, "", warnings=list(report.warnings))
    if not report.batchnorms:
        base.message = "the model has no BatchNormalization: nothing to fix."
        return base
    chosen = targets(report.batchnorms, scope)
    if not chosen:
        base.message = ("no Dropout->BatchNormalization site: nothing to fix (if the export removed Dropout, "
                        "name where it acted with --dropout TENSOR=RATIO; --all re-estimates every BN anyway).")
        return base
    index = GraphIndex(model)
    nodes = {index.node_name(n): n for n in model.graph.node if n.op_type == "BatchNormalization"}
    for b in chosen:
        reason = refusal(index, nodes[b.name], b)
        if reason:
            base.refused[b.name] = reason
    names = [b.name for b in chosen if b.name not in base.refused]
    if not names:
        base.message = "every BN in scope was refused; see 'refused'."
        return base
    if data_free:
        def checker(candidates):
            from .accuracy import evaluate_candidates

            return evaluate_candidates(model, candidates, val, batch_size=batch_size, device=device,
                                       threads=threads, limit=val_limit, preprocess=preprocess)
        synthesis = None
        if synthetic > 0:
            from .synthesize import synthetic_statistics

            synthesis = functools.partial(synthetic_statistics, model, names, samples=synthetic, steps=synthetic_steps,
                                          seed=seed, device=device, progress=progress,
                                          channelwise=frozenset(d.name for d in report.dropouts if d.channelwise))
        return _fix_data_free(model, model_path, out_path, report, base, in_place,
                              checker if val is not None else None, force, synthesis)
    if calib is None:
        raise VsonnxError("fix needs calibration data.",
                          "pass --calib with an image folder, .npy/.npz or FILE.py:FUNC, or use --data-free.")
    if val is not None and same_source(calib, val):
        base.warnings.append("the validation data is the calibration data: the choice among candidates is biased.")

    source = ReplaySource(open_source(calib, model, shuffle=shuffle, seed=seed, limit=limit, preprocess=preprocess))
    methods = [method] if val is None else list(METHODS)
    results: dict[str, CalibrationResult] = {}
    for m in methods:
        results[m] = calibrate(model, source, names, method=m, batch_size=batch_size, device=device,
                               threads=threads, progress=progress)
    main_result = results[method]
    old = stored_statistics(model, names)
    candidates = [Candidate(m, r.statistics) for m, r in results.items()]
    if val is not None:
        from .accuracy import evaluate_candidates

        candidates += [Candidate(f"{m} x{PARTIAL:g}", blend(old, r.statistics, PARTIAL)) for m, r in results.items()]
        candidates.insert(0, Candidate("original", {}))
        scores = evaluate_candidates(model, [with_statistics(model, c.stats) for c in candidates], val,
                                     batch_size=batch_size, device=device, threads=threads, limit=val_limit,
                                     preprocess=preprocess)
        for c, top1 in zip(candidates, scores):
            c.top1 = top1
        base.candidates = [{"name": c.name, "val_top1": c.top1} for c in candidates]
        best = max(candidates, key=lambda c: (c.top1, c.name != "original"))
        if best.name == "original" and not force:
            base.message = "no candidate beats the original on the validation data: nothing written."
            _fill_rows(base, report, old, main_result.statistics)
            base.samples, base.provider, base.seconds = main_result.samples, main_result.provider, main_result.seconds
            return base
        winner = best if best.name != "original" else next(c for c in candidates if c.name == method)
    else:
        winner = candidates[0]
    fixed = with_statistics(model, winner.stats)
    validate(fixed)
    provenance = {
        "method": winner.name, "samples": str(main_result.samples), "calibration_source": str(calib),
        "scope": scope, "batch_size": str(batch_size), "shuffle": str(shuffle), "seed": str(seed),
        "old_statistics_sha256": digest(old), "version": __version__,
        "recalibrated": json.dumps(names),
    }
    save_model(fixed, out_path, input_path=model_path, in_place=in_place, provenance=provenance)
    base.method, base.samples, base.output, base.written = method, main_result.samples, str(out_path), True
    base.chosen, base.provider, base.seconds, base.passes = winner.name, main_result.provider, main_result.seconds, main_result.passes
    base.warnings += main_result.notes
    base.message = f"re-estimated {len(names)} BatchNormalization layer(s) on {main_result.samples} samples."
    _fill_rows(base, report, old, winner.stats)
    return base


def _fix_data_free(model, model_path, out_path, report, base: FixReport, in_place: bool, checker, force: bool,
                   synthesis) -> FixReport:
    """``synthesis`` (vsonnx.synthesize.synthetic_statistics with its arguments bound) corrects every BN in
    scope from synthetic inputs; None: the closed-form site formulas of vsonnx.datafree, whose per-site
    result is reported either way. ``checker`` (with --val) scores [original, corrected] on validation
    data; nothing is written when the correction is worse, unless ``force``."""
    from .datafree import data_free_statistics

    closed_form = data_free_statistics(model, report)
    base.method = "data-free"
    base.notes = dict(closed_form.notes)
    provenance = {"method": "data-free", "samples": "0"}
    if synthesis is not None:
        result = synthesis()
        statistics = result.statistics
        base.method, base.samples, base.seconds, base.provider = "data-free (synthetic)", 0, result.seconds, \
            f"torch {result.device}"
        provenance.update({"method": "data-free (synthetic inputs)", "synthetic_samples": str(result.samples),
                           "synthetic_steps": str(result.steps), "synthesis_loss": f"{result.loss_first:.4g} -> "
                           f"{result.loss_last:.4g}", "seed": str(synthesis.keywords["seed"])})
        what = f"corrected {len(statistics)} BatchNormalization layer(s) from {result.samples} synthetic inputs " \
               f"({result.steps} steps, statistics-matching loss {result.loss_first:.3g} -> {result.loss_last:.3g})."
    else:
        statistics = closed_form.statistics
        if any(b.downstream_of_site for b in report.batchnorms):
            base.warnings.append("BNs downstream of the corrected sites keep their statistics, which the "
                                 "correction may invalidate: check with vsonnx compare (or pass --val), drop "
                                 "--synthetic 0, or fix with --calib.")
        skipped = len(closed_form.notes) - len(statistics)
        what = (f"corrected {len(statistics)} site(s) without data"
                + (f", left {skipped} unchanged" if skipped else "") + "; downstream BNs unchanged.")
    if not statistics:
        base.message = "no site could be corrected without data (see notes); nothing written."
        return base
    old = stored_statistics(model, list(statistics))
    if synthesis is not None:
        def var_ratio(stats: BnStatistics) -> str:
            return f"median var x{float(np.median(stats.var / np.maximum(old[stats.name].var, 1e-30))):.3f}"

        for name in base.notes:  # the sites: both estimates side by side
            formula = closed_form.statistics.get(name)
            base.notes[name] = f"synthetic: {var_ratio(statistics[name])}" + (
                f"; closed form: {var_ratio(formula)}" if formula is not None else f"; closed form: {base.notes[name]}")
    fixed = with_statistics(model, statistics)
    if checker is not None:
        scores = checker([model, fixed])
        base.candidates = [{"name": "original", "val_top1": scores[0]}, {"name": "data-free", "val_top1": scores[1]}]
        _fill_rows(base, report, old, statistics)
        if scores[1] <= scores[0] and not force:
            base.message = "the data-free correction does not beat the original on the validation data: nothing written."
            return base
    validate(fixed)
    provenance.update({"old_statistics_sha256": digest(old), "version": __version__,
                       "recalibrated": json.dumps(list(statistics))})
    save_model(fixed, out_path, input_path=model_path, in_place=in_place, provenance=provenance)
    base.output, base.written, base.chosen = str(out_path), True, "data-free"
    base.message = what
    _fill_rows(base, report, old, statistics)
    return base


def _fix_stripped(model, model_path, out_path, source, named, scope, batch_size, device, threads, progress,
                  in_place, calib_name) -> FixReport:
    from .stripped import correct_stripped, resolve_sites

    sites = resolve_sites(model, named)
    corrected, stats, affine, report, samples = correct_stripped(
        model, source, sites, scope=scope, batch_size=batch_size, device=device, threads=threads, progress=progress)
    base = FixReport(str(model_path), "population", samples, None, False, "")
    base.warnings = [w for w in report.warnings if "no Dropout" not in w and "folded" not in w]
    if corrected is None:
        base.message = "the named sites reach no BatchNormalization and no folded weight layer: nothing to fix."
        return base
    old = stored_statistics(model, list(stats))
    fixed = with_statistics(corrected, stats)
    validate(fixed)
    save_model(fixed, out_path, input_path=model_path, in_place=in_place, provenance={
        "method": "population (named dropout sites)", "samples": str(samples), "calibration_source": calib_name,
        "dropout_sites": json.dumps(sites), "old_statistics_sha256": digest(old), "version": __version__,
        "recalibrated": json.dumps(list(stats)), "folded_layers_corrected": json.dumps(list(affine))})
    base.output, base.written, base.chosen = str(out_path), True, "population"
    base.notes = {name: f"folded BN corrected in the weights: scale mean {np.mean(a):.3f}"
                  for name, (a, _) in affine.items()}
    base.message = (f"re-estimated {len(stats)} BatchNormalization layer(s) and corrected {len(affine)} folded "
                    f"weight layer(s) on {samples} samples, with dropout at {len(sites)} named site(s).")
    _fill_rows(base, report, old, stats)
    return base


def _fill_rows(base: FixReport, report, old, new) -> None:
    kinds = {b.name: (b.path or "downstream") if b.site else "downstream" for b in report.batchnorms}
    base.batchnorms = [
        {"name": n, "site": kinds.get(n), "old_mean": old[n].mean.tolist(), "old_var": old[n].var.tolist(),
         "new_mean": np.asarray(s.mean).tolist(), "new_var": np.asarray(s.var).tolist()}
        for n, s in new.items()
    ]


def same_source(a, b) -> bool:
    try:
        return same_file(a, b)
    except OSError:
        return str(a) == str(b)


def validate(model: onnx.ModelProto) -> None:
    """The onnx checker and an onnxruntime session must both accept the model before it is written."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise RuntimeError(f"vsonnx produced an invalid model (bug): {exc}") from None
    make_session(model, device="cpu", optimize=False)
