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
    rows = []
    for i, b in enumerate(report.batchnorms):
        drops = ", ".join(f"{d.name}({fmt(d.ratio, 2)}{', ch' if d.channelwise else ''})" for d in b.dropouts)
        weight = f"{b.weight.op} d={b.weight.fan_in} cos2={fmt(b.weight.cos2)}" if b.weight else ""
        status = "SITE" if b.site else ("downstream" if b.downstream_of_site else "")
        rows.append([i, b.name, b.channels, status, b.path or "", drops, weight, fmt(b.predicted_var_ratio)])
    out = [f"model: {report.model}"]
    if rows:
        out.append(table(["#", "batchnorm", "C", "status", "path", "dropouts (ratio)", "weight layer",
                          "pred. Var_test/Var_train"], rows, "rllllllr"))
    n_sites = len(report.sites)
    n_down = sum(1 for b in report.batchnorms if b.downstream_of_site and not b.site)
    out.append(f"{len(report.batchnorms)} BatchNormalization, {len(report.dropouts)} Dropout, "
               f"{n_sites} variance-shift site(s), {n_down} more BN downstream of a site.")
    out += [f"warning: {w}" for w in report.warnings]
    return "\n".join(out)
