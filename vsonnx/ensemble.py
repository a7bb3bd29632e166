"""The dropout ensemble: the model with every Dropout on as in training, the label-free reference that
``--method distill`` fits and that ``--val`` without labels ranks candidates against (vsonnx.choose).

- ``scores_tensor``: which tensor holds the scores compared (the first graph output, or ``--scores NAME``;
  the input of a final Softmax/LogSoftmax, so that scores are logits) and with which loss: ``kl`` (softmax
  over axis 1, the class axis) for class scores [N, C]; other outputs (detection, segmentation,
  regression) must name the output and the loss (``kl`` or ``mse``), else they are refused.
- ``DropoutEnsemble``: an onnxruntime session of the working copy with the dropouts simulated in training
  mode (vsonnx.simulate.simulated_graph: seeded masks, a fresh one per run, channel-wise for Dropout1d/2d/3d),
  fetching the scores; ``probabilities(feeds, masks)`` averages softmax(scores) over ``masks`` runs.
- ``ensemble_divergence``: how far each candidate model is from the ensemble on data without labels.
- ``divergence``: per-sample KL(p || softmax(scores)) = sum_c p_c (log p_c - log q_c) (softmax over axis 1,
  summed over it and averaged over any further axes), disagreement with the ensemble's class
  [argmax q != argmax p] (``disagree``), or the mean squared difference for ``mse``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .data import Source, check_finite
from .errors import VsonnxError
from .graph import GraphIndex, tensor_shapes
from .simulate import simulated_graph
from .working_copy import to_model
from .runtime import cpu_provider, make_session, progress_bar, run

LOSSES = ("kl", "mse")


@dataclass(frozen=True)
class Scores:
    """The tensor compared between teacher and student (or ensemble and candidate) and the loss on it."""

    tensor: str
    loss: str


def scores_tensor(model: onnx.ModelProto, output: str | None = None, loss: str | None = None) -> Scores:
    """The scores to compare (see the module docstring); a user error for outputs that are not class
    scores unless ``output`` and ``loss`` say how to compare them."""
    if loss is not None and loss not in LOSSES:
        raise VsonnxError(f"unknown loss '{loss}'.", f"use one of {', '.join(LOSSES)}.")
    names = [o.name for o in model.graph.output]
    if output is not None and output not in names:
        raise VsonnxError(f"'{output}' is not an output of the model.", f"outputs: {', '.join(names)}.")
    name = output or names[0]
    shape = tensor_shapes(model).get(name)
    if shape is not None and len(shape) != 2 and (output is None or loss is None):
        raise VsonnxError(f"output '{name}' (rank {len(shape)}) is not class scores [N, classes]: the dropout "
                          "ensemble cannot be compared with a softmax over classes.",
                          "pass --scores OUTPUT and --loss kl (softmax over axis 1) or --loss mse.")
    producer = GraphIndex(model).producer.get(name)
    if producer is not None and producer.op_type in ("Softmax", "LogSoftmax") and (loss or "kl") == "kl":
        name = producer.input[0]  # compare logits: softmax of probabilities would flatten them
    return Scores(name, loss or "kl")


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def divergence(target: np.ndarray, scores: np.ndarray, loss: str) -> np.ndarray:
    """Per-sample loss of ``scores`` against ``target`` (probabilities for kl and disagree, scores for mse), float64;
    ``disagree``: 1 where the scores' class differs from the target's (the share of positions, if any)."""
    scores = np.asarray(scores, np.float64).reshape(len(scores), scores.shape[1] if scores.ndim > 1 else 1, -1)
    target = np.asarray(target, np.float64).reshape(scores.shape)
    if loss == "mse":
        return ((scores - target) ** 2).mean(axis=(1, 2))
    if loss == "disagree":
        return (scores.argmax(axis=1) != target.argmax(axis=1)).mean(axis=1)
    terms = target * (np.log(np.maximum(target, 1e-30)) - log_softmax(scores))
    return terms.sum(axis=1).mean(axis=1)


def scores_session(model: onnx.ModelProto, scores: Scores, *, dropout: bool = False, seed: int = 0,
                   channelwise: frozenset[str] = frozenset(), device: str = "auto", threads: int | None = None,
                   spinning: bool = True):
    """An onnxruntime session of the working copy that outputs the scores tensor, with the dropouts off, or
    simulated in training mode with ``dropout`` (seeded; ``channelwise`` nodes by channel); ``spinning``: see
    vsonnx.runtime.make_session."""
    graph, shapes = simulated_graph(model, dropout, seed=seed, channelwise=channelwise,
                                    fed=cpu_provider(device))
    dtypes = shapes.dtypes
    out = graph.tensors()[scores.tensor]
    out.dtype = helper.tensor_dtype_to_np_dtype(dtypes.get(scores.tensor, onnx.TensorProto.FLOAT))
    graph.outputs = [out]
    graph.cleanup()
    return make_session(to_model(graph, model), device=device, threads=threads, spinning=spinning, seed=seed)


class DropoutEnsemble:
    """Runs the model with dropout on (see the module docstring); ``seed`` fixes the sequence of masks."""

    def __init__(self, model: onnx.ModelProto, scores: Scores, *, channelwise: frozenset[str] = frozenset(),
                 seed: int = 0, device: str = "auto", threads: int | None = None, spinning: bool = True):
        self.scores = scores
        self.session = scores_session(model, scores, dropout=True, seed=seed, channelwise=channelwise,
                                      device=device, threads=threads, spinning=spinning)
        self.provider = self.session.get_providers()[0]

    def sample(self, feeds: dict) -> np.ndarray:
        """The scores of one run (one fresh mask per Dropout)."""
        return np.asarray(run(self.session, [self.scores.tensor], feeds)[0])

    def target(self, feeds: dict, masks: int = 1) -> np.ndarray:
        """What a candidate is compared with: the average over ``masks`` runs of softmax(scores) for kl, of
        the scores for mse (float64)."""
        total = None
        for _ in range(masks):
            got = self.sample(feeds).astype(np.float64)
            got = softmax(got) if self.scores.loss == "kl" else got
            total = got if total is None else total + got
        return total / masks


def ensemble_top1(model: onnx.ModelProto, source: Source, masks: int, *, channelwise: frozenset[str] = frozenset(),
                  seed: int = 0, device: str = "cpu", threads: int | None = None, batch_size: int = 500) -> float:
    """Top-1 % of the MC-dropout ensemble of the model's own weights on a labelled ``source``: softmax averaged
    over ``masks`` dropout masks per batch (what the weights hold, against which BN constants are judged)."""
    ensemble = DropoutEnsemble(model, scores_tensor(model), channelwise=channelwise, seed=seed, device=device,
                               threads=threads)
    hits = seen = 0
    for batch in source.batches(batch_size):
        hits += int((ensemble.target(batch.feeds, masks).argmax(1) == batch.labels).sum())
        seen += len(batch.labels)
    return 100.0 * hits / seen


def ensemble_divergence(model: onnx.ModelProto, models: list[onnx.ModelProto], source: Source, scores: Scores, *,
                        masks: int = 8, seed: int = 0, channelwise: frozenset[str] = frozenset(),
                        batch_size: int = 128, device: str = "auto", threads: int | None = None,
                        progress: bool = False, loss: str | None = None) -> list[np.ndarray]:
    """Per-sample divergence (``loss``, default the scores' own) of each of ``models`` (dropout off) from the
    dropout ensemble of ``model`` (``masks`` runs per batch), all on the same batches of ``source`` in the
    same order (labels unused)."""
    if masks < 1:
        raise VsonnxError(f"--val-masks must be at least 1, got {masks}.", "e.g. --val-masks 8.")
    ensemble = DropoutEnsemble(model, scores, channelwise=channelwise, seed=seed, device=device, threads=threads)
    sessions = [scores_session(m, scores, device=device, threads=threads) for m in models]
    names = [i.name for i in ensemble.session.get_inputs()]
    losses: list[list[np.ndarray]] = [[] for _ in models]
    with progress_bar("ranking against the dropout ensemble", source.size, progress) as bar:
        for batch in source.batches(batch_size):
            check_finite(batch, source)
            feeds = {n: batch.feeds[n] for n in names}
            target = ensemble.target(feeds, masks)
            for k, session in enumerate(sessions):
                losses[k].append(divergence(target, run(session, [scores.tensor], feeds)[0], loss or scores.loss))
            bar.update(len(batch))
    if not losses[0]:
        raise VsonnxError(f"data source '{source.describe()}' yielded no samples.", "check the validation data.")
    return [np.concatenate(parts) for parts in losses]
