"""What a fix starts from: the input model (a path, or a ModelProto given in memory), where its result goes,
and the refusal to correct again a model vsonnx fix already wrote."""
from __future__ import annotations

from pathlib import Path

import onnx

from .errors import VsonnxError
from .model import IN_MEMORY, check_output_path, fixed_with, input_model

REESTIMATES = ("batch", "population")  # blind to the stored statistics: they may run on a fixed model again


def default_output(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + ".fixed.onnx")


def input_of_fix(model, output, in_place: bool) -> tuple[Path, onnx.ModelProto, Path]:
    """(input path, model, output path): a path is loaded (default output ``MODEL.fixed.onnx``); a ModelProto
    given in memory is checked as a loaded one is (on a copy: the caller's proto is never changed) and needs
    ``output``."""
    if isinstance(model, onnx.ModelProto) and output is None:
        raise VsonnxError("a model given in memory needs an output path.", "pass output='fixed.onnx'.")
    proto, name = input_model(model)
    path = Path(name)
    if name == IN_MEMORY:
        return path, proto, check_output_path(output, None, False)
    return path, proto, check_output_path(output or default_output(path), path, in_place)


def check_not_fixed_before(model: onnx.ModelProto, path: Path, method: str, label: str,
                           choosing: bool) -> str | None:
    """A model vsonnx fix wrote (``vsonnx.recalibrated`` metadata) no longer holds the training-time statistics
    that relative corrections (relative, data-free, folded layers), distill's dropout-on teacher and the
    label-free ensemble start from: fixing it again corrects twice (a second relative fix took PreResNet-20 (a)
    from 80.70% to 56.25% on 2,000 test images). Batch and population re-estimate from the data alone and may
    run again: the warning to give is returned (None for a model vsonnx did not fix); every other fix (``method``,
    a registry name, said as ``label``), and choosing, is refused."""
    done = fixed_with(model)
    if done is None:
        return None
    if method in REESTIMATES and not choosing:
        return f"'{path}' was already fixed by vsonnx ({done}); {label} replaces its statistics with new estimates."
    raise VsonnxError(f"'{path}' was already fixed by vsonnx ({done}): its BN statistics are no longer the "
                      f"training-time ones that {'choosing' if choosing else label} starts from, so it would "
                      "correct them twice.",
                      "fix the original model, or re-estimate this one with --method batch or population.")
