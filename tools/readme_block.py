"""Write generated lines into README.md between two marker comments (tools/bench_fix.py, tools/reproduce.py)."""
from __future__ import annotations

import textwrap
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def wrap(line: str, width: int = 110, indent: str = "  ") -> str:
    """One generated paragraph or list item, wrapped as the README's hand-written text."""
    return "\n".join(textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False))


def replace_block(start: str, end: str, lines: list[str], readme: Path = README) -> None:
    """Replace what README.md holds between the lines ``start`` and ``end`` with ``lines``."""
    text = readme.read_text()
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + start + "\n" + "\n".join(lines) + "\n" + end + tail)
    print(f"wrote {start} ... {end} in {readme}")
