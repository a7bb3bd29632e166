"""Loading and saving ONNX models safely.

- ``load_model`` reads a path (external data included) and turns every failure into a VsonnxError; a model
  that will run in onnxruntime must fit in one protobuf message (2 GB).
- ``save_model`` validates nothing by itself; it writes to a temporary file in the target folder and
  renames it over the target (atomic on POSIX), refuses to overwrite the input model unless asked, lowers
  the IR version to what the installed onnxruntime reads, and records provenance in metadata_props under
  the ``vsonnx.`` prefix while keeping the metadata already there.
- Outputs (``atomic_write``): only a new path or an existing regular file is written (never a device, FIFO
  or folder); every OS error (read-only or full disk, permissions, a parent that is a file) is a user error
  naming the path and the reason, the temporary file is removed and an existing output stays intact. A new
  file gets the mode a normal file gets under the umask, a replaced file keeps its mode (``--in-place``
  keeps the input's). Temporary files are named ``.NAME.vsonnx-PID.XXXX.tmp`` next to the output; those of
  a process that no longer runs (killed with -9) are removed by the next write to the same folder.
"""
from __future__ import annotations

import functools
import os
import re
import stat
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import onnx

from .errors import VsonnxError, warn

METADATA_PREFIX = "vsonnx."
PROTOBUF_LIMIT_BYTES = 2**31 - 1  # the largest message protobuf serializes


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


def too_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` (external data loaded) exceeds what one protobuf message holds."""
    try:
        return model.ByteSize() > PROTOBUF_LIMIT_BYTES
    except Exception:  # protobuf's EncodeError: it cannot even size it
        return True


def load_model(path: str | os.PathLike, *, load_external_data: bool = True, runtime: bool = True) -> onnx.ModelProto:
    """Read an ONNX model; raise VsonnxError with a hint for every way the file can be wrong. ``runtime``: the
    model will run in onnxruntime (every command but a scan without data), so it must fit in one protobuf
    message (2 GB): sessions, shape inference and working copies take it serialized."""
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
    return checked_model(model, f"'{p}'", runtime=runtime and load_external_data)


IN_MEMORY = "<memory>"  # the name of a model given as a ModelProto


def input_model(model, *, runtime: bool = True) -> tuple[onnx.ModelProto, str]:
    """(model, its name) of a path (``load_model``) or of a ModelProto given in memory: checked as a loaded one
    is, on a copy (the caller's proto is never changed), and named ``IN_MEMORY``."""
    if isinstance(model, onnx.ModelProto):
        import copy

        return checked_model(copy.deepcopy(model), "the model given in memory", runtime=runtime), IN_MEMORY
    return load_model(model, runtime=runtime), str(model)


def checked_model(model: onnx.ModelProto, what: str, *, runtime: bool = True) -> onnx.ModelProto:
    """``model`` (read from the file or given in memory, named by ``what``) after the checks every input model
    passes: a graph, size (``runtime``: see load_model), IR and opset versions, node order (sorted in place,
    with a warning) and structure (vsonnx.graph_check)."""
    if not model.graph.node and not model.graph.input:
        raise VsonnxError(
            f"{what} does not contain an ONNX graph.",
            "the file parsed as protobuf but holds no model; check that it is an .onnx file.",
        )
    if runtime and too_large(model):
        raise VsonnxError(f"{what} is over 2 GB with its external data: onnxruntime sessions and shape inference "
                          "take a model as one protobuf message, limited to 2 GB.",
                          "vsonnx runs models up to 2 GB; `vsonnx scan MODEL` (without --calib) still lists its "
                          "sites and what the closed form would do.")
    if model.ir_version < 3:
        raise VsonnxError(
            f"{what} has IR version {model.ir_version}; vsonnx supports IR 3 and newer.",
            "re-export the model with a recent exporter.",
        )
    opset = default_opset(model)
    if opset is not None and opset < 7:
        raise VsonnxError(
            f"{what} uses ONNX opset {opset}; vsonnx supports opset 7 and newer.",
            "convert it with onnx.version_converter.convert_version(model, 17).",
        )
    if opset is not None and opset > onnx.defs.onnx_opset_version():
        raise VsonnxError(
            f"{what} uses ONNX opset {opset}, newer than this onnx package knows ({onnx.defs.onnx_opset_version()}).",
            "upgrade the onnx package, or export with a lower opset.",
        )
    from .graph_check import check_structure, sort_topologically

    if sort_topologically(model):
        warn(f"{what}: its nodes were not in topological order (as ONNX requires); vsonnx sorted them, and a "
             "model it writes has them in that order.")
    check_structure(model, what)
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


def fixed_with(model: onnx.ModelProto) -> str | None:
    """The method a vsonnx fix wrote ``model`` with ("?" where unnamed), or None when no fix wrote it (its
    ``vsonnx.recalibrated`` provenance metadata)."""
    meta = get_metadata(model)
    return meta.get("vsonnx.method", "?") if "vsonnx.recalibrated" in meta else None


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def check_output_path(output: str | os.PathLike, input_path: str | os.PathLike | None, in_place: bool,
                      option: str = "-o") -> Path:
    """Refuse an output that would overwrite the input without ``in_place``, or whose folder is missing;
    hints name the command-line ``option`` that gave the path."""
    out = Path(output)
    if input_path is not None and same_file(out, input_path) and not in_place:
        raise VsonnxError(
            f"output '{out}' is the input model; vsonnx never overwrites its input unless asked.",
            f"pass another {option} path, or add --in-place to replace the input.",
        )
    if not out.parent.exists():
        raise VsonnxError(f"output folder '{out.parent}' does not exist.",
                          f"create it first or choose another {option} path.")
    if not out.parent.is_dir():
        raise VsonnxError(f"output folder '{out.parent}' is not a folder.", f"choose another {option} path.")
    if out.is_dir():
        raise VsonnxError(f"output '{out}' is a folder.", "pass a file path such as model.fixed.onnx.")
    if out.exists() and not stat.S_ISREG(out.stat().st_mode):
        raise VsonnxError(f"output '{out}' exists and is not a regular file (a device, FIFO or socket).",
                          "pass the path of a new or regular file.")
    try:  # can a file be created there? Asked now, before any work (as root, permissions alone do not tell)
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.vsonnx-{os.getpid()}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _write_error(out, exc, option) from None
    return out


def _write_error(out: Path, exc: OSError, option: str = "-o") -> VsonnxError:
    return VsonnxError(f"cannot write '{out}': {exc.strerror or exc}.",
                       f"choose a writable {option} path on a file system with free space.")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, under another user
        return True
    return True


def remove_stale(folder: Path, pattern: str) -> None:
    """Remove the entries of ``folder`` whose name matches ``pattern`` (a regex with a ``pid`` group) and whose
    owning process is gone: leftovers of a killed run."""
    import shutil

    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        match = re.fullmatch(pattern, entry.name)
        if match and not pid_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def new_scratch(kind: str) -> Path:
    """A new folder ``vsonnx-KIND-PID-XXXX`` in the system's temporary folder (TMPDIR); folders of processes
    that no longer run (killed with -9) are removed first. The caller removes it."""
    root = Path(tempfile.gettempdir())
    remove_stale(root, rf"vsonnx-{re.escape(kind)}-(?P<pid>\d+)-.*")
    return Path(tempfile.mkdtemp(prefix=f"vsonnx-{kind}-{os.getpid()}-", dir=root))


@contextmanager
def scratch_folder(kind: str):
    """``new_scratch`` removed when the block ends."""
    import shutil

    folder = new_scratch(kind)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _file_mode(out: Path) -> int:
    """The mode ``out`` keeps (an existing file) or gets (a new one: 0666 less the umask)."""
    if out.exists():
        return stat.S_IMODE(out.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(out: Path, write: Callable[[str], None], mode_from: Path | None = None, option: str = "-o") -> Path:
    """Write ``out`` through a temporary file in its folder renamed over it; ``write(tmp_path)`` writes the
    content. OS errors become user errors; the temporary file never stays. The file keeps the mode of
    ``mode_from`` (the input, for --in-place) or of the file it replaces, or gets the umask's; error hints name
    ``option``."""
    remove_stale(out.parent, rf"\.{re.escape(out.name)}\.vsonnx-(?P<pid>\d+)\..*\.tmp")
    mode = _file_mode(mode_from if mode_from is not None else out)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.vsonnx-{os.getpid()}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, out)
    except OSError as exc:
        raise _write_error(out, exc, option) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return out


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    in_place: bool = False,
    provenance: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically (temp file + rename) at an IR version onnxruntime reads, as one
    file (external data of the input included: models over 2 GB are refused when loaded).

    ``provenance`` entries are stored as ``vsonnx.<key>`` metadata.
    """
    out = check_output_path(path, input_path, in_place)
    model.ir_version = min(model.ir_version, max_ir_version())
    if provenance:
        set_metadata(model, {METADATA_PREFIX + k: v for k, v in provenance.items()})

    def write(tmp: str) -> None:
        onnx.save_model(model, tmp)

    in_place = input_path is not None and same_file(out, input_path)
    return atomic_write(out, write, mode_from=Path(input_path) if in_place else None)


def model_bytes(model: onnx.ModelProto) -> bytes:
    """Serialized model at a runtime-readable IR version (for in-memory onnxruntime sessions)."""
    if model.ir_version > max_ir_version():
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.ir_version = max_ir_version()
    return model.SerializeToString()
