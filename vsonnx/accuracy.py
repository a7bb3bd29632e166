"""Accuracy with onnxruntime: `vsonnx eval` and `vsonnx compare` (DESIGN 5.5).

The first graph output is taken as the class scores [N, classes]; top-1 and top-5 (when there are at
least 5 classes) are in percent. ``images_per_s`` counts only the time spent inside onnxruntime. Models run
through the same working copy as calibration (symbolic batch dimension, dropout off).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from .working_copy import working_copy
from .data import Source, check_finite, open_source, resolve_batch_size, source_identity
from .settings import check_settings
from .errors import VsonnxError, warn
from .model import get_metadata, input_model
from .runtime import make_session, progress_bar, run


@dataclass
class EvalReport:
    model: str
    samples: int
    top1: float
    top5: float | None
    provider: str
    images_per_s: float
    top1_ci95: tuple[float, float]  # Wilson score interval of top1 (wilson_interval), percent

    def to_dict(self) -> dict:
        return asdict(self)


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion hits / n, in percent: (p + z^2/2n +- z sqrt(p(1-p)/n +
    z^2/4n^2)) / (1 + z^2/n); unlike p +- z sqrt(p(1-p)/n) it stays inside [0, 100] and is not empty at 0 or n."""
    p, zz = hits / n, z * z / n
    centre, half = p + zz / 2, z * np.sqrt(p * (1 - p) / n + zz / (4 * n))
    return float(100 * (centre - half) / (1 + zz)), float(100 * (centre + half) / (1 + zz))


class Scorer:
    """Runs one model batch by batch and counts top-1/top-5 hits (feed every model the same batches)."""

    def __init__(self, model: onnx.ModelProto, device: str, threads: int | None, scores: str | None = None):
        self.session = make_session(working_copy(model), device=device, threads=threads)
        names = [o.name for o in self.session.get_outputs()]
        if scores is not None and scores not in names:
            raise VsonnxError(f"--scores '{scores}' is not an output of the model (outputs: {', '.join(names)}).",
                              "name the graph output that holds the class scores.")
        self.output = scores or names[0]
        self.seconds = 0.0
        self.correct1 = self.correct5 = self.samples = 0
        self.top5_ok = True
        self.hits: list[np.ndarray] = []  # top-1 hit per sample, in order (paired comparisons)

    def run(self, feeds: dict, labels: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        logits = run(self.session, [self.output], feeds)[0]
        self.seconds += time.perf_counter() - t0
        if logits.ndim < 2 or int(np.prod(logits.shape[2:])) != 1 or len(logits) != len(labels):
            raise VsonnxError(f"the model's output '{self.output}' has shape {tuple(logits.shape)} for {len(labels)} "
                              "samples; eval scores class scores [N, C] (or [N, C, 1, 1]).",
                              "name the output holding the class scores with --scores; other outputs (segmentation "
                              "maps, detections) are not what eval scores.")
        logits = logits.reshape(len(labels), -1)
        if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[1]):
            raise VsonnxError(f"labels from {labels.min()} to {labels.max()}, but the model has {logits.shape[1]} "
                              "class scores: such labels could never be predicted.",
                              "check that the data's classes are the model's (class folders, or labels 'y').")
        self.samples += len(labels)
        self.hits.append(logits.argmax(1) == labels)
        self.correct1 += int(self.hits[-1].sum())
        if logits.shape[1] >= 5:
            top5 = np.argpartition(-logits, 4, axis=1)[:, :5]
            self.correct5 += int((top5 == labels[:, None]).any(1).sum())
        else:
            self.top5_ok = False
        return logits

    def report(self, name: str) -> EvalReport:
        if self.samples == 0:
            raise VsonnxError("the evaluation data yielded no samples.", "check --data and --limit.")
        return EvalReport(name, self.samples, 100.0 * self.correct1 / self.samples,
                          100.0 * self.correct5 / self.samples if self.top5_ok else None,
                          self.session.get_providers()[0], self.samples / max(self.seconds, 1e-9),
                          wilson_interval(self.correct1, self.samples))


def _labelled(source: Source) -> Source:
    if not source.has_labels:
        raise VsonnxError(f"data source '{source.describe()}' has no labels; accuracy needs them.",
                          "use a folder of class folders, an .npz with 'y', or a reader yielding 'label'.")
    return source


def _open(model: onnx.ModelProto, data, limit, shuffle, seed, preprocess) -> Source:
    return _labelled(open_source(data, model, shuffle=shuffle, seed=seed, limit=limit, preprocess=preprocess))


def evaluate(model, data, *, batch_size: int | None = None, device: str = "auto", threads: int | None = None,
             limit: int | None = None, shuffle: bool = True, seed: int = 0, preprocess: dict | None = None,
             progress: bool = False, scores: str | None = None) -> EvalReport:
    """Top-1/top-5 accuracy of ``model`` (path or ModelProto) on labelled ``data``, its class scores read from
    the output ``scores`` (default: the first); ``batch_size`` None: the model's static batch size, else 256."""
    check_settings(batch_size=batch_size, seed=seed, threads=threads)
    proto, name = input_model(model)
    _warn_if_calibrated_on(proto, data, name)
    batch_size = resolve_batch_size(proto, batch_size, 256)
    source = _open(proto, data, limit, shuffle, seed, preprocess)
    return score_together({name: proto}, source, batch_size=batch_size, device=device, threads=threads,
                          progress=progress, scores=scores)[name]


def score_together(models: dict[str, onnx.ModelProto], source: Source, *, batch_size: int = 256,
                   device: str = "auto", threads: int | None = None, progress: bool = False,
                   scores: str | None = None) -> dict[str, EvalReport]:
    """Evaluate several models on the same labelled batches (the data is decoded once)."""
    scorers = run_scorers(models, source, batch_size=batch_size, device=device, threads=threads, progress=progress,
                          scores=scores)
    return {name: scorer.report(name) for name, scorer in scorers.items()}


def run_scorers(models: dict[str, onnx.ModelProto], source: Source, *, batch_size: int = 256, device: str = "auto",
                threads: int | None = None, progress: bool = False, scores: str | None = None) -> dict[str, Scorer]:
    """The Scorers of ``models`` after one pass over the labelled batches of ``source`` (decoded once), each
    reading the output ``scores`` (default: its first)."""
    scorers = {name: Scorer(model, device, threads, scores) for name, model in models.items()}
    with progress_bar("evaluating", source.size, progress) as bar:
        for batch in _labelled(source).batches(batch_size):
            check_finite(batch, source)
            for scorer in scorers.values():
                scorer.run(batch.feeds, batch.labels)
            bar.update(len(batch))
    return scorers


def paired_interval(a: Scorer, b: Scorer) -> tuple[float, float, float]:
    """Top-1 of b minus top-1 of a (points) on the same samples, with its paired 95% interval
    (``mean_interval`` of d_i = hit_b,i - hit_a,i)."""
    d = np.concatenate(b.hits).astype(np.float64) - np.concatenate(a.hits).astype(np.float64)
    return tuple(100 * v for v in mean_interval(d))


def mean_interval(d: np.ndarray, z: float = 1.96) -> tuple[float, float, float]:
    """The mean of per-sample differences ``d`` and its 95% interval, mean +- z sd(d) / sqrt(n) (normal
    approximation, fine for hundreds of samples and more; unbounded for one sample)."""
    half = z * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.inf
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def evaluate_candidates(model: onnx.ModelProto, candidates: list[onnx.ModelProto], data, *, batch_size: int = 256,
                        device: str = "auto", threads: int | None = None, limit: int | None = None,
                        preprocess: dict | None = None) -> list[float]:
    """Top-1 of each candidate on the same batches (data decoded once)."""
    source = _open(model, data, limit, True, 0, preprocess)
    reports = score_together({str(k): c for k, c in enumerate(candidates)}, source, batch_size=batch_size,
                             device=device, threads=threads)
    return [r.top1 for r in reports.values()]


@dataclass
class CompareReport:
    a: EvalReport
    b: EvalReport
    delta_top1: float
    agreement: float
    max_abs_diff: float
    delta_top1_ci95: tuple[float, float] = (float("nan"), float("nan"))  # paired, same samples

    def to_dict(self) -> dict:
        return {"a": self.a.to_dict(), "b": self.b.to_dict(), "delta_top1": self.delta_top1,
                "delta_top1_ci95": list(self.delta_top1_ci95), "agreement": self.agreement,
                "max_abs_diff": self.max_abs_diff}


def _warn_if_calibrated_on(model: onnx.ModelProto, data, name: str) -> None:
    """Accuracy on the data a fixed model was calibrated on (its provenance metadata: the data's name, then its
    SHA-256 as source_identity computes it) is optimistic: say so."""
    meta = get_metadata(model)
    if "vsonnx.calibration_sha256" not in meta or isinstance(data, Source):
        return
    if source_identity(data, hashed=False)["calibration_source"] != meta.get("vsonnx.calibration_source"):
        return  # another name: nothing to hash
    if source_identity(data).get("calibration_sha256") == meta["vsonnx.calibration_sha256"]:
        warn(f"{name} was calibrated on '{data}' (its provenance metadata): accuracy on the data a fix was "
             "calibrated on is optimistic; evaluate on held-out images.")


def _warn_if_data_contract_differs(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    """Both models are fed model A's preprocessing and labels: say so where B's metadata says otherwise."""
    meta_a, meta_b = get_metadata(a), get_metadata(b)
    for key in ("vsonnx.preprocess", "vsonnx.class_names"):
        if key in meta_a and key in meta_b and meta_a[key] != meta_b[key]:
            warn(f"model B's {key} metadata differs from model A's; both models are fed and scored with A's.")


def compare(model_a, model_b, data, *, batch_size: int | None = None, device: str = "auto", threads: int | None = None,
            limit: int | None = None, shuffle: bool = True, seed: int = 0,
            preprocess: dict | None = None, progress: bool = False, scores: str | None = None) -> CompareReport:
    """Evaluate two models on the same batches: accuracies, delta_top1 = b - a with its paired 95% interval,
    prediction agreement (%), max |logit difference|. Preprocessing metadata is taken from model A; class scores
    from the output ``scores`` of both (default: each one's first)."""
    check_settings(batch_size=batch_size, seed=seed, threads=threads)
    (a, name_a), (b, name_b) = input_model(model_a), input_model(model_b)
    _warn_if_data_contract_differs(a, b)
    for proto, name in ((a, name_a), (b, name_b)):
        _warn_if_calibrated_on(proto, data, name)
    batch_size = resolve_batch_size(a, batch_size, 256)
    source = _open(a, data, limit, shuffle, seed, preprocess)
    sa, sb = Scorer(a, device, threads, scores), Scorer(b, device, threads, scores)
    agree = 0
    max_diff = 0.0
    with progress_bar("comparing", source.size, progress) as bar:
        for batch in source.batches(batch_size):
            check_finite(batch, source)
            la, lb = sa.run(batch.feeds, batch.labels), sb.run(batch.feeds, batch.labels)
            if la.shape != lb.shape:
                raise VsonnxError(f"the models' outputs differ in shape ({la.shape} vs {lb.shape}).",
                                  "compare two versions of the same network.")
            agree += int((la.argmax(1) == lb.argmax(1)).sum())
            max_diff = max(max_diff, float(np.max(np.abs(la - lb))) if la.size else 0.0)
            bar.update(len(batch))
    ra, rb = sa.report(name_a), sb.report(name_b)
    _, low, high = paired_interval(sa, sb)
    return CompareReport(ra, rb, rb.top1 - ra.top1, 100.0 * agree / ra.samples, max_diff, (low, high))
