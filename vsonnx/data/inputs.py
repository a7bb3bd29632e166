"""The input contract: a model's inputs (name, shape, dtype), its static batch size, and the checks a
array must pass to feed it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import VsonnxError


from ..settings import check_settings


LABEL_KEYS = ("label", "labels", "y")
ARRAY_SUFFIXES = {".npy", ".npz"}


@dataclass
class InputSpec:
    """A model input: name, shape (None for symbolic dims) and numpy dtype."""

    name: str
    shape: tuple[int | None, ...] | None
    dtype: np.dtype

    @classmethod
    def all_of(cls, model: onnx.ModelProto) -> list["InputSpec"]:
        inits = {t.name for t in model.graph.initializer}
        specs = []
        for value in model.graph.input:
            if value.name in inits:
                continue
            tensor = value.type.tensor_type
            shape = None
            if tensor.HasField("shape"):
                shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
            try:
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
            except Exception:  # UNDEFINED or an unknown element type
                dtype = np.dtype(object)
            if dtype.kind not in "biuf":
                known = tensor.elem_type in onnx.TensorProto.DataType.values()
                kind = onnx.TensorProto.DataType.Name(tensor.elem_type) if known else tensor.elem_type
                raise VsonnxError(f"model input '{value.name}' is of type {kind}; vsonnx feeds numbers (bool, "
                                  "integer or float inputs).", "calibrate a model whose inputs are numeric tensors.")
            specs.append(cls(value.name, shape, dtype))
        return specs


def static_batch(model: onnx.ModelProto) -> int | None:
    """The batch size every model input declares as a fixed first dimension (classic Model Zoo models
    declare 1 and bake it into Reshapes), or None when any input's first dimension is symbolic or unknown."""
    sizes = {s.shape[0] if s.shape else None for s in InputSpec.all_of(model)}
    size = sizes.pop() if len(sizes) == 1 else None
    return size if isinstance(size, int) and size > 0 else None


def resolve_batch_size(model: onnx.ModelProto, requested: int | None, default: int = 128) -> int:
    """``requested`` when given (checked), else the model's static batch size, else ``default``."""
    check_settings(batch_size=requested)
    return requested if requested is not None else static_batch(model) or default


def _numeric(value, where: str) -> np.ndarray:
    """``value`` as an array of numbers with a sample axis, or a user error."""
    try:
        arr = np.asarray(value)
    except Exception:
        arr = np.asarray(None)
    if arr.ndim == 0 or arr.dtype.kind not in "biuf":
        raise VsonnxError(f"{where} is {'a scalar' if arr.ndim == 0 else f'an array of {arr.dtype}'}, not an array "
                          "of numbers with samples on its first axis.", "pass numeric arrays [N, ...].")
    return arr


def _layout_of(shape) -> str:
    """``nhwc`` when a 4-D input shape has 1 or 3 channels last and not first (Keras through tf2onnx),
    else ``nchw``."""
    if shape is not None and len(shape) == 4 and shape[3] in (1, 3) and shape[1] not in (1, 3):
        return "nhwc"
    return "nchw"


def input_channels(spec: InputSpec, layout: str) -> int | None:
    """The channel count a 4-D image input declares in ``layout``, or None (not 4-D, or symbolic)."""
    if spec.shape is None or len(spec.shape) != 4:
        return None
    return spec.shape[1] if layout == "nchw" else spec.shape[3]


def _check_channels(spec: InputSpec, channels: int, layout: str, what: str) -> None:
    expected = input_channels(spec, layout)
    if expected is not None and expected != channels:
        raise VsonnxError(
            f"{what} have {channels} channels, model input '{spec.name}' expects {expected} "
            f"(shape {' x '.join(str(d or 'N') for d in spec.shape)}).",
            "pass data preprocessed to the model's layout, or set --layout.",
        )


def _check_array(array: np.ndarray, spec: InputSpec, where: str) -> None:
    """A user error unless ``array`` holds numbers (bool, int, float) in a shape that fits ``spec``."""
    if array.dtype.kind not in "biuf":
        raise VsonnxError(f"{where}: an array of {array.dtype}, not of real numbers; model input '{spec.name}' takes "
                          f"{spec.dtype}.", "save the inputs as a numeric array (e.g. float32 or uint8 pixels).")
    if spec.shape is None:
        return
    if array.ndim != len(spec.shape):
        raise VsonnxError(
            f"{where}: array of shape {tuple(array.shape)} does not fit model input '{spec.name}' "
            f"(shape {' x '.join(str(d or 'N') for d in spec.shape)}).",
            "the first axis must be samples and the rest match the model input.",
        )
    for axis, (got, want) in enumerate(zip(array.shape[1:], spec.shape[1:]), start=1):
        if want is not None and got != want:
            raise VsonnxError(
                f"{where}: axis {axis} has size {got}, model input '{spec.name}' expects {want} "
                f"(shape {' x '.join(str(d or 'N') for d in spec.shape)}).",
                "pass data preprocessed to the model's input shape and layout.",
            )
