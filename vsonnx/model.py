"""Loading and saving ONNX models safely.

- ``load_model`` reads a path (external data included) and turns every failure into a VsonnxError.
- ``save_model`` validates nothing by itself; it writes to a temporary file in the target folder and
  renames it over the target (atomic on POSIX), refuses to overwrite the input model unless asked, lowers
  the IR version to what the installed onnxruntime reads, and records provenance in metadata_props under
  the ``vsonnx.`` prefix while keeping the metadata already there.
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import onnx

from .errors import VsonnxError

METADATA_PREFIX = "vsonnx."


@functools.lru_cache(maxsize=1)
def max_ir_version() -> int:
    """Highest IR version the installed onnxruntime loads, found by probing a one-node model.

    onnx 1.23 writes IR 14 by default while onnxruntime 1.31 reads at most 13, so every model vsonnx
    writes or runs is lowered to this version (IR versions are backward compatible).
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    for ir in range(onnx.IR_VERSION, 6, -1):
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir)
        try:
            ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
            return ir
        except Exception:
            continue
    return 7


def load_model(path: str | os.PathLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Read an ONNX model; raise VsonnxError with a hint for every way the file can be wrong."""
    p = Path(path)
    if not p.exists():
        raise VsonnxError(f"model file '{p}' does not exist.", "check the path (and the current directory).")
    if p.is_dir():
        raise VsonnxError(f"'{p}' is a folder, not an ONNX model file.", "pass the path of a .onnx file.")
    if p.stat().st_size == 0:
        raise VsonnxError(f"model file '{p}' is empty.", "re-export the model; the file may have been truncated.")
    try:
        model = onnx.load(str(p), load_external_data=load_external_data)
    except Exception as exc:  # protobuf raises DecodeError, onnx raises ValueError/OSError
        raise VsonnxError(
            f"'{p}' is not a readable ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else 'parse error'}).",
            "the file may be truncated, corrupt or of another format; re-export it with vsonnx.export or torch.onnx.export.",
        ) from None
    if not model.graph.node and not model.graph.input:
        raise VsonnxError(
            f"'{p}' does not contain an ONNX graph.",
            "the file parsed as protobuf but holds no model; check that it is an .onnx file.",
        )
    if model.ir_version < 3:
        raise VsonnxError(
            f"'{p}' has IR version {model.ir_version}; vsonnx supports IR 3 and newer.",
            "re-export the model with a recent exporter.",
        )
    opset = default_opset(model)
    if opset is not None and opset < 7:
        raise VsonnxError(
            f"'{p}' uses ONNX opset {opset}; vsonnx supports opset 7 and newer.",
            "convert it with onnx.version_converter.convert_version(model, 17).",
        )
    if opset is not None and opset > onnx.defs.onnx_opset_version():
        raise VsonnxError(
            f"'{p}' uses ONNX opset {opset}, newer than this onnx package knows ({onnx.defs.onnx_opset_version()}).",
            "upgrade the onnx package, or export with a lower opset.",
        )
    return model


def default_opset(model: onnx.ModelProto) -> int | None:
    """Opset version of the default ('' or 'ai.onnx') domain, or None when absent."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Add or replace metadata_props entries, keeping every other entry as it was."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in entries.items():
        if key in existing:
            existing[key].value = str(value)
        else:
            prop = model.metadata_props.add()
            prop.key, prop.value = key, str(value)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def check_output_path(output: str | os.PathLike, input_path: str | os.PathLike | None, in_place: bool) -> Path:
    """Refuse an output that would overwrite the input without ``in_place``, or whose folder is missing."""
    out = Path(output)
    if input_path is not None and same_file(out, input_path) and not in_place:
        raise VsonnxError(
            f"output '{out}' is the input model; vsonnx never overwrites its input unless asked.",
            "pass another -o path, or add --in-place to replace the input.",
        )
    if not out.parent.exists():
        raise VsonnxError(f"output folder '{out.parent}' does not exist.", "create it first or choose another -o path.")
    if out.is_dir():
        raise VsonnxError(f"output '{out}' is a folder.", "pass a file path such as model.fixed.onnx.")
    return out


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    in_place: bool = False,
    provenance: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically (temp file + rename) at an IR version onnxruntime reads.

    ``provenance`` entries are stored as ``vsonnx.<key>`` metadata. Models over 2 GB are written with
    external data next to the output.
    """
    out = check_output_path(path, input_path, in_place)
    model.ir_version = min(model.ir_version, max_ir_version())
    if provenance:
        set_metadata(model, {METADATA_PREFIX + k: v for k, v in provenance.items()})
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        large = model.ByteSize() > 1_800_000_000
        if large:
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=out.name + ".data")
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def model_bytes(model: onnx.ModelProto) -> bytes:
    """Serialized model at a runtime-readable IR version (for in-memory onnxruntime sessions)."""
    if model.ir_version > max_ir_version():
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.ir_version = max_ir_version()
    return model.SerializeToString()
