"""Command-line interface: each command parses options, calls one library function, renders its report.

Exit codes: 0 ok; 1 a check failed (e.g. `fix --val` found nothing better and wrote nothing); 2 usage
(click); 3 user error (``Error: ...`` and ``Hint: ...`` on stderr, no traceback).
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .errors import VsonnxError

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}
MODEL_PATH = click.Path(dir_okay=False, path_type=Path)  # existence is checked by load_model (exit 3)


def user_errors(func):
    """Turn VsonnxError into 'Error:'/'Hint:' lines and exit code 3; other exceptions keep tracebacks."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except VsonnxError as exc:
            click.echo(f"Error: {exc.message}", err=True)
            if exc.hint:
                click.echo(f"Hint: {exc.hint}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


def emit_json(payload: dict) -> None:
    click.echo(json.dumps(payload, indent=2, allow_nan=False))


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="vsonnx")
def main():
    """Find and repair the Dropout->BatchNorm variance shift in ONNX models."""


@main.command(context_settings=CONTEXT)
@click.argument("model", type=MODEL_PATH)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@user_errors
def scan(model: Path, as_json: bool):
    """List the BatchNormalization layers of MODEL and its Dropout->BN variance-shift sites."""
    from .report import render_scan
    from .sites import scan as scan_model

    report = scan_model(model)
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(render_scan(report))
