"""Image preprocessing: resize, scale, normalise and lay out images as the model's input wants, from
flags or the model's vsonnx.preprocess metadata; the class names the model's metadata gives its outputs."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import VsonnxError, warn
from ..model import get_metadata


from .inputs import InputSpec, _layout_of


@dataclass
class Preprocess:
    """Image preprocessing: resize to ``size`` (H, W), multiply by ``scale``, subtract ``mean``, divide by
    ``std`` (per channel, in the model's channel order), lay out as ``nchw`` or ``nhwc``; ``channels`` "bgr"
    reverses the decoded RGB first (OpenCV/Caffe-style models); ``resize`` N: the shorter image side is resized
    to N and the centre ``size`` cropped (torchvision's Resize(N) + CenterCrop), else images are resized to
    ``size`` directly. A model with an integer input (e.g. uint8) gets
    the pixels themselves (0..255) in its layout: scaling and normalising are the model's business then.
    Every value is checked, whether it comes from a flag or from the model's metadata: mean and std have 1
    or 3 values (std > 0), size is 1 or 2 positive integers, scale a positive number."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float = 1 / 255
    layout: str = "nchw"
    channels: str = "rgb"
    resize: int | None = None
    notes: list[str] = field(default_factory=list)
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))

    @classmethod
    def resolve(cls, model: onnx.ModelProto, inputs: list[InputSpec], *, mean=None, std=None, size=None,
                scale=None, layout=None, channels=None, resize=None) -> "Preprocess":
        """Flags win over the model's ``vsonnx.preprocess`` metadata; the size falls back on the model's
        static input shape."""
        meta = _preprocess_metadata(model)
        given = {"mean": mean, "std": std, "size": size, "scale": scale, "layout": layout, "channels": channels,
                 "resize": resize}
        values = {k: _checked(k, v, "--" + k) if v is not None else _checked(k, meta.get(k), f"the model's "
                  f"vsonnx.preprocess metadata ({k})") for k, v in given.items()}
        shape = inputs[0].shape if inputs else None
        layout = values["layout"] or _layout_of(shape)
        pre = cls(size=values["size"], mean=values["mean"], std=values["std"],
                  scale=1 / 255 if values["scale"] is None else values["scale"], layout=layout,
                  channels=values["channels"] or "rgb", resize=values["resize"],
                  dtype=inputs[0].dtype if inputs else np.dtype(np.float32))
        if layout != "nchw" and values["layout"] is None:
            pre.notes.append(f"images laid out NHWC: the model's input shape ({' x '.join(str(d or 'N') for d in shape)}) "
                             "ends in the channels (--layout nchw overrides)")
        if pre.dtype.kind in "iub":
            if any(v is not None for k, v in given.items() if k in ("mean", "std", "scale")):
                pre.notes.append(f"--mean/--std/--scale ignored: the model's input is {pre.dtype} and gets the pixels "
                                 "(0..255) themselves")
            pre.mean = pre.std = None
            pre.scale = 1.0
        if pre.size is None and shape is not None and len(shape) == 4:
            hw = shape[2:4] if pre.layout == "nchw" else shape[1:3]
            if all(isinstance(d, int) and d > 0 for d in hw):
                pre.size = (int(hw[0]), int(hw[1]))
        if (pre.mean is None or pre.std is None) and pre.dtype.kind == "f":
            pre.notes.append("no --mean/--std and no vsonnx.preprocess metadata: pixels are only scaled by "
                             f"{pre.scale:g}")
        return pre

    def apply(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC images -> the model's channel order, layout and element type."""
        if self.channels == "bgr" and images.shape[-1] == 3:
            images = images[..., ::-1]
        if self.dtype.kind in "iub":  # integer inputs take the pixels as they are
            x = images.astype(self.dtype, copy=False)
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if self.layout == "nchw" else x
        x = images.astype(np.float32) * np.float32(self.scale)
        if self.mean is not None:
            x -= np.asarray(self.mean, np.float32)
        if self.std is not None:
            x /= np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if self.layout == "nchw" else x


def _preprocess_metadata(model: onnx.ModelProto) -> dict:
    raw = get_metadata(model).get("vsonnx.preprocess")
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise VsonnxError("the model's vsonnx.preprocess metadata is not a JSON object.",
                          "pass --mean/--std/--size/--layout/--scale/--channels/--resize, or fix the metadata.")
    return meta


def _checked(key: str, value, origin: str):
    """A preprocessing value in its canonical form, or a user error naming where it came from."""
    if value is None:
        return None
    hint = "write e.g. --mean 0.4914,0.4822,0.4465 --std 0.247,0.2435,0.2616 --size 32,32 --scale 0.00392157."
    try:
        if key in ("mean", "std"):
            out = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
            ok = len(out) in (1, 3) and all(np.isfinite(out)) and (key == "mean" or min(out) > 0)
            what = "1 or 3 finite numbers" + (", all above 0" if key == "std" else "")
        elif key == "size":
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            out = tuple(int(v) for v in items) * (2 if len(items) == 1 else 1)
            ok = len(out) == 2 and min(out) > 0 and all(float(v) == int(v) for v in items)
            what = "1 or 2 positive integers (H, W)"
        elif key == "scale":
            out = float(value)
            ok, what = bool(np.isfinite(out) and out > 0), "a positive number"
        elif key == "resize":
            out = int(value)
            ok, what = out > 0 and float(value) == out, "a positive integer"
        elif key == "channels":
            out = str(value).lower()
            ok, what = out in ("rgb", "bgr"), "rgb or bgr"
        else:
            out = str(value).lower()
            ok, what = out in ("nchw", "nhwc"), "nchw or nhwc"
    except (TypeError, ValueError):
        ok, what = False, {"mean": "1 or 3 numbers", "std": "1 or 3 numbers", "size": "1 or 2 positive integers",
                           "scale": "a positive number", "channels": "rgb or bgr",
                           "resize": "a positive integer"}.get(key, "nchw or nhwc")
    if not ok:
        raise VsonnxError(f"{origin}: {key} {value!r} is not {what}.", hint)
    return out


def model_class_names(model: onnx.ModelProto) -> list[str] | None:
    """The class names in the model's output order (``vsonnx.class_names`` metadata, written by vsonnx.export)."""
    raw = get_metadata(model).get("vsonnx.class_names")
    if raw is None:
        return None
    try:
        names = json.loads(raw)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        warn("the model's vsonnx.class_names metadata is not a JSON list of strings: ignored.")
        return None
    return names


def data_contract(model: onnx.ModelProto) -> dict:
    """What the model says about the data it takes, as scan shows it: its inputs (name, shape, dtype), its
    vsonnx.preprocess metadata (None when absent, "malformed" when not a JSON object) and its class names."""
    try:
        meta = _preprocess_metadata(model) or None
    except VsonnxError:
        meta = "malformed"
    inputs = [{"name": i.name, "shape": list(i.shape) if i.shape is not None else None, "dtype": str(i.dtype)}
              for i in InputSpec.all_of(model)]
    return {"inputs": inputs, "preprocess": meta, "class_names": model_class_names(model)}


def array_notes(model: onnx.ModelProto, inputs: list[InputSpec], arrays: dict[str, np.ndarray],
                where: str) -> list[str]:
    """Arrays are fed as given; what looks unlike preprocessed inputs in ``arrays`` (the first part of the data
    at ``where``), to say so: integer arrays for a float input, and, where the model's vsonnx.preprocess
    metadata scales pixels to 0..1 before normalising, float arrays of the first input whose first 256
    samples reach beyond 20 (raw pixels)."""
    notes = [f"'{where}' holds {arrays[s.name].dtype} values, fed unchanged to float input '{s.name}': arrays are "
             "taken as preprocessed (for raw pixels pass an image folder, which gets the model's preprocessing)."
             for s in inputs if arrays[s.name].dtype.kind in "iu" and np.issubdtype(s.dtype, np.floating)]
    if inputs and (note := _raw_pixel_note(model, inputs[0], arrays[inputs[0].name], where)):
        notes.append(note)
    return notes


def _raw_pixel_note(model: onnx.ModelProto, spec: InputSpec, array: np.ndarray, where: str) -> str | None:
    try:
        meta = _preprocess_metadata(model)
    except VsonnxError:
        return None
    scale = meta.get("scale", 1 / 255) if meta else None
    if scale is None or array.dtype.kind != "f" or not len(array) or not isinstance(scale, (int, float)) \
            or scale * 255 > 1.01:
        return None
    peak = float(np.nanmax(np.asarray(array[:256])))
    if peak <= 20:
        return None
    return (f"'{where}': values up to {peak:g} look like raw pixels, but the model's vsonnx.preprocess metadata "
            f"scales pixels by {scale:g} (and normalises them) for input '{spec.name}': arrays are fed as given "
            "(preprocess them, or pass the images as a folder).")
