"""``named_sites``: population statistics for exports that removed Dropout (and maybe folded BN), with
dropout re-inserted where the user named it (vsonnx.site_names resolves the names).

Population semantics, exact at test time, level by level like ``population``:
- a BN still in the graph at a site or downstream of one gets the test-time mean/variance of its input;
- a weight layer downstream of a site that looks folded (vsonnx.folding: its output meets a nonlinearity
  before any normalisation, the BN that followed it was folded in) gets a per-output-channel affine
  correction y' = a*y + b, a = sqrt(Var_train(y) / Var_test(y)), b = E_train(y) - a*E_test(y): the test-time
  output moments (dropout off, upstream corrected) matched to the training-time ones (measured once with the
  dropouts simulated in training mode, seeded, original constants; a site inside a fold gets its dropout
  between the product and the bias). That is what re-estimating the folded BN would have done where its
  stored statistics were the dropout-on statistics of this data (vsonnx.folding.folded_message). The
  correction is written into the weight and bias (no new nodes).
``request.options['sites']``: {tensor: ratio} (resolved names). The Estimate's ``affine`` holds the
folded-layer corrections {layer: (a, b)}, ``analysis`` the scan report of the analysis copy, ``refused`` the
BNs in scope that the rewrite pass refuses (vsonnx.rewrite, not estimated). Refuses MatMul folded layers (no
bias input to carry b).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx

from ..data import replayable
from ..graph import GraphIndex, tensor_shapes
from ..runtime import measure_moments
from ..simulate import insert_dropouts
from ..taps import bn_tap, tensor_tap
from ..working_copy import working_copy
from .population import measure_levels
from ..folding import folded_layers, inside_folded
from ..rewrite import apply_affine, plan
from ..sites import find_sites
from ..stats import BnStatistics, Estimate
from . import EstimateRequest


def _training_moments(request: EstimateRequest, source, folded: list[str], index: GraphIndex, shapes) -> dict:
    """Output moments of the folded layers with the dropouts simulated in training mode (original constants)."""
    simulated = training_copy(request.model, request.options["sites"])
    taps = {f: tensor_tap(index.by_name[f].output[0], shapes) for f in folded}
    moments, *_ = measure_moments(simulated, source, taps, batch_size=request.batch_size, device=request.device,
                                  threads=request.threads, progress=request.progress,
                                  label="simulating training (dropout on)", keep_dropout_modes=True)
    return moments


def analyse(request: EstimateRequest, method: str) -> tuple[onnx.ModelProto, list[str], list[str], Estimate]:
    """The analysis copy (Dropout inserted at the named sites, off), the BNs in scope that the rewrite
    accepts, the folded layers to correct, and an empty Estimate of ``method`` carrying the
    ``analysis`` report and the ``refused`` BNs."""
    sites = request.options["sites"]
    analysis = insert_dropouts(request.model, sites, training=False)
    report = find_sites(analysis)
    decisions = plan(analysis, report, request.options.get("scope", "sites"))
    bns = [d.name for d in decisions if d.refusal is None]
    empty = Estimate(method, 0, 0, {}, 0, 0.0, "", analysis=report,
                     refused={d.name: d.refusal for d in decisions if d.refusal})
    return analysis, bns, folded_layers(analysis, sites), empty


def training_copy(model: onnx.ModelProto, sites: dict[str, float]) -> onnx.ModelProto:
    """``model`` with Dropout in training mode at the named sites (inside a fold: before the bias)."""
    return insert_dropouts(model, sites, training=True, before_bias=inside_folded(model, sites))


def estimate(request: EstimateRequest) -> Estimate:
    source = replayable(request.source)
    analysis, bns, folded, result = analyse(request, "named_sites")
    if not bns and not folded:
        return result
    index = GraphIndex(analysis)
    shapes = tensor_shapes(working_copy(analysis))
    train_moments = _training_moments(request, source, folded, index, shapes) if folded else {}
    levels = index.levels(bns + folded)
    stats: dict[str, BnStatistics] = {}
    affine = result.affine
    samples = batches = 0
    provider = ""

    def tap_of(t):
        return bn_tap(index, index.by_name[t], shapes) if t in bns else tensor_tap(index.by_name[t].output[0], shapes)

    for moments, samples, batches, provider in measure_levels(request, source, levels, tap_of,
                                                              lambda: apply_affine(analysis, affine), stats,
                                                              "calibrating"):
        for t, m in moments.items():
            if t in bns:
                stats[t] = BnStatistics(t, m.mean, m.var, m.count, m.count)
            else:
                a = np.sqrt(train_moments[t].var / np.maximum(m.var, 1e-12))
                affine[t] = (a, train_moments[t].mean - a * m.mean)
    return replace(result, samples=samples, batches=batches, statistics=stats,
                   passes=len(set(levels.values())) + bool(folded), provider=provider)
