"""`vsonnx scan`: what a model holds and, with data, how big its variance shift is (DESIGN 2, Fig. 1).

``scan`` (no data): the sites of vsonnx.sites, per BN what `fix` would do or why it refuses (the same
check as the rewrite pass, vsonnx.rewrite.plan) and, per site, what the data-free formulas would do.

``measure_shift`` (`scan --calib`):

One pass over calibration data with the model as deployed (dropout off, every BN with its stored
statistics) measures, per BN and channel, the real mean and variance of its input and, for every Dropout
that reaches a site, E[x^2] of the dropout's input. Per BN (means over channels):

- real_var_ratio = real_var / moving_var;
- shift_metric = max(real_var / moving_var, moving_var / real_var), the paper's Fig. 1 quantity;
- mean_shift = |real_mean - moving_mean| / sqrt(moving_var).

Prediction for a site whose dropout paths are all *additive* (at most one weight layer and sums on the way):
the dropout noise is zero-mean given x, so at training time the BN input had variance
Var_train = Var_test + noise, the noise of vsonnx.noise (its formulas, and the cases it refuses) from the
measured E[x^2]. The predicted Var_test/Var_train is real_var / (real_var + noise), compared with the measured
real_var / moving_var; null where vsonnx.noise refuses.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import data_contract, open_source, resolve_batch_size
from .settings import check_settings
from .graph import GraphIndex, tensor_shapes
from .runtime import measure_moments
from .taps import bn_tap, tensor_tap
from .working_copy import working_copy
from .model import atomic_write, check_output_path, fixed_with, input_model
from .noise import noise_variance
from .errors import VsonnxError
from .rewrite import inference_form, plan
from .sites import ScanReport, find_sites


def scan(model, model_name: str | None = None, scope: str = "sites") -> ScanReport:
    """Public entry: ``model`` is a path or an onnx.ModelProto. Each BN says what `fix` would do with it
    (``fix``: 'recalibrate', 'unchanged' (out of scope) or 'refused: <reason>'), each site whether
    `fix --data-free --synthetic 0` can correct it (``data_free``: what it would do, or why not)."""
    from .methods.closed_form import data_free_statistics
    from .site_names import restoration_note, site_names

    proto, name = input_model(model, runtime=False)
    report = find_sites(proto, model_name or name)
    try:  # fix first turns a training-mode export into inference form
        converted, changed = inference_form(proto)
    except VsonnxError:
        converted, changed = proto, []
    decisions = {d.name: d for d in plan(converted, find_sites(converted) if changed else report, scope)}
    for b in report.batchnorms:
        d = decisions.get(b.name)
        b.fix = "unchanged" if d is None else ("recalibrate" if d.refusal is None else f"refused: {d.refusal}")
    report.subgraph_fix = {n: f"refused: {decisions[n].refusal}" for n in report.subgraph_batchnorms}
    notes = data_free_statistics(proto, report).notes if report.sites else {}
    for b in report.sites:
        b.data_free = notes.get(b.name)
    report.names = site_names(proto)
    report.data = data_contract(proto)
    if (done := fixed_with(proto)) is not None:
        report.warnings.append(f"this model was written by vsonnx fix ({done}): its BN "
                               "statistics are corrected already; fix refuses to correct them twice (batch and "
                               "population may re-estimate them).")
    _, said = restoration_note(proto, "`fix --calib DATA` restores")
    if said:
        report.warnings.append(said)
    return report


def scan_models(models: list, *, named: dict[str, float] | None = None, calib=None, **measure) -> list[ScanReport]:
    """`vsonnx scan` of several models: ``named`` dropout sites are inserted first (exports that removed
    Dropout; vsonnx.site_names), ``calib`` data measures the shift (``measure``: measure_shift's options)."""
    from .site_names import with_named_sites

    reports = []
    for model in models:
        target, notes = (model, []) if not named else with_named_sites(model, named)
        report = scan(target, str(model)) if calib is None else measure_shift(target, calib, model_name=str(model),
                                                                              **measure)
        report.warnings[:0] = notes
        reports.append(report)
    return reports


def measure_shift(model, calib, *, limit: int | None = 5000, shuffle: bool = True, seed: int = 0,
                  preprocess: dict | None = None, batch_size: int | None = None, device: str = "auto",
                  threads: int | None = None, progress: bool = False, model_name: str | None = None) -> ScanReport:
    """``find_sites`` plus measured and predicted shift per BN (fields set on each BatchNormInfo)."""
    proto, name = input_model(model)
    name = model_name or name
    check_settings(batch_size=batch_size, seed=seed, threads=threads)
    batch_size = resolve_batch_size(proto, batch_size)
    report = scan(proto, name)
    if not report.batchnorms:
        return report
    index = GraphIndex(proto)
    shapes = tensor_shapes(working_copy(proto))
    bn_nodes = index.batchnorms()
    taps = {f"bn:{b.name}": bn_tap(index, bn_nodes[b.name], shapes) for b in report.batchnorms}
    reaching = {d.name: d for b in report.sites for d in b.dropouts}
    for d, info in reaching.items():
        tap = tensor_tap(info.acts_on, shapes)
        if tap is not None:
            taps[f"drop:{d}"] = tap
    source = open_source(calib, proto, shuffle=shuffle, seed=seed, limit=limit, preprocess=preprocess)
    moments, samples, _, provider = measure_moments(proto, source, taps, batch_size=batch_size, device=device,
                                                     threads=threads, progress=progress, label="measuring shift")
    second = {k[5:]: m.var + m.mean ** 2 for k, m in moments.items() if k.startswith("drop:")}
    dropouts = {d.name: d for d in report.dropouts}
    for b in report.batchnorms:
        node = bn_nodes[b.name]
        moving_mean = np.asarray(index.constant(node.input[3]), np.float64).reshape(-1)
        moving_var = np.asarray(index.constant(node.input[4]), np.float64).reshape(-1)
        real = moments[f"bn:{b.name}"]
        ok = moving_var > 0
        ratio = real.var[ok] / moving_var[ok]
        b.real_var_ratio = _mean(ratio)
        b.shift_metric = _mean(np.maximum(ratio, 1 / np.maximum(ratio, 1e-12)))
        b.mean_shift = _mean(np.abs(real.mean[ok] - moving_mean[ok]) / np.sqrt(moving_var[ok]))
        if b.site:
            noise, _ = noise_variance(index, b, dropouts, shapes, lambda d: second.get(d.name))
            b.predicted_var_ratio = None if noise is None else _mean(real.var / np.maximum(real.var + noise, 1e-30))
            b.prediction_error = (None if b.predicted_var_ratio is None or not b.real_var_ratio else
                                  round(abs(b.predicted_var_ratio - b.real_var_ratio) / b.real_var_ratio, 6))
    report.calibration = {"source": str(calib), "samples": samples, "provider": provider}
    return report


def _mean(values: np.ndarray) -> float | None:
    return round(float(np.mean(values)), 6) if values.size else None


def median_prediction_error(report: ScanReport) -> float | None:
    errors = [b.prediction_error for b in report.sites if getattr(b, "prediction_error", None) is not None]
    return float(np.median(errors)) if errors else None


def plot_shift(reports: list[ScanReport], path: str | Path, labels: list[str] | None = None) -> Path:
    """A PNG like the paper's Fig. 1: shift metric against BN index, sites marked, one line per report."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import VsonnxError

        raise VsonnxError("--plot needs matplotlib.", "pip install 'vsonnx[plot]' (or matplotlib).") from None
    fig, ax = plt.subplots(figsize=(8, 4))
    for k, report in enumerate(reports):
        label = labels[k] if labels else Path(report.model).name
        ys = [b.shift_metric for b in report.batchnorms]
        xs = list(range(len(ys)))
        line, = ax.plot(xs, ys, marker=".", label=label)
        sx = [i for i, b in enumerate(report.batchnorms) if b.site]
        ax.scatter(sx, [ys[i] for i in sx], s=60, facecolors="none", edgecolors=line.get_color())
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("BatchNormalization layer index (circles: Dropout->BN sites)")
    ax.set_ylabel("max(real/moving, moving/real) variance")
    ax.set_title("Variance shift per BN layer (model as deployed, dropout off)")
    ax.legend()
    fig.tight_layout()
    try:
        return atomic_write(check_output_path(path, None, False, "--plot"),
                            lambda tmp: fig.savefig(tmp, dpi=120, format="png"), option="--plot")
    finally:
        plt.close(fig)
