"""onnxruntime sessions and passes: counts, the empty-source error, failures as user errors, quiet progress."""
import numpy as np
import pytest

from vsonnx.data import ArraySource, Source
from vsonnx.errors import VsonnxError
from vsonnx.runtime import (cuda_works, make_session, progress_bar, resolve_device, run, run_pass, run_passes,
                            split_threads)

from conftest import GraphBuilder


def relu_model():
    g = GraphBuilder()
    return g.build(g.node("Relu", ["x"], "r"))


def test_run_pass_streams_every_batch():
    model = relu_model()
    x = np.random.default_rng(0).standard_normal((10, 3, 8, 8)).astype(np.float32)
    session = make_session(model, device="cpu")
    seen = []
    samples, batches = run_pass(session, ArraySource.from_arrays(model, x, None, shuffle=False), 4, ["r_out"],
                                "test", False, lambda b, n, got: seen.append((b, n, got["r_out"].shape[0])))
    assert (samples, batches) == (10, 3) and seen == [(0, 4, 4), (1, 4, 4), (2, 2, 2)]


def test_run_passes_gives_every_session_every_batch_in_order():
    """Two sessions side by side (one a seeded random stream, whose masks depend on the order of its runs)
    give exactly what each gives alone, and the consumers see the batches in order."""
    g = GraphBuilder()
    noisy = g.build(g.node("Mul", ["x", g.node("RandomUniformLike", ["x"], "u", seed=3.0)], "y"))
    model = relu_model()
    x = np.random.default_rng(0).standard_normal((10, 3, 8, 8)).astype(np.float32)
    source = ArraySource.from_arrays(model, x, None, shuffle=False)
    alone = {}
    for m, fetch in ((model, "r_out"), (noisy, "y_out")):
        alone[fetch] = []
        run_pass(make_session(m, device="cpu"), source, 4, [fetch], "test", False,
                 lambda b, n, got, f=fetch: alone[f].append(got[f]))
    for concurrent in (True, False):
        runs = [(make_session(m, device="cpu", threads=1), [f], lambda b, n, got, f=f: together[f].append((b, got[f])))
                for m, f in ((model, "r_out"), (noisy, "y_out"))]  # fresh sessions: the random stream restarts
        together = {"r_out": [], "y_out": []}
        assert run_passes(runs, source, 4, "test", False, concurrent=concurrent) == (10, 3)
        for f in together:
            assert [b for b, _ in together[f]] == [0, 1, 2]
            for (_, a), b in zip(together[f], alone[f]):
                np.testing.assert_array_equal(a, b)
    # never more threads than asked for: one thread runs the sessions in turn
    assert split_threads(4, 2) == (2, True) and split_threads(1, 2) == (1, False) and split_threads(None, 2)[0] >= 1


def test_empty_source_is_a_user_error():
    model = relu_model()
    class Empty(Source):  # a reader that yields nothing
        has_labels, spec, size = False, "empty reader", None

        def batches(self, batch_size):
            return iter(())

    empty = Empty()
    with pytest.raises(VsonnxError, match="yielded no samples"):
        run_pass(make_session(model, device="cpu"), empty, 4, ["r_out"], "test", False, lambda *a: None)


def test_runtime_failures_are_user_errors():
    model = relu_model()
    with pytest.raises(VsonnxError, match="onnxruntime failed on a batch") as info:
        run(make_session(model, device="cpu"), None, {"x": np.zeros((2, 3), np.float32)})
    assert "--batch-size" in info.value.hint
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(VsonnxError, match="cannot load the model"):
        make_session(model, device="cpu")


def test_devices():
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(VsonnxError, match="unknown device"):
        resolve_device("tpu")
    if not cuda_works():
        assert resolve_device("auto") == "cpu"
        with pytest.raises(VsonnxError, match="CUDA"):
            resolve_device("cuda")


def test_cuda_sessions_run_float32_not_tf32(monkeypatch):
    """The CUDA provider gets use_tf32=0 (its default TF32 moved BN statistics by 3e-4 and flipped test
    predictions against the CPU provider on an H200), with the CPU provider behind it; the CPU device gets the
    CPU provider alone. What reaches onnxruntime is captured, so this runs without a GPU."""
    import onnxruntime as ort

    import vsonnx.runtime as runtime

    handed, real = [], ort.InferenceSession

    class Capture:
        def __init__(self, model, options, providers, **kwargs):
            handed.append(providers)
            self.inner = real(model, options, providers=["CPUExecutionProvider"], **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(ort, "InferenceSession", Capture)
    monkeypatch.setattr(runtime, "resolve_device", lambda device: device)
    make_session(relu_model(), device="cuda")
    make_session(relu_model(), device="cpu")
    assert handed == [[("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"],
                      ["CPUExecutionProvider"]]


def test_progress_is_quiet_when_not_asked_or_not_a_terminal():
    with progress_bar("x", 10, enabled=False) as bar:
        assert bar.disable
    with progress_bar("x", 10, enabled=True) as bar:  # pytest captures stderr: not a terminal
        assert bar.disable


def test_a_session_without_spinning_sleeps_between_runs_and_computes_the_same():
    """spinning=False (the distillation's teacher, which alternates with torch on the same cores) is set in the
    session's options; results do not depend on it."""
    model = relu_model()
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    quiet, default = make_session(model, device="cpu", spinning=False), make_session(model, device="cpu")
    assert quiet.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(Exception, match="allow_spinning"):  # not set: onnxruntime's default (spin)
        default.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    np.testing.assert_array_equal(run(quiet, ["r_out"], {"x": x})[0], run(default, ["r_out"], {"x": x})[0])
