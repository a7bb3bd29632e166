"""Plain-text rendering of reports (the JSON form is each report's ``to_dict``)."""
from __future__ import annotations


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A fixed-width text table; ``align`` is one 'l'/'r' per column (default: left)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" * len(headers)
    lines = []
    for k, row in enumerate(cells):
        parts = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align)]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_scan(report) -> str:
    measured = report.calibration is not None
    rows = []
    for i, b in enumerate(report.batchnorms):
        drops = ", ".join(f"{d.name}({fmt(d.ratio, 2)}{', ' + d.noise if d.noise != 'element' else ''})"
                      for d in b.dropouts)
        weight = f"{b.weight.op} d={b.weight.fan_in} cos2={fmt(b.weight.cos2)}" if b.weight else ""
        status = "SITE" if b.site else ("downstream" if b.downstream_of_site else "")
        row = [i, b.name, b.channels, status, b.path or "", drops, weight, b.fix or ""]
        if measured:
            row += [fmt(b.real_var_ratio), fmt(b.shift_metric), fmt(b.mean_shift)]
        rows.append(row + [fmt(b.predicted_var_ratio)] + ([fmt(b.prediction_error)] if measured else []))
    out = [f"model: {report.model}", *_data_lines(report.data)]
    if measured:
        c = report.calibration
        out.append(f"measured on {c['samples']} samples of {c['source']} ({c['provider']}); real = variance of the "
                   "BN input as deployed, moving = stored running variance")
    if rows:
        headers = ["#", "batchnorm", "C", "status", "path", "dropouts (ratio)", "weight layer", "fix would"]
        if measured:
            headers += ["real/moving", "shift", "mean shift"]
        headers += ["pred. Var_test/Var_train"] + (["rel. error"] if measured else [])
        out.append(table(headers, rows, "rlllllll" + "r" * (len(headers) - 8)))
    n_sites = len(report.sites)
    n_down = sum(1 for b in report.batchnorms if b.downstream_of_site and not b.site)
    out.append(f"{len(report.batchnorms)} BatchNormalization, {len(report.dropouts)} Dropout, "
               f"{n_sites} variance-shift site(s), {n_down} more BN downstream of a site.")
    if report.folded_batchnorms:
        out.append(table(["folded BN (module)", "into layer", "layer module"],
                         [[f["batchnorm"] or "?", f["layer"], f["layer_module"] or "?"] for f in report.folded_batchnorms],
                         "lll"))
    if report.names and not report.sites:  # the export erased the sites: the names --dropout accepts
        out.append(table(["name for --dropout NAME=RATIO", "where the dropout would act"],
                         [[k, v] for k, v in report.names.items()], "ll"))
    if report.subgraph_batchnorms:
        out.append(table(["BN inside an If/Loop/Scan subgraph", "fix would"],
                         [[n, report.subgraph_fix.get(n, "-")] for n in report.subgraph_batchnorms], "ll"))
    if measured:
        from .measure import median_prediction_error

        median = median_prediction_error(report)
        if median is not None:
            n = sum(b.prediction_error is not None for b in report.sites)
            out.append(f"prediction vs measurement over {n} site(s): median relative error {median:.3f}")
    data_free = [f"  {b.name}: {b.data_free}" for b in report.sites if b.data_free]
    if data_free:
        out.append("without data, closed form (fix --data-free --synthetic 0; plain --data-free synthesises inputs "
                   "and corrects the downstream BNs too):")
        out += data_free
    out += [f"warning: {w}" for w in report.warnings]
    return "\n".join(out)


def _data_lines(data: dict) -> list[str]:
    """The model's inputs, its preprocessing metadata and class names, or what to pass where it has none."""
    if not data:
        return []
    lines = [f"input '{i['name']}': {' x '.join(str(d or 'N') for d in i['shape']) if i['shape'] else '?'} "
             f"{i['dtype']}" for i in data["inputs"]]
    meta = data["preprocess"]
    if meta == "malformed":
        lines.append("image preprocessing: the vsonnx.preprocess metadata is not a JSON object (commands that read "
                     "images refuse it)")
    elif meta:
        lines.append("image preprocessing (vsonnx.preprocess metadata): "
                     + ", ".join(f"{k} {v}" for k, v in sorted(meta.items())))
    else:
        lines.append("image preprocessing: no vsonnx.preprocess metadata; images need --mean/--std (else pixels are "
                     "only scaled by 1/255) and --size where the input size is not static")
    names = data["class_names"]
    if names:
        lines.append(f"{len(names)} class names (vsonnx.class_names): {', '.join(names[:5])}"
                     + (", ..." if len(names) > 5 else ""))
    return lines


def _mean_ratio(new, old) -> float | None:
    import numpy as np

    old = np.asarray(old, dtype=float)
    new = np.asarray(new, dtype=float)
    ok = old > 0
    return float((new[ok] / old[ok]).mean()) if ok.any() else None


def render_fix(report) -> str:
    out = []
    if report.batchnorms:
        rows = [[b["name"], b["site"], fmt(_mean_ratio(b["new_var"], b["old_var"]))] for b in report.batchnorms]
        out.append(table(["batchnorm", "site", "new/old variance (mean over channels)"], rows, "llr"))
    for name, reason in report.refused.items():
        out.append(f"refused {name}: {reason}")
    for name, note in report.notes.items():
        out.append(f"{name}: {note}")
    if report.candidates:
        key, header, digits = (("val_top1", "val top-1 %", 2) if report.criterion == "top1" else
                               ("val_ensemble", "share disagreeing with the dropout ensemble's classes (lower "
                                "is better)" if report.criterion == "ensemble_disagreement" else
                                "distance from the dropout ensemble (lower is better)", 5))
        out.append(table(["candidate", header], [[c["name"], fmt(c[key], digits)] for c in report.candidates], "lr"))
        if report.chosen:
            out.append(f"chosen: {report.chosen}")
        out += [_evidence_line(e, report) for e in report.evidence]
    summary = report.message
    if report.written:
        summary += f" Wrote {report.output} ({report.method}, {fmt(report.seconds, 2)} s)."
    out.append(summary)
    return "\n".join(out)  # the CLI prints report.warnings on stderr


def _evidence_line(e: dict, report) -> str:
    """One comparison behind a choice: the gain by the criterion with its paired 95% interval."""
    what = {"top1": "top-1", "ensemble_disagreement": "agreement with the dropout ensemble's classes"}
    measure = what.get(report.criterion, "distance from the dropout ensemble's outputs (mse), lower by")
    unit, digits = (" points", 2) if report.criterion in what else ("", 4)
    low, high = e["ci95"]
    who = e["candidate"] if e["candidate"] == report.chosen else f"best candidate {e['candidate']}"
    over = e["over"] if e["over"] == "original" else f"{e['over']} ({e['over_is']})"
    return (f"  {who} vs {over}: {measure} {e['gain']:+.{digits}f}{unit}, paired 95% interval "
            f"[{low:+.{digits}f}, {high:+.{digits}f}] on {report.val_samples} samples"
            f" ({'resolved' if low > 0 or high < 0 else 'not resolved'})")


def render_eval(reports) -> str:
    rows = [[r.model, r.samples, fmt(r.top1, 2), "[{:.2f}, {:.2f}]".format(*r.top1_ci95), fmt(r.top5, 2),
             f"{r.images_per_s:.0f}", r.provider] for r in reports]
    return table(["model", "samples", "top-1 %", "top-1 95% interval", "top-5 %", "images/s", "provider"], rows,
                 "lrrrrrl")


def render_compare(report) -> str:
    lines = [render_eval([report.a, report.b])]
    low, high = report.delta_top1_ci95
    verdict = ("B is better" if low > 0 else "B is worse" if high < 0 else
               "no difference at 95%" if report.delta_top1 or high > low else "unchanged")
    lines.append(f"delta top-1 (B - A): {report.delta_top1:+.2f} points, paired 95% interval [{low:+.2f}, {high:+.2f}] "
                 f"({verdict}); predictions agree on {report.agreement:.2f}%; max |output difference| "
                 f"{report.max_abs_diff:.4g}")
    return "\n".join(lines)


def render_demo(report) -> str:
    base = report.results[0].top1
    rows = [[r.model, r.samples, fmt(r.top1, 2), fmt(r.top5, 2), f"{r.top1 - base:+.2f}"] for r in report.results]
    return "\n".join([
        f"model: {report.model}: {report.batchnorms} BatchNormalization, {report.sites} Dropout->BN site(s)",
        f"calibrated on {report.calib_samples} shuffled training images ("
        + ", ".join(f"{m} {s} s" for m, s in report.fix_seconds.items() if m != "data-free") + ")"
        + (f"; data-free from synthetic inputs {report.fix_seconds['data-free']} s" if "data-free" in report.fix_seconds
           else ""),
        table(["model", "test images", "top-1 %", "top-5 %", "delta top-1"], rows, "lrrrr"),
        *[f"note: {n}" for n in report.notes],
        f"total time: {report.total_seconds} s",
    ])
