"""Hostile and odd inputs (issue 11): never a wrong model, never a traceback, never a lost or replaced file.

Every case checks what a user sees: the exit code, `Error:` + `Hint:` lines, no traceback, every input file
byte-identical afterwards and nothing left behind in the output folder.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

from vsonnx.model import load_model
from vsonnx.rewrite import SUBGRAPH

from conftest import GraphBuilder, cnn_with_sites, run, save


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def assert_user_error(result, folder, before, needle=""):
    """Exit 3 with one Error and one Hint line, no traceback, the folder exactly as it was."""
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[-2].startswith("Error: ") and lines[-1].startswith("Hint: "), result.output
    assert needle in result.output
    assert snapshot(folder) == before


def bn_values(model, name):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == name)
    return inits[node.input[3]], inits[node.input[4]]


def broken_site(tmp_path, mean=None, var=None):
    """cnn_with_sites with bn_direct's stored statistics replaced (NaN, Inf or a negative variance)."""
    model = cnn_with_sites()
    for t in model.graph.initializer:
        if t.name == "bn_direct_mean" and mean is not None:
            t.CopyFrom(numpy_helper.from_array(np.asarray(mean, np.float32), t.name))
        if t.name == "bn_direct_var" and var is not None:
            t.CopyFrom(numpy_helper.from_array(np.asarray(var, np.float32), t.name))
    path = save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    return path


@pytest.mark.parametrize("method", ["batch", "population", "relative"])
def test_invalid_stored_statistics_poisoning_everything_downstream_is_exit_3(tmp_path, method):
    """A NaN mean (or a negative variance: sqrt of it is NaN) makes every value after the BN NaN: the BN is
    refused (rule 4), and so is every other BN (rule 4: the written model would output NaN); nothing is
    written."""
    for k, (mean, var) in enumerate((([np.nan, 0, 0, 0], None), (None, [1, -0.5, 1, 1]))):
        folder = tmp_path / str(k)
        folder.mkdir()
        path = broken_site(folder, mean, var)
        before = snapshot(folder)
        r = run("fix", path, "--calib", folder / "calib.npy", "--method", method, "--batch-size", 8, "--json")
        assert_user_error(r, folder, before, "'bn_direct': 4:")
        assert "'bn_weight': 4: 'bn_direct' make(s) every value after it NaN" in r.output


@pytest.mark.parametrize("method", ["batch", "population", "relative"])
def test_an_invalid_bn_is_refused_and_the_others_fixed(tmp_path, method):
    """An infinite stored variance makes its BN output finite (x / sqrt(inf) = 0): it is refused (rule 4),
    the BN after it is fixed, and nothing non-finite is written."""
    path = broken_site(tmp_path, var=[1, np.inf, 1, 1])
    r = run("fix", path, "--calib", tmp_path / "calib.npy", "--method", method, "--batch-size", 8, "-o",
            tmp_path / "out.onnx", "--json")
    report = json.loads(r.output[r.output.index("{"):])
    assert r.exit_code == 0 and report["refused"]["bn_direct"].startswith("4:")
    assert [b["name"] for b in report["batchnorms"]] == ["bn_weight"]
    fixed, original = load_model(tmp_path / "out.onnx"), load_model(path)
    m, v = bn_values(fixed, "bn_weight")
    assert np.isfinite(m).all() and np.isfinite(v).all() and (v >= 0).all()
    assert not np.array_equal(v, bn_values(original, "bn_weight")[1])
    np.testing.assert_array_equal(bn_values(fixed, "bn_direct")[1], bn_values(original, "bn_direct")[1])


def test_scan_names_invalid_stored_statistics(tmp_path):
    path = broken_site(tmp_path, var=[1, -0.5, 1, 1])
    r = run("scan", path, "--json")
    rows = {b["name"]: b["fix"] for b in json.loads(r.output)["batchnorms"]}
    assert rows["bn_direct"].startswith("refused: 4:") and rows["bn_weight"].startswith("refused: 4: 'bn_direct'")
    path = broken_site(tmp_path, var=[1, np.inf, 1, 1])  # an infinite variance zeroes the output: only its BN
    rows = {b["name"]: b["fix"] for b in json.loads(run("scan", path, "--json").output)["batchnorms"]}
    assert rows["bn_direct"].startswith("refused: 4:") and rows["bn_weight"] == "recalibrate"


@pytest.mark.parametrize("broken", ["bn_direct", "bn_weight"])
@pytest.mark.parametrize("var", [[1, -0.5, 1, 1], [1, np.nan, 1, 1]])
def test_closed_form_never_writes_a_model_that_outputs_nan(tmp_path, broken, var):
    """A negative or NaN stored variance anywhere makes the model output NaN: the closed form (which measures
    nothing, so rule 5 never sees the NaN) refuses every BN (rule 4) and writes nothing, whether the broken BN
    is the site it would correct or the other one."""
    model = cnn_with_sites()
    for t in model.graph.initializer:
        if t.name == f"{broken}_var":
            t.CopyFrom(numpy_helper.from_array(np.asarray(var, np.float32), t.name))
    path = save(model, tmp_path / "m.onnx")
    before = snapshot(tmp_path)
    r = run("fix", path, "--data-free", "--synthetic", "0", "-o", tmp_path / "out.onnx")
    other = {"bn_direct": "bn_weight", "bn_weight": "bn_direct"}[broken]
    assert_user_error(r, tmp_path, before, f"'{other}': 4: '{broken}' make(s) every value after it NaN")
    rows = {b["name"]: b["fix"] for b in json.loads(run("scan", path, "--json").output)["batchnorms"]}
    assert rows[broken].startswith("refused: 4: its stored") and rows[other].startswith(f"refused: 4: '{broken}'")


def test_every_bn_refused_is_exit_3_listing_each(tmp_path):
    g = GraphBuilder()
    model = g.build(g.bn(g.dropout("x", 0.5, "d"), 3, "bn", var=[1.0, np.nan, 1.0]))
    path = save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "calib.npy", np.ones((8, 3, 8, 8), np.float32))
    before = snapshot(tmp_path)
    r = run("fix", path, "--calib", tmp_path / "calib.npy", "--batch-size", 4)
    assert_user_error(r, tmp_path, before, "'bn': 4:")


def test_statistics_from_too_few_values_are_refused(tmp_path):
    """A population fix of a BatchNorm1d on one sample sees one value per channel (variance 0): refused."""
    g = GraphBuilder()
    model = g.build(g.bn(g.dropout("x", 0.5, "d"), 3, "bn"), input_shape=("N", 3))
    path = save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "calib.npy", np.ones((1, 3), np.float32))
    before = snapshot(tmp_path)
    r = run("fix", path, "--calib", tmp_path / "calib.npy", "--method", "population")
    assert_user_error(r, tmp_path, before, "6: estimated from 1 value(s) per channel")


def test_synthesis_with_an_invalid_site_fixes_the_rest(tmp_path):
    pytest.importorskip("torch")
    path = broken_site(tmp_path, var=[1, np.inf, 1, 1])
    r = run("fix", path, "--data-free", "--synthetic", "8", "--synthetic-steps", "2", "-o", tmp_path / "o.onnx",
            "--json")
    report = json.loads(r.output[r.output.index("{"):])
    assert r.exit_code == 0 and report["refused"]["bn_direct"].startswith("4:")
    assert [b["name"] for b in report["batchnorms"]] == ["bn_weight"]


# -- 2. outputs ---------------------------------------------------------------------------------------------
@pytest.fixture
def fixable(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    path = save(cnn_with_sites(), folder / "m.onnx")
    np.save(folder / "calib.npy", np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    return folder, path


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_output_must_be_a_new_or_regular_file(fixable, tmp_path, kind):
    folder, path = fixable
    if kind == "fifo":
        target = tmp_path / "pipe"
        os.mkfifo(target)
    else:
        target = Path("/dev/null")
    before = snapshot(folder)
    r = run("fix", path, "--calib", folder / "calib.npy", "-o", target)
    assert_user_error(r, folder, before, "not a regular file")
    assert target.exists() and not target.is_file()  # the device / FIFO is still what it was


@pytest.mark.parametrize("case", ["parent_is_a_file", "permission_denied", "proc"])
def test_os_errors_while_writing_are_user_errors(fixable, tmp_path, case, monkeypatch):
    import tempfile

    folder, path = fixable
    if case == "parent_is_a_file":
        (tmp_path / "afile").write_text("x")
        target = tmp_path / "afile" / "out.onnx"
    elif case == "permission_denied":  # as root nothing is read-only: the OS answer is simulated

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", denied)
        target = tmp_path / "out.onnx"
    else:
        target = Path("/proc/vsonnx-out.onnx")
    before = snapshot(folder)
    r = run("fix", path, "--calib", folder / "calib.npy", "-o", target)
    assert_user_error(r, folder, before, str(target.parent) if case == "parent_is_a_file" else str(target))


def test_a_failed_write_keeps_the_existing_output_and_leaves_no_temp_file(fixable, tmp_path, monkeypatch):
    import onnx

    folder, path = fixable
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous output")

    def disk_full(model, target, **kwargs):
        Path(target).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", disk_full)
    r = run("fix", path, "--calib", folder / "calib.npy", "-o", out)
    assert r.exit_code == 3 and "No space left on device" in r.output and str(out) in r.output
    assert out.read_bytes() == b"previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out.onnx"]


def test_modes_new_files_follow_the_umask_in_place_keeps_the_input_mode(fixable, tmp_path):
    import stat

    folder, path = fixable
    old = os.umask(0o022)
    try:
        assert run("fix", path, "--calib", folder / "calib.npy", "-o", tmp_path / "new.onnx").exit_code == 0
        assert stat.S_IMODE((tmp_path / "new.onnx").stat().st_mode) == 0o644
        os.chmod(path, 0o640)
        r = run("fix", path, "--calib", folder / "calib.npy", "-o", path, "--in-place")
        assert r.exit_code == 0 and stat.S_IMODE(Path(path).stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_leftovers_of_a_killed_run_are_removed_by_the_next(fixable, tmp_path, monkeypatch):
    """Temporary files and spill folders carry their owner's pid; those of dead processes go at the next run."""
    import subprocess
    import sys
    import tempfile

    folder, path = fixable
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (folder / f".out.onnx.vsonnx-{dead}.abc123.tmp").write_bytes(b"x" * 100)
    (tmp_path / "tmp" / f"vsonnx-stages-{dead}-xyz").mkdir()
    (folder / f".out.onnx.vsonnx-{os.getpid()}.mine.tmp").write_bytes(b"a live run's file")
    r = run("fix", path, "--calib", folder / "calib.npy", "--method", "population", "-o", folder / "out.onnx")
    assert r.exit_code == 0, r.output
    assert not (folder / f".out.onnx.vsonnx-{dead}.abc123.tmp").exists()
    assert not (tmp_path / "tmp" / f"vsonnx-stages-{dead}-xyz").exists()
    assert (folder / f".out.onnx.vsonnx-{os.getpid()}.mine.tmp").exists()  # a live process keeps its files
    assert list((tmp_path / "tmp").iterdir()) == []  # and this run left nothing


# -- 3. tracebacks that are user errors ---------------------------------------------------------------------
def malformed(kind):
    model = cnn_with_sites()
    nodes = model.graph.node
    if kind == "duplicate_output":
        nodes[3].output[0] = nodes[1].output[0]
    elif kind == "bn_lengths":
        for t in model.graph.initializer:
            if t.name == "bn_direct_scale":
                t.CopyFrom(numpy_helper.from_array(np.ones(3, np.float32), t.name))
    elif kind == "initializer_size":
        model.graph.initializer[0].dims[0] += 5
    elif kind == "cycle":
        nodes[0].input[0] = nodes[2].output[0]
    elif kind == "undefined_input":
        nodes[2].input[0] = "nowhere"
    return model


@pytest.mark.parametrize("kind,needle", [("duplicate_output", "produced twice"), ("bn_lengths", "lengths [3, 4, 4, 4]"),
                                         ("initializer_size", "cannot be read"), ("cycle", "cycle"),
                                         ("undefined_input", "reads 'nowhere'")])
@pytest.mark.parametrize("command", [["scan"], ["fix", "--data-free", "--synthetic", "0"]])
def test_malformed_models_are_named_not_tracebacks(tmp_path, kind, needle, command):
    path = tmp_path / "m.onnx"
    path.write_bytes(malformed(kind).SerializeToString())
    before = snapshot(tmp_path)
    assert_user_error(run(command[0], path, *command[1:]), tmp_path, before, needle)


@pytest.mark.parametrize("meta,flags,needle", [
    ({"mean": [0.5, 0.5], "std": [1, 1, 1]}, [], "metadata (mean)"),
    ({"size": ["a", 3]}, [], "metadata (size)"),
    ({"std": [1, 0, 1]}, [], "metadata (std)"),
    ({}, ["--mean", "0.5,0.5"], "--mean"),
    ({}, ["--size", "0,4"], "--size"),
])
def test_preprocessing_values_are_checked(tmp_path, meta, flags, needle):
    from PIL import Image

    from vsonnx.model import set_metadata

    model = cnn_with_sites()
    set_metadata(model, {"vsonnx.preprocess": json.dumps(meta)})
    path = save(model, tmp_path / "m.onnx")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "imgs" / "a.png")
    before = snapshot(tmp_path)
    assert_user_error(run("fix", path, "--calib", tmp_path / "imgs", *flags), tmp_path, before, needle)


def test_dropout_ratio_above_1_never_reaches_torch(tmp_path):
    pytest.importorskip("torch")
    g = GraphBuilder()
    path = save(g.build(g.bn(g.dropout("x", 1.5, "d"), 3, "bn")), tmp_path / "m.onnx")
    before = snapshot(tmp_path)
    assert_user_error(run("fix", path, "--data-free", "--synthetic-steps", "2"), tmp_path, before, "outside [0, 1)")
    assert "outside [0, 1)" in run("scan", path).output


READERS = '''
import numpy as np
def raising():
    yield {"x": np.zeros((2, 3, 8, 8), np.float32)}
    raise RuntimeError("boom")
class Broken:
    def get_next(self):
        raise ValueError("bad reader")
def get_next():
    return Broken()
def none():
    return None
def scalars():
    return [1, 2, 3]
def strings():
    return [{"x": "hello"}]
def string_labels():
    return [{"x": np.zeros((2, 3, 8, 8), np.float32), "y": np.array(["cat", "dog"])}]
'''


@pytest.mark.parametrize("func,needle", [("raising", "RuntimeError: boom"), ("get_next", "ValueError: bad reader"),
                                         ("none", "returned NoneType"), ("scalars", "yielded int"),
                                         ("strings", "not an array of numbers"),
                                         ("string_labels", "labels 'y' is an array of <U3")])
def test_reader_failures_are_user_errors(tmp_path, func, needle):
    path = save(cnn_with_sites(), tmp_path / "m.onnx")
    (tmp_path / "readers.py").write_text(READERS)
    before = snapshot(tmp_path)
    r = run("eval" if func == "string_labels" else "fix", path,
            "--data" if func == "string_labels" else "--calib", f"{tmp_path}/readers.py:{func}")
    assert_user_error(r, tmp_path, before, needle)


@pytest.mark.parametrize("name,array", [("strings.npy", np.array(["a", "b"])), ("strings.npz", None)])
def test_arrays_of_strings_are_user_errors(tmp_path, name, array):
    path = save(cnn_with_sites(), tmp_path / "m.onnx")
    if array is None:
        np.savez(tmp_path / name, x=np.array(["a", "b"]))
    else:
        np.save(tmp_path / name, array)
    before = snapshot(tmp_path)
    assert_user_error(run("fix", path, "--calib", tmp_path / name), tmp_path, before)


@pytest.mark.parametrize("args,needle", [
    (["fix", "M", "--calib", "X", "--batch-size", "0"], "--batch-size"),
    (["fix", "M", "--calib", "X", "--batch-size", "-3", "--method", "population"], "--batch-size"),
    (["fix", "M", "--data-free", "--batch-size", "0"], "--batch-size"),
    (["eval", "M", "--data", "XY", "--batch-size", "0"], "--batch-size"),
    (["compare", "M", "M", "--data", "XY", "--batch-size", "-1"], "--batch-size"),
    (["scan", "M", "--calib", "X", "--batch-size", "0"], "--batch-size"),
    (["fix", "M", "--calib", "X", "--seed", "-1"], "--seed"),
    (["fix", "M", "--data-free", "--seed", "-1"], "--seed"),
    (["eval", "M", "--data", "XY", "--seed", "-2"], "--seed"),
    (["fix", "M", "--calib", "X", "--threads", "-1"], "--threads"),
    (["fix", "M", "--calib", "X", "--val", "XY", "--val-split", "0.2"], "alternatives"),
])
def test_run_settings_are_checked_on_every_command(tmp_path, args, needle):
    path = save(cnn_with_sites(), tmp_path / "m.onnx")
    x = np.zeros((8, 3, 8, 8), np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "xy.npz", x=x, y=np.zeros(8, np.int64))
    names = {"M": path, "X": tmp_path / "x.npy", "XY": tmp_path / "xy.npz"}
    before = snapshot(tmp_path)
    assert_user_error(run(*[names.get(a, a) for a in args]), tmp_path, before, needle)


def test_a_batch_larger_than_memory_is_refused_before_allocating(tmp_path):
    from PIL import Image

    path = save(cnn_with_sites(), tmp_path / "m.onnx")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    before = snapshot(tmp_path)
    r = run("fix", path, "--calib", tmp_path / "imgs", "--size", "100000,100000")
    assert_user_error(r, tmp_path, before, "memory available")


# -- 1. images: element types and bit depths; 4. resources ---------------------------------------------------
def test_integer_input_models_get_the_pixels(tmp_path):
    from PIL import Image

    from onnx import TensorProto

    from vsonnx.data import open_source

    g = GraphBuilder()
    cast = g.node("Cast", ["x"], "cast", to=TensorProto.FLOAT)
    model = g.build(g.bn(cast, 3, "bn"))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(tmp_path / "imgs" / "a.png")
    batch = next(open_source(tmp_path / "imgs", model).batches(4))
    x = batch.feeds["x"]
    assert x.dtype == np.uint8 and x[0, :, 0, 0].tolist() == [200, 100, 50]


def test_16_bit_grayscale_is_scaled_not_saturated(tmp_path):
    from PIL import Image

    from vsonnx.data.cifar import decode_rgb

    Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)).save(tmp_path / "g.png")
    assert decode_rgb(tmp_path / "g.png")[0, :, 0].tolist() == [0, 128, 255]


def test_huge_images_are_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    from vsonnx.data import cifar

    monkeypatch.setattr(cifar, "MAX_PIXELS", 10_000)
    path = save(cnn_with_sites(), tmp_path / "m.onnx")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (200, 200)).save(tmp_path / "imgs" / "big.png")
    before = snapshot(tmp_path)
    assert_user_error(run("fix", path, "--calib", tmp_path / "imgs"), tmp_path, before, "200 x 200 pixels")


def test_decode_budget_lets_one_large_item_through_alone():
    import threading
    import time

    from vsonnx.data import MemoryBudget

    budget, inside, peak = MemoryBudget(100), [0], [0]
    lock = threading.Lock()

    def work(n):
        with budget.hold(n):
            with lock:
                inside[0] += n
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= n

    threads = [threading.Thread(target=work, args=(n,)) for n in (60, 60, 150, 30, 30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 150  # never two holders above the budget; the 150 one ran alone


def test_skipped_files_are_reported(tmp_path):
    from PIL import Image

    path = save(cnn_with_sites(), tmp_path / "m.onnx")
    root = tmp_path / "data"
    (root / "cat" / "nested").mkdir(parents=True)
    for p in (root / "cat" / "a.png", root / "stray.png", root / "cat" / "nested" / "b.png"):
        Image.new("RGB", (8, 8)).save(p)
    (root / "cat" / "notes.txt").write_text("x")
    r = run("fix", path, "--calib", root, "--batch-size", 2, "--method", "population", "-o", tmp_path / "o.onnx")
    assert r.exit_code == 0 and "on 1 samples" in r.output  # only cat/a.png was read
    assert "skipped 1 images at the top level beside class folders" in r.output
    assert "skipped 1 folders nested inside a class folder" in r.output
    assert "skipped 1 files that are not images" in r.output


# -- 5. codes and messages ------------------------------------------------------------------------------------
def test_ctrl_c_exits_130_without_traceback_or_leftovers(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    path = save(cnn_with_sites(), tmp_path / "m.onnx")
    (tmp_path / "slow.py").write_text(f'''
import time, numpy as np
from pathlib import Path
def slow():
    Path({str(tmp_path / "started")!r}).write_text("x")
    for _ in range(1000):
        time.sleep(0.1)
        yield {{"x": np.zeros((2, 3, 8, 8), np.float32)}}
''')
    proc = subprocess.Popen([sys.executable, "-m", "vsonnx", "fix", path, "--calib", f"{tmp_path}/slow.py:slow",
                             "--method", "population", "-o", tmp_path / "out.onnx"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "Interrupted." in err
    assert not (tmp_path / "out.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["m.onnx", "slow.py", "started"]


def test_onnxruntime_log_lines_do_not_precede_the_error(tmp_path):
    import subprocess
    import sys

    g = GraphBuilder()
    h = g.bn(g.dropout("x", 0.5, "d"), 3, "bn")
    h = g.node("Reshape", [h, g.init("shape", np.array([2, -1], np.int64))], "reshape")  # batch 2 baked in
    path = save(g.build(g.gemm(h, 192, 5)), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.zeros((8, 3, 8, 8), np.float32), y=np.zeros(8, np.int64))
    r = subprocess.run([sys.executable, "-m", "vsonnx", "eval", path, "--data", tmp_path / "d.npz", "--batch-size",
                        "4"], capture_output=True, text=True)
    assert r.returncode == 3 and r.stderr.startswith("Error: onnxruntime failed on a batch")


def if_model_with_inner_bn():
    """x -> If(cond: then = Dropout -> BN, else = Identity): the only BN lives in a subgraph."""
    from onnx import TensorProto, helper

    g = GraphBuilder()
    inner = [helper.make_node("Dropout", ["x"], ["d"], name="drop"),
             helper.make_node("BatchNormalization", ["d", "s", "b", "m", "v"], ["y"], name="inner_bn")]
    init = [numpy_helper.from_array(np.ones(3, np.float32), n) for n in ("s", "v")] + \
           [numpy_helper.from_array(np.zeros(3, np.float32), n) for n in ("b", "m")]
    then = helper.make_graph(inner, "then", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], init)
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "else", [],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    cond = g.init("cond", np.array(True))
    out = g.node("If", [cond], "branch", then_branch=then, else_branch=other)
    return g.build(out)


def test_bns_inside_subgraphs_are_listed_and_refused_by_name(tmp_path):
    path = save(if_model_with_inner_bn(), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.zeros((8, 3, 8, 8), np.float32))
    scanned = run("scan", path)
    assert "branch/then_branch/inner_bn" in scanned.output and scanned.exit_code == 0
    scanned = json.loads(run("scan", path, "--json").output)
    assert scanned["subgraph_batchnorms"] == ["branch/then_branch/inner_bn"]
    assert scanned["subgraph_fix"] == {"branch/then_branch/inner_bn": f"refused: {SUBGRAPH}"}  # the rewrite pass's
    row = next(line for line in run("scan", path).output.splitlines() if "inner_bn" in line)
    assert "refused: 7: inside an If/Loop/Scan subgraph" in row  # the text table shows the same plan
    before = snapshot(tmp_path)
    for args in (["--calib", tmp_path / "x.npy"], ["--data-free", "--synthetic", "0"]):
        assert_user_error(run("fix", path, *args), tmp_path, before, "'branch/then_branch/inner_bn': 7:")


def test_named_sites_on_a_legacy_export_with_identity_routed_statistics(tmp_path):
    g = GraphBuilder()
    h = g.node("Relu", [g.conv("x", 3, 4, name="c1")], "relu")
    stats = [g.node("Identity", [g.init(n, v)], f"id_{n}") for n, v in
             (("m", np.zeros(4, np.float32)), ("v", np.full(4, 3.0, np.float32)))]
    h = g.node("BatchNormalization", [g.conv(h, 4, 4, name="c2"), g.init("s", np.ones(4, np.float32)),
                                      g.init("b", np.zeros(4, np.float32)), *stats], "bn")
    path = save(g.build(h), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32))
    r = run("fix", path, "--calib", tmp_path / "x.npy", "--dropout", "relu_out=0.5", "-o", tmp_path / "o.onnx",
            "--json")
    report = json.loads(r.output[r.output.index("{"):])
    assert r.exit_code == 0 and [b["name"] for b in report["batchnorms"]] == ["bn"]
    # dropout off at inference: the BN's new statistics are the moments of c2's output (onnxruntime without
    # optimisations up to that tensor, numpy over N, H, W), written behind the Identity nodes
    import onnxruntime as ort
    from onnx import helper as onnx_helper

    probe = load_model(path)
    probe.graph.output.append(onnx_helper.make_tensor_value_info("c2_out", 1, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    y = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        ["c2_out"], {"x": np.load(tmp_path / "x.npy")})[0].astype(np.float64)
    np.testing.assert_allclose(report["batchnorms"][0]["new_mean"], y.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(report["batchnorms"][0]["new_var"], y.var(axis=(0, 2, 3)), rtol=1e-4)
    m, v = bn_values(load_model(tmp_path / "o.onnx"), "bn")
    np.testing.assert_allclose(v, y.var(axis=(0, 2, 3)), rtol=1e-4)


def test_an_unwritable_plot_path_fails_before_measuring(tmp_path):
    path = save(cnn_with_sites(), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.zeros((8, 3, 8, 8), np.float32))
    before = snapshot(tmp_path)
    r = run("scan", path, "--calib", tmp_path / "x.npy", "--plot", "/proc/vsonnx-shift.png")
    assert_user_error(r, tmp_path, before, "/proc")
    assert "writable --plot path" in r.output
    r = run("scan", path, "--calib", tmp_path / "x.npy", "--plot", tmp_path / "missing" / "shift.png")
    assert_user_error(r, tmp_path, before, "does not exist")
    assert "another --plot path" in r.output


def test_an_operator_shape_inference_cannot_follow_is_named(tmp_path):
    """onnxruntime's offline optimisation writes com.microsoft operators (FusedConv, Gelu, ...) that onnx shape
    inference does not know: the BN after one has an input of unknown rank, and the error names the operator."""
    from onnx import helper as onnx_helper

    model = cnn_with_sites()
    first_bn = next(i for i, n in enumerate(model.graph.node) if n.op_type == "BatchNormalization")
    bn = model.graph.node[first_bn]
    gelu = onnx_helper.make_node("Gelu", [bn.input[0]], ["gelu_out"], name="gelu", domain="com.microsoft")
    bn.input[0] = "gelu_out"
    model.graph.node.insert(first_bn, gelu)
    model.opset_import.append(onnx_helper.make_opsetid("com.microsoft", 1))
    path = save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32))
    before = snapshot(tmp_path)
    assert_user_error(run("fix", path, "--calib", tmp_path / "x.npy", "-o", tmp_path / "o.onnx"), tmp_path, before,
                      "does not follow com.microsoft:Gelu")
    assert run("scan", path).exit_code == 0


def test_a_model_vsonnx_already_fixed_is_not_corrected_twice(tmp_path):
    """Relative corrections, distill, data-free and choosing start from the training-time statistics a fixed
    model no longer holds: refused (exit 3, nothing written); batch and population re-estimate from the data
    alone and run again with a warning, giving what they give on the original model."""
    path = save(cnn_with_sites(), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32))
    x = tmp_path / "x.npy"
    assert run("fix", path, "--calib", x, "--method", "relative", "-o", tmp_path / "once.onnx").exit_code == 0
    before = snapshot(tmp_path)
    for extra in (["--calib", x, "--method", "relative"], ["--calib", x, "--method", "distill", "--steps", "2"],
                  ["--data-free"], ["--calib", x, "--val-split", "0.25"], ["--calib", x, "--dropout", "bn_direct=0.5"]):
        assert_user_error(run("fix", tmp_path / "once.onnx", *extra, "-o", tmp_path / "twice.onnx"), tmp_path, before,
                          "was already fixed by vsonnx (relative)")
    assert "written by vsonnx fix (relative)" in run("scan", tmp_path / "once.onnx").output
    r = run("fix", tmp_path / "once.onnx", "--calib", x, "--method", "population", "-o", tmp_path / "again.onnx")
    assert r.exit_code == 0 and "already fixed by vsonnx (relative); population replaces" in r.output
    assert run("fix", path, "--calib", x, "--method", "population", "-o", tmp_path / "direct.onnx").exit_code == 0
    again, direct = ({t.name: numpy_helper.to_array(t) for t in load_model(tmp_path / f).graph.initializer}
                     for f in ("again.onnx", "direct.onnx"))
    for name, value in direct.items():  # equal up to float32 rounding (moments are taken about the stored mean)
        np.testing.assert_allclose(again[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
