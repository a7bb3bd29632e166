"""onnxruntime sessions: provider choice (quiet CUDA probe), threads, graph optimisation level.

``device``: ``cpu``; ``cuda`` (error when the CUDA provider cannot run); ``auto`` = CUDA when a probe
session really runs on it, else CPU. onnxruntime prints long errors when CUDA libraries are missing, so the
probe silences the logger and runs once per process.

``run_pass`` streams a data source through a session batch by batch with a progress bar (tqdm: rate and
ETA on stderr, only when asked for and stderr is a terminal); ``progress_bar`` serves the other long loops.
``measure_moments`` is the moments pass: a statistic-tap copy (vsonnx.taps) streamed through one session.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import onnx

from .data import Source, check_finite
from .errors import VsonnxError
from .model import model_bytes
from .random_feeds import DROPOUT_SEED, RANDOM_PREFIX, RandomFeeding
from .stats import BnStatistics, ChannelMoments
from .taps import Tap, accumulate_moments, fetch_names, instrument_moments, unshift

DEVICES = ("auto", "cpu", "cuda")


@functools.lru_cache(maxsize=1)
def cuda_works() -> bool:
    """True when a one-node session really runs on the CUDA execution provider."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    ort.set_default_logger_severity(4)  # silence the probe; restored to onnxruntime's default (warning) below
    try:
        with _silenced_stderr():
            session = ort.InferenceSession(probe.SerializeToString(), options, providers=[CUDA_PROVIDER])
            session.run(None, {"x": np.ones(1, np.float32)})
        return session.get_providers()[0] == "CUDAExecutionProvider"
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(2)


class _silenced_stderr:
    """Redirect file descriptor 2 (C++ libraries print there directly) for the duration of a block."""

    def __enter__(self):
        try:
            self._saved = os.dup(2)
            self._null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(self._null, 2)
        except OSError:
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            os.close(self._null)
        return False


def resolve_device(device: str) -> str:
    """'cpu' or 'cuda' for a requested device, raising VsonnxError when CUDA is asked for but absent."""
    if device not in DEVICES:
        raise VsonnxError(f"unknown device '{device}'.", f"use one of {', '.join(DEVICES)}.")
    if device == "cpu":
        return "cpu"
    if cuda_works():
        return "cuda"
    if device == "cuda":
        raise VsonnxError(
            "the CUDA execution provider of onnxruntime does not run on this machine.",
            "install onnxruntime-gpu with matching CUDA/cuDNN libraries, or use --device cpu.",
        )
    return "cpu"


def cpu_provider(device: str) -> bool:
    """Whether sessions for ``device`` run on onnxruntime's CPU provider: the only one the batch passes'
    training-mode BN and the fed dropout draws (uint16 comparisons) were tested on (no GPU here); on the
    CUDA provider the batch statistics are computed by operators in the graph and RandomUniformLike stays."""
    return resolve_device(device) == "cpu"


def import_torch(purpose: str, hint: str):
    """torch, or a user error saying that ``purpose`` needs it (with ``hint``)."""
    try:
        import torch
    except ImportError:
        raise VsonnxError(f"{purpose} needs torch, which is not installed.", hint) from None
    return torch


def torch_device(device: str) -> str:
    """The torch device for a requested one ('auto' takes CUDA when torch sees it)."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise VsonnxError("--device cuda: torch sees no CUDA device.", "use --device cpu or auto.")
    return "cpu"


# onnxruntime's CUDA provider runs float32 convolutions and MatMuls in TF32 (10-bit mantissa) by default. Measured
# on an H200 (tools/gpu_check.py, the two calibrated fixes of preresnet20-a05 and densenet40-a05): with TF32 the
# BN statistics it wrote were 3.1e-4 and 7.6e-4 (norm-relative) from the CPU provider's and top-1 moved by 1-2
# test images; in float32 1.2e-7 to 2.8e-7 and the same top-1, evaluation at 70-90% of TF32's images/s. The
# statistics and the accuracy that proves a fix are worth that.
CUDA_PROVIDER = ("CUDAExecutionProvider", {"use_tf32": "0"})


def session_providers(device: str) -> list:
    """onnxruntime's providers for a resolved device: CUDA in float32 with the CPU provider behind it (for the
    ops CUDA lacks), or the CPU provider alone."""
    return [CUDA_PROVIDER, "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


def make_session(model: onnx.ModelProto, *, device: str = "auto", optimize: bool = True,
                 threads: int | None = None, disabled_optimizers: list[str] | None = None,
                 spinning: bool = True, seed: int = DROPOUT_SEED):
    """An InferenceSession for an in-memory model (IR lowered to what the runtime reads).

    ``optimize=False`` disables graph optimisations (tests compare numerics that way: with them on,
    onnxruntime fuses Conv+BN and would hide a wrong rewrite). ``spinning=False`` lets onnxruntime's
    threads sleep as soon as a run ends instead of spinning for the next one: for a session that alternates
    with torch work on the same cores (the distillation's teacher), spinning steals those cores. A graph that
    reads random draws as inputs (simulated dropout) gets a RandomFeeding session drawing them from ``seed``."""
    import onnxruntime as ort

    resolved = resolve_device(device)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: failures reach the user as vsonnx's Error/Hint, not as log lines
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(model_bytes(model), options, providers=session_providers(resolved),
                                       disabled_optimizers=disabled_optimizers or [])
    except Exception as exc:
        raise VsonnxError(
            f"onnxruntime cannot load the model: {str(exc).splitlines()[0][:200]}",
            "check the model with `python -m onnx.checker MODEL`; it may use ops this runtime lacks.",
        ) from None
    if any(i.name.startswith(RANDOM_PREFIX) for i in session.get_inputs()):
        return RandomFeeding(session, seed)
    return session


def run(session, fetch: list[str] | None, feeds: dict):
    """session.run with onnxruntime's failures on this data turned into a user error."""
    try:
        return session.run(fetch, feeds)
    except Exception as exc:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feeds.items())
        raise VsonnxError(
            f"onnxruntime failed on a batch ({shapes}): {str(exc).splitlines()[0][:200]}",
            "if the model hard-codes its batch size (e.g. a Reshape to [1, -1]), pass that --batch-size; "
            "otherwise check the data's shape and preprocessing.",
        ) from None


def progress_bar(label: str, total: int | None, enabled: bool, unit: str = "sample"):
    """A tqdm bar on stderr (rate and ETA) when ``enabled`` and stderr is a terminal, else a silent one."""
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit=unit, disable=not (enabled and sys.stderr.isatty()), leave=False,
                file=sys.stderr, dynamic_ncols=True)


def run_pass(session, source: Source, batch_size: int, fetch: list[str], label: str, progress: bool, consume,
             feeds=None) -> tuple[int, int]:
    """Run ``session`` on every batch and hand ``consume(batch_index, n_samples, {name: value})`` the fetched
    outputs; ``feeds(batch_index, batch)`` builds the inputs (default: the batch's own feeds).
    Returns (samples, batches); a source that yields nothing is a user error."""
    return run_passes([(session, fetch, consume)], source, batch_size, label, progress, feeds)


def run_passes(runs: list[tuple], source: Source, batch_size: int, label: str, progress: bool,
               feeds=None, concurrent: bool = True) -> tuple[int, int]:
    """``run_pass`` for several (session, fetch, consume) at once: one pass over the source, every session
    run on each batch (``concurrent``: side by side, onnxruntime releasing the GIL, each session with its
    share of the threads, ``split_threads``; else one after the other), then each ``consume`` in order.
    Every session still sees the batches in order."""
    samples = batches = 0
    concurrent = concurrent and len(runs) > 1
    pool = ThreadPoolExecutor(len(runs) - 1) if concurrent else contextlib.nullcontext()
    with pool, progress_bar(label, source.size, progress) as bar:
        for b, batch in enumerate(source.batches(batch_size)):
            check_finite(batch, source)
            inputs = batch.feeds if feeds is None else feeds(b, batch)
            if concurrent:
                others = [pool.submit(run, session, fetch, inputs) for session, fetch, _ in runs[1:]]
                values = [run(runs[0][0], runs[0][1], inputs)] + [f.result() for f in others]
            else:
                values = [run(session, fetch, inputs) for session, fetch, _ in runs]
            for (_, fetch, consume), got in zip(runs, values):
                consume(b, len(batch), dict(zip(fetch, got)))
            samples += len(batch)
            batches += 1
            bar.update(len(batch))
    if samples == 0:
        raise VsonnxError(f"data source '{source.describe()}' yielded no samples.", "check the source and --limit.")
    return samples, batches


def split_threads(threads: int | None, parts: int) -> tuple[int, bool]:
    """(intra-op threads per session, whether ``parts`` sessions may run side by side): an equal share of
    ``threads`` (default: the cores this process may use) when it gives each at least one, else all of them
    to each session in turn, so that a run never uses more threads than asked for."""
    if not threads:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return (threads // parts, True) if threads >= parts else (threads, False)


def measure_moments(model: onnx.ModelProto, source: Source, taps: dict[str, Tap],
                    new_stats: dict[str, BnStatistics] | None = None, *, batch_size: int = 128,
                    device: str = "auto", threads: int | None = None, progress: bool = False,
                    label: str = "measuring", keep_dropout_modes: bool = False):
    """One pass: exact per-channel moments (ChannelMoments of x itself, shift added back) of every tap,
    with dropout off (or as the model says, with ``keep_dropout_modes``) and the BNs of ``new_stats``
    using them. Returns (moments, samples, batches, provider)."""
    work, outputs = instrument_moments(model, taps, new_stats or {}, keep_dropout_modes)
    # onnxruntime's graph optimisations eliminate Dropout even with training_mode=true: keep them off then
    session = make_session(work, device=device, threads=threads, optimize=not keep_dropout_modes)
    moments = {key: ChannelMoments(tap.channels) for key, tap in taps.items()}
    samples, batches = run_pass(session, source, batch_size, fetch_names(outputs), label, progress,
                                lambda b, n, got: accumulate_moments(moments, outputs, got, n))
    return unshift(moments, taps), samples, batches, session.get_providers()[0]
