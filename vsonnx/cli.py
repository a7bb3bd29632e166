"""Command-line interface: each command parses options, calls one library function, renders its report.

Exit codes: 0 ok; 1 a check failed (e.g. `fix --val` found nothing better and wrote nothing); 2 usage
(click); 3 user error (``Error: ...`` and ``Hint: ...`` on stderr, no traceback); 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import click

from .errors import VsonnxError, warn
from .methods import CALIBRATED, REGISTRY
from .methods.synthesized import DEFAULT_SAMPLES, DEFAULT_STEPS

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}
MODEL_PATH = click.Path(dir_okay=False, path_type=Path)  # existence is checked by load_model (exit 3)
class Opt:
    """One option's click arguments, applied plainly (``click.option``) or inside a help group
    (click-option-group's ``optgroup.option``)."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __call__(self, func):
        return click.option(*self.args, **self.kwargs)(func)

    @property
    def name(self) -> str:
        """The parameter name click passes the value under (as click derives it)."""
        named = [a for a in self.args if not a.startswith("-")]
        flag = max((a.split("/")[0] for a in self.args), key=len)
        return named[0] if named else flag.lstrip("-").replace("-", "_")


def with_options(*options: Opt):
    """A decorator applying ``options`` in the order given (the first is listed first in --help)."""
    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def grouped(*groups: tuple[str, tuple[Opt, ...]]):
    """A decorator listing options under titled groups in --help (the way Polygraphy groups its arguments)."""
    from click_option_group import optgroup

    def decorate(func):
        for title, options in reversed(groups):
            for option in reversed(options):
                func = optgroup.option(*option.args, **option.kwargs)(func)
            func = optgroup.group(title)(func)
        return func

    return decorate


JSON = Opt("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
SYNTHETIC_STEPS = Opt("--synthetic-steps", type=click.IntRange(min=0), default=DEFAULT_STEPS, show_default=True,
                      help="Optimisation steps of the data-free synthesis.")


def synthetic_option(help_text: str) -> Opt:
    return Opt("--synthetic", type=click.IntRange(min=0), default=DEFAULT_SAMPLES, show_default=True, help=help_text)


LABELLED_DATA = click.option("--data", required=True,
                             help="Labelled data: class-folder tree, .npz with y, or FILE.py:FUNC.")
SCORES = click.option("--scores", default=None, metavar="OUTPUT",
                      help="The graph output holding the class scores [N, C] [default: the first output].")


def user_errors(func):
    """Turn VsonnxError into 'Error:'/'Hint:' lines and exit code 3, Ctrl-C into exit code 130 (outputs are
    written atomically and scratch folders removed on the way out, so nothing half-written stays); other
    exceptions keep tracebacks."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except VsonnxError as exc:
            click.echo(f"Error: {exc.message}", err=True)
            if exc.hint:
                click.echo(f"Hint: {exc.hint}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)

    return wrapper


def emit_json(payload) -> None:
    """Strict JSON on stdout: a value that is not finite (NaN, Inf) becomes null, so the report never fails."""
    click.echo(json.dumps(_finite(payload), indent=2, allow_nan=False))


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {message}", err=True)


def _render_warnings(messages: list[str]) -> None:
    """The one way warnings reach the user: one 'warning:' line each on stderr."""
    for message in messages:
        click.echo(f"warning: {message}", err=True)


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="vsonnx")
def main():
    """Find and repair the Dropout->BatchNorm variance shift in ONNX models."""
    import warnings

    warnings.showwarning = _one_line_warning  # library warnings reach the user as one line each


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise VsonnxError(f"{name} '{text}' is not a comma-separated list of numbers.",
                          f"write e.g. {name} 0.4914,0.4822,0.4465.") from None


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise VsonnxError(f"--size '{text}' is not H,W.", "write e.g. --size 32,32 (or --size 224).")
    return values[0], values[1]


SAMPLING = (
    Opt("--limit", type=int, default=None, help="Use the first N samples (after shuffling)."),
    Opt("--shuffle/--no-shuffle", default=True,
        help="Shuffle samples with --seed before --limit (single-class batches bias batch statistics)."),
    Opt("--seed", type=int, default=0, help="Seed of the shuffle."),
)
PREPROCESSING = (
    Opt("--mean", default=None, help="Per-channel mean for images, e.g. 0.4914,0.4822,0.4465."),
    Opt("--std", default=None, help="Per-channel std for images."),
    Opt("--size", default=None, help="Image size H,W (default: model metadata or static shape)."),
    Opt("--layout", type=click.Choice(["nchw", "nhwc"]), default=None,
        help="Image tensor layout [default: model metadata, else nhwc when the input shape ends in the channels]."),
    Opt("--scale", type=float, default=None, help="Pixel scale before mean/std [default: 1/255]."),
    Opt("--channels", type=click.Choice(["rgb", "bgr"]), default=None,
        help="Channel order of image inputs (bgr: OpenCV/Caffe-style models) [default: model metadata, else rgb]."),
    Opt("--resize", type=int, default=None,
        help="Resize the shorter image side to N, then centre-crop --size (torchvision's Resize(N) + CenterCrop, "
             "e.g. 256 for 224 x 224) [default: model metadata, else resize straight to --size]."),
)
RUNTIME = (
    Opt("--batch-size", type=int, default=None,
        help="Samples per onnxruntime run [default: the model's static batch size, else 128 (fix, scan) or 256 "
             "(eval, compare)]."),
    Opt("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
        help="onnxruntime execution provider (auto = CUDA when it really works)."),
    Opt("--threads", type=int, default=None, help="onnxruntime intra-op threads."),
)
data_options = with_options(RUNTIME[0], *SAMPLING, *PREPROCESSING, *RUNTIME[1:])
"""Options shared by every command that reads data (calibration or evaluation)."""


def image_flags(command):
    """The PREPROCESSING options reach ``command`` as one dict ``image`` (flag name -> value as given)."""
    @functools.wraps(command)
    def with_image(*args, **kwargs):
        return command(*args, image={o.name: kwargs.pop(o.name) for o in PREPROCESSING}, **kwargs)

    return with_image


def _preprocess(data, image: dict) -> dict:
    """The preprocessing flags given (``image``, from image_flags) in vsonnx.data's form; a warning where the
    data holds preprocessed arrays or a reader, which they do not apply to."""
    given = {**image, "mean": _floats(image["mean"], "--mean"), "std": _floats(image["std"], "--std"),
             "size": _size(image["size"])}
    flags = [f"--{k}" for k, v in given.items() if v is not None]
    path = Path(str(data))
    if flags and (path.suffix in (".npy", ".npz") or ":" in str(data) and not path.exists()):
        warn(f"{', '.join(flags)} ignored: '{data}' holds preprocessed arrays or a reader.")
    return given


def _provider_line(provider: str | None) -> None:
    if provider:
        click.echo(f"onnxruntime provider: {provider}", err=True)


@main.command(context_settings=CONTEXT)
@click.argument("model", type=MODEL_PATH)
@grouped(
    ("Data", (Opt("--calib", default=None,
                  help="Calibration data: image folder, .npy/.npz (or folder), FILE.py:FUNC."), *SAMPLING)),
    ("Method", (
        Opt("--method", type=click.Choice(CALIBRATED), default="batch",
            help="; ".join(f"{n}: {REGISTRY[n].passes}" for n in CALIBRATED)
            + " (batch: the paper's Adjust; population: exact inference statistics; relative: the dropout-on -> off "
              "change measured on the data carried over to the stored statistics; distill: BN constants fitted so "
              "the network matches its own dropout ensemble, needs torch)."),
        Opt("--all", "scope_all", is_flag=True, help="Re-estimate every BN, not only sites and downstream."),
        Opt("--data-free", is_flag=True,
            help="No data: synthesise inputs from the BN statistics (needs torch) and correct every BN in scope."),
        synthetic_option("With --data-free: synthetic inputs; 0 = closed-form formulas for the sites only (no torch)."),
        SYNTHETIC_STEPS,
        Opt("--dropout", "dropout_specs", multiple=True, metavar="NAME=RATIO",
            help="Where dropout acted in training, for exports that removed it (repeatable). NAME: a PyTorch module "
                 "or Keras layer pattern ('layer*.bn2': a BN for placement a, a conv/linear for placement b, "
                 "'blocks.*.drop_path': a drop path), a node (stands for its input) or a tensor; `vsonnx scan` "
                 "lists them."),
        Opt("--sites", "sites_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
            help='JSON file {"dropout": {"NAME": RATIO}}, the same as several --dropout.'))),
    ("Choice among candidates", (
        Opt("--val", default=None, help="Validation data: evaluate candidates, write the best (by top-1 with "
                                        "labels, by agreement with the dropout ensemble without)."),
        Opt("--val-limit", type=int, default=None, help="Use the first N validation samples."),
        Opt("--val-split", type=float, default=None, metavar="F",
            help="Hold out a fraction F of --calib (seeded) and choose among candidates on it without labels "
                 "(instead of --val)."),
        Opt("--val-masks", type=int, default=8, show_default=True,
            help="Dropout masks averaged into the ensemble that label-free choosing compares with."),
        Opt("--force", is_flag=True, help="With --val: write even when no candidate beats the original."))),
    ("Distill", (
        Opt("--steps", "distill_steps", type=int, default=REGISTRY["distill"].settings["steps"], show_default=True,
            help="distill: optimisation steps (one calibration batch each)."),
        Opt("--lr", "distill_lr", type=float, default=REGISTRY["distill"].settings["lr"], show_default=True,
            help="distill: Adam learning rate (cosine decay)."),
        Opt("--scores", default=None, metavar="OUTPUT",
            help="distill and --val/--val-split: the output compared with the dropout ensemble, or scored against "
                 "labels [default: the first]."),
        Opt("--loss", type=click.Choice(["kl", "mse"]), default=None,
            help="distill and label-free --val: kl (softmax over axis 1) or mse; outputs that are not class "
                 "scores [N, C] need --scores and --loss."))),
    ("Image preprocessing", PREPROCESSING),
    ("Output", (
        Opt("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
            help="Output model [default: MODEL.fixed.onnx]."),
        Opt("--in-place", is_flag=True, help="Allow -o to be the input model."),
        JSON)),
    ("Runtime", RUNTIME),
)
@user_errors
@image_flags
def fix(model, calib, data_free, synthetic, synthetic_steps, dropout_specs, sites_file, output, in_place, method,
        scope_all, val, val_limit, val_split, val_masks, force, distill_steps, distill_lr, scores, loss, as_json,
        batch_size, limit, shuffle, seed, image, device, threads):
    """Re-estimate the BN statistics behind Dropout->BN sites of MODEL, train-free, and write the result."""
    from . import recalibrate
    from .site_names import parse_dropout_specs
    from .report import render_fix

    _warn_ignored_fix_options(data_free, calib, synthetic, scope_all, method, val)
    named = parse_dropout_specs(dropout_specs, sites_file) if (dropout_specs or sites_file) else None
    options = recalibrate.FixOptions.of(
        output=output, scope="all" if scope_all else "sites", batch_size=batch_size, device=device, threads=threads,
        limit=limit, shuffle=shuffle, seed=seed, preprocess=_preprocess(calib, image),
        val=val, val_limit=val_limit, val_split=val_split, val_masks=val_masks, force=force, in_place=in_place,
        progress=not as_json, synthetic=synthetic, synthetic_steps=synthetic_steps,
        method_options={"distill": {"steps": distill_steps, "lr": distill_lr, "scores": scores, "loss": loss}})
    if named:
        report = recalibrate.fix_named_sites(model, calib, named, options,
                                             "distill" if method == "distill" else "named_sites")
    elif data_free:
        report = recalibrate.fix_data_free(model, options)
    else:
        report = recalibrate.fix_calibrated(model, calib, method, options)
    _provider_line(report.provider)
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(render_fix(report))
        _render_warnings(report.warnings)
    if (val is not None or val_split is not None) and not report.written and report.candidates:
        sys.exit(1)


def _warn_ignored_fix_options(data_free, calib, synthetic, scope_all, method, val) -> None:
    """An option that the chosen mode ignores gets a warning, not silence."""
    given = click.get_current_context().get_parameter_source

    def on_command_line(*names):
        return any(given(p) == click.core.ParameterSource.COMMANDLINE for p in names)

    named = on_command_line("dropout_specs", "sites_file")
    if data_free and calib:
        warn("--calib is ignored with --data-free.")
    if data_free and on_command_line("method"):
        warn("--method is ignored with --data-free.")
    if named and on_command_line("method") and method != "distill":
        warn("--method is ignored with --dropout/--sites except distill (population semantics otherwise).")
    if not data_free and on_command_line("synthetic", "synthetic_steps"):
        warn("--synthetic/--synthetic-steps are ignored without --data-free.")
    if data_free and scope_all and synthetic == 0:
        warn("--all is ignored with --synthetic 0 (the formulas cover the sites only).")
    if named and val:
        warn("--val is ignored with --dropout/--sites.")
    choosing = val is not None or on_command_line("val_split")
    if not choosing and on_command_line("val_limit", "val_masks", "force"):
        warn("--val-limit/--val-masks/--force apply only when choosing among candidates (--val or --val-split).")
    elif val is None and on_command_line("val_limit"):
        warn("--val-limit is ignored with --val-split (it limits --val data; --limit limits --calib).")
    if method != "distill" and not choosing and on_command_line("distill_steps", "distill_lr", "scores", "loss"):
        warn("--steps/--lr/--scores/--loss apply to --method distill and to choosing with --val/--val-split.")


def accuracy_command(command):
    """The options of eval and compare (labelled data, scores output, JSON, reading and runtime), which take
    the parameters ``data, as_json, run`` with ``run`` the keyword arguments of vsonnx.accuracy's functions."""
    @functools.wraps(command)
    def with_run(*args, data, as_json, scores, batch_size, limit, shuffle, seed, image, device, threads, **kwargs):
        run = dict(batch_size=batch_size, device=device, threads=threads, limit=limit, shuffle=shuffle, seed=seed,
                   preprocess=_preprocess(data, image), progress=not as_json, scores=scores)
        return command(*args, data=data, as_json=as_json, run=run, **kwargs)

    return LABELLED_DATA(SCORES(JSON(data_options(user_errors(image_flags(with_run))))))


@main.command("eval", context_settings=CONTEXT)
@click.argument("model", type=MODEL_PATH)
@accuracy_command
def eval_command(model, data, as_json, run):
    """Top-1/top-5 accuracy of MODEL with onnxruntime."""
    from .accuracy import evaluate
    from .report import render_eval

    report = evaluate(model, data, **run)
    _provider_line(report.provider)
    emit_json(report.to_dict()) if as_json else click.echo(render_eval([report]))


@main.command(context_settings=CONTEXT)
@click.argument("model_a", type=MODEL_PATH)
@click.argument("model_b", type=MODEL_PATH)
@accuracy_command
def compare(model_a, model_b, data, as_json, run):
    """Accuracy of MODEL_A and MODEL_B on the same data, their agreement and largest output difference."""
    from .accuracy import compare as compare_models
    from .report import render_compare

    report = compare_models(model_a, model_b, data, **run)
    _provider_line(report.a.provider)
    emit_json(report.to_dict()) if as_json else click.echo(render_compare(report))


@main.command(context_settings=CONTEXT)
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="CIFAR-10 folder (train/ and test/ image folders, or the python release) [default: cache, "
                   "downloading the official release when a network is there].")
@click.option("--model", "model_path", type=MODEL_PATH, default=None,
              help="ONNX model to fix [default: models/preresnet20-a05.onnx].")
@click.option("--calib-limit", type=int, default=5000, help="Shuffled training images used for calibration.")
@click.option("--test-limit", type=int, default=None, help="Test images evaluated [default: all].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the fixed models in this folder.")
@click.option("--batch-size", type=int, default=128)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--threads", type=int, default=None)
@synthetic_option("Synthetic inputs of the data-free fix (0: leave it out).")
@SYNTHETIC_STEPS
@click.option("--steps", "distill_steps", type=int, default=100, show_default=True,
              help="Steps of the distill fix (half of fix's default, to keep the demo short).")
@JSON
@user_errors
def demo(data, model_path, calib_limit, test_limit, out_dir, batch_size, device, threads, synthetic, synthetic_steps,
         distill_steps, as_json):
    """Scan, fix (batch, relative, distill, data-free) and evaluate a reference model on CIFAR-10."""
    from .demo import run_demo
    from .report import render_demo

    report = run_demo(data, model_path, calib_limit=calib_limit, test_limit=test_limit, batch_size=batch_size,
                      device=device, threads=threads, out_dir=out_dir, progress=not as_json, synthetic=synthetic,
                      synthetic_steps=synthetic_steps, distill_steps=distill_steps)
    _provider_line(report.results[0].provider)
    emit_json(report.to_dict()) if as_json else click.echo(render_demo(report))


@main.command(context_settings=CONTEXT)
@click.argument("models", nargs=-1, required=True, type=MODEL_PATH)
@click.option("--calib", default=None, help="Measure the shift on this data (model as deployed, dropout off).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --calib: write the paper's Fig. 1 (shift per BN layer) as a PNG; models overlaid.")
@click.option("--dropout", "dropout_specs", multiple=True, metavar="NAME=RATIO",
              help="Analyse as if dropout acted here (exports that removed it); repeatable, names as in fix.")
@click.option("--sites", "sites_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help='JSON file {"dropout": {"NAME": RATIO}}.')
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (a list for several models).")
@data_options
@user_errors
@image_flags
def scan(models, calib, plot, dropout_specs, sites_file, as_json, batch_size, limit, shuffle, seed, image, device,
         threads):
    """List the BatchNormalization layers of MODELS and their Dropout->BN variance-shift sites; with --calib,
    measure each BN's shift and compare it with the paper's prediction. --limit defaults to 5000 here."""
    from .measure import plot_shift, scan_models
    from .model import check_output_path
    from .site_names import parse_dropout_specs
    from .report import render_scan

    if plot and not calib:
        raise VsonnxError("--plot needs measurements.", "add --calib DATA.")
    if plot:
        check_output_path(plot, None, False, "--plot")  # before the measurement, not after
    named = parse_dropout_specs(dropout_specs, sites_file) if (dropout_specs or sites_file) else None
    reports = scan_models(models, named=named, calib=calib, limit=limit or 5000, shuffle=shuffle, seed=seed,
                          preprocess=_preprocess(calib, image), batch_size=batch_size,
                          device=device, threads=threads, progress=not as_json)
    if plot:
        plot_shift(reports, plot)
    if as_json:
        emit_json(reports[0].to_dict() if len(reports) == 1 else [r.to_dict() for r in reports])
    else:
        click.echo("\n\n".join(render_scan(r) for r in reports))
        if plot:
            click.echo(f"wrote {plot}")

