"""Re-estimating BatchNormalization statistics with forward passes only (DESIGN 5.2, 5.3).

Statistics come from extra graph outputs added to a *working copy* of the model (never from fetching
whole activations). For a BN input x of shape [N, C, ...] and a per-channel shift s (the BN's stored
running mean, which is close to the batch mean, so the one-pass formula below does not cancel badly):

    y = x - s;  m = ReduceMean(y);  q = ReduceSumSquare(y) / n;  n = Size(x) / C
    batch mean = s + m,  biased batch variance = q - m^2            (all reductions over every axis but 1)

``reduction="centered"`` uses the two-pass form instead: m = ReduceMean(x), q = ReduceSumSquare(x - m) / n.

Methods:
- ``batch`` (the paper's "Adjust", PyTorch-equivalent): dropout off; every recalibrated BN normalises with
  its *batch* mean and biased variance during the pass (BatchNormalization fed the computed statistics);
  new mean = average of batch means, new var = average of unbiased batch variances, equal weight per batch.
  Equals PyTorch (BN modules in train mode, Dropout in eval, momentum=None) on the same batches.
- ``population`` (exact inference semantics): each BN gets the mean and population variance of its input
  over the whole calibration set while every recalibrated BN upstream already uses its new statistics.
  BNs are grouped by *level* (longest chain of recalibrated BNs upstream); one pass per level, each pass
  running only the part of the graph its statistics need (a pruned copy), so early levels cost a fraction
  of a full pass. Moments merge exactly (Chan), so the result does not depend on batch size or order.

Refuses: batch size 1 for ``batch`` (unbiased variance undefined); BNs whose input rank is unknown.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .data import Source, check_finite
from .errors import VsonnxError
from .graph import GraphIndex, attribute
from .model import default_opset
from .runtime import make_session
from .stats import BatchAverage, ChannelMoments

METHODS = ("batch", "population")
REDUCTIONS = ("shifted", "centered")


@dataclass
class BnStatistics:
    """New statistics of one BN plus how many elements (population) or batches (batch) they average."""

    name: str
    mean: np.ndarray
    var: np.ndarray
    count: int


@dataclass
class CalibrationResult:
    method: str
    samples: int
    batches: int
    statistics: dict[str, BnStatistics]
    passes: int
    seconds: float
    provider: str
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# working copies
# --------------------------------------------------------------------------------------------------
def working_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with dropout off (training_mode inputs forced false), a symbolic batch dimension on every
    graph input and output, and no stale intermediate shape annotations."""
    work = copy.deepcopy(model)
    graph = work.graph
    false_name = "vsonnx_false"
    for node in graph.node:
        if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            node.input[2] = false_name
            if not any(t.name == false_name for t in graph.initializer):
                graph.initializer.append(numpy_helper.from_array(np.array(False), false_name))
        if node.op_type == "Dropout" and attribute(node, "is_test") == 0:
            for a in node.attribute:
                if a.name == "is_test":
                    a.i = 1
    inits = {t.name for t in graph.initializer}
    for value in list(graph.input) + list(graph.output):
        if value.name in inits or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) > 0:
            dims[0].Clear()
            dims[0].dim_param = "vsonnx_batch"
    del graph.value_info[:]
    return work


def tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor shape inference can tell."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    ranks = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = value.type.tensor_type
        if t.HasField("shape"):
            ranks[value.name] = len(t.shape.dim)
    return ranks


class _Builder:
    """Appends statistic nodes in the model's opset (ReduceMean/ReduceSumSquare axes moved to an input
    in opset 18)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.opset = default_opset(model) or 13
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.int64_outputs: set[str] = set()

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def reduce(self, op: str, x: str, out: str, axes: list[int], prefix: str, keepdims: int = 1) -> str:
        if self.opset >= 18:
            axes_name = self.const(f"{out}_axes", np.array(axes, np.int64))
            self.nodes.append(helper.make_node(op, [x, axes_name], [out], keepdims=keepdims))
        else:
            self.nodes.append(helper.make_node(op, [x], [out], axes=axes, keepdims=keepdims))
        return out

    def node(self, op: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def moments(self, x: str, rank: int, channels: int, shift: np.ndarray, prefix: str, reduction: str):
        """Names of (batch mean, biased batch variance, elements per channel) tensors, shapes [1,C,1..]."""
        axes = [a for a in range(rank) if a != 1]
        bshape = [1, channels] + [1] * (rank - 2)
        size = self.node("Size", [x], f"{prefix}_size")
        sizef = self.node("Cast", [size], f"{prefix}_sizef", to=TensorProto.FLOAT)
        n = self.node("Div", [sizef, self.const(f"{prefix}_C", np.array(channels, np.float32))], f"{prefix}_n")
        if reduction == "centered":
            mean = self.reduce("ReduceMean", x, f"{prefix}_mean", axes, prefix)
            d = self.node("Sub", [x, mean], f"{prefix}_d")
            ss = self.reduce("ReduceSumSquare", d, f"{prefix}_ss", axes, prefix)
            var = self.node("Div", [ss, n], f"{prefix}_var")
            return mean, var, n
        s = self.const(f"{prefix}_shift", np.asarray(shift, np.float32).reshape(bshape))
        y = self.node("Sub", [x, s], f"{prefix}_y")
        m = self.reduce("ReduceMean", y, f"{prefix}_m", axes, prefix)
        ss = self.reduce("ReduceSumSquare", y, f"{prefix}_ss", axes, prefix)
        q = self.node("Div", [ss, n], f"{prefix}_q")
        m2 = self.node("Mul", [m, m], f"{prefix}_m2")
        var = self.node("Sub", [q, m2], f"{prefix}_var")
        mean = self.node("Add", [m, s], f"{prefix}_mean")
        return mean, var, n

    def sample_moments(self, x: str, rank: int, channels: int, shift: np.ndarray, prefix: str):
        """Names of (per-sample mean [N,C], per-sample sum of squares [N,C] of x - shift, Shape(x)).
        Rank-2 inputs ([N, C]) have one element per sample and channel: x - shift itself is returned."""
        bshape = [1, channels] + [1] * (rank - 2)
        s = self.const(f"{prefix}_shift", np.asarray(shift, np.float32).reshape(bshape))
        y = self.node("Sub", [x, s], f"{prefix}_y")
        shape = self.node("Shape", [x], f"{prefix}_shape")
        self.int64_outputs.add(shape)
        if rank == 2:
            return y, None, shape
        spatial = list(range(2, rank))
        m = self.reduce("ReduceMean", y, f"{prefix}_m", spatial, prefix, keepdims=0)
        ss = self.reduce("ReduceSumSquare", y, f"{prefix}_ss", spatial, prefix, keepdims=0)
        return m, ss, shape

    def finish(self, outputs: list[str]) -> None:
        graph = self.model.graph
        graph.initializer.extend(self.inits)
        graph.node.extend(self.nodes)
        for name in outputs:
            dtype = TensorProto.INT64 if name in self.int64_outputs else TensorProto.FLOAT
            graph.output.append(helper.make_tensor_value_info(name, dtype, None))


def _bn_nodes(model: onnx.ModelProto, names: list[str]) -> dict[str, onnx.NodeProto]:
    index = GraphIndex(model)
    found = {index.node_name(n): n for n in model.graph.node if n.op_type == "BatchNormalization"}
    missing = [n for n in names if n not in found]
    if missing:
        raise VsonnxError(f"no BatchNormalization named {missing[:3]} in the model.", "check the names with vsonnx scan.")
    return {n: found[n] for n in names}


def _stat_inputs(index: GraphIndex, node: onnx.NodeProto, ranks: dict[str, int]):
    rank = ranks.get(node.input[0])
    if rank is None or rank < 2:
        raise VsonnxError(f"the rank of the input of BatchNormalization '{index.node_name(node)}' is unknown "
                          f"or below 2 ({rank}).", "run onnx shape inference / re-export with static ranks.")
    mean = index.constant(node.input[3])
    scale = index.constant(node.input[1])
    channels = int(np.asarray(scale if scale is not None else mean).size)
    shift = np.zeros(channels, np.float32) if mean is None else np.asarray(mean, np.float32).reshape(-1)
    return rank, channels, shift


def instrument_batch(model: onnx.ModelProto, targets: list[str], reduction: str = "shifted"):
    """Working copy where each target BN normalises with its batch statistics and outputs them."""
    work = working_copy(model)
    ranks = tensor_ranks(work)
    index = GraphIndex(work)
    nodes = _bn_nodes(work, targets)
    builder = _Builder(work)
    outputs: dict[str, tuple[str, str, str]] = {}
    for k, name in enumerate(targets):
        node = nodes[name]
        rank, channels, shift = _stat_inputs(index, node, ranks)
        prefix = f"vsonnx_s{k}"
        mean, var, n = builder.moments(node.input[0], rank, channels, shift, prefix, reduction)
        flat = builder.const(f"{prefix}_flat", np.array([-1], np.int64))
        mean1 = builder.node("Reshape", [mean, flat], f"{prefix}_mean1")
        var1 = builder.node("Reshape", [var, flat], f"{prefix}_var1")
        node.input[3], node.input[4] = mean1, var1  # BN now normalises with batch statistics
        outputs[name] = (mean1, var1, n)
    builder.finish([t for trio in outputs.values() for t in trio])
    _topological_sort(work)
    return work, outputs


def instrument_population(model: onnx.ModelProto, measure: list[str], new_stats: dict[str, BnStatistics]):
    """Working copy where BNs in ``new_stats`` use them, BNs in ``measure`` output per-sample moments of
    their input minus a shift (the stored mean), and everything not needed for those outputs is pruned.
    Returns (model, {bn: (mean, sum of squares or None, shape) output names}, {bn: shift})."""
    work = working_copy(model)
    _write_statistics(work, new_stats)
    ranks = tensor_ranks(work)
    index = GraphIndex(work)
    nodes = _bn_nodes(work, measure)
    builder = _Builder(work)
    outputs, shifts = {}, {}
    for k, name in enumerate(measure):
        rank, channels, shift = _stat_inputs(index, nodes[name], ranks)
        outputs[name] = builder.sample_moments(nodes[name].input[0], rank, channels, shift, f"vsonnx_p{k}")
        shifts[name] = shift.astype(np.float64)
    fetch = [t for trio in outputs.values() for t in trio if t]
    builder.finish(fetch)
    _prune_to(work, fetch)
    _topological_sort(work)
    return work, outputs, shifts


def _write_statistics(model: onnx.ModelProto, stats: dict[str, BnStatistics]) -> None:
    """Point each BN's mean/var inputs at fresh initializers holding ``stats`` (working copies only)."""
    if not stats:
        return
    nodes = _bn_nodes(model, list(stats))
    for k, (name, st) in enumerate(stats.items()):
        node = nodes[name]
        dtype = np.float32
        for slot, value in ((3, st.mean), (4, st.var)):
            tensor_name = f"vsonnx_new_{k}_{slot}"
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), tensor_name))
            node.input[slot] = tensor_name


def _prune_to(model: onnx.ModelProto, outputs: list[str]) -> None:
    """Keep only the nodes needed to compute ``outputs``; they become the only graph outputs."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    needed, stack, keep = set(), list(outputs), set()
    while stack:
        t = stack.pop()
        if t in needed:
            continue
        needed.add(t)
        node = producer.get(t)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(i for i in node.input if i)
    kept = [n for n in graph.node if id(n) in keep]
    del graph.node[:]
    graph.node.extend(kept)
    kept_outputs = [o for o in graph.output if o.name in set(outputs)]
    del graph.output[:]
    graph.output.extend(kept_outputs)
    used = {i for n in kept for i in n.input}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    inputs = [i for i in graph.input if i.name in used]
    del graph.input[:]
    graph.input.extend(inputs)


def _topological_sort(model: onnx.ModelProto) -> None:
    order = GraphIndex(model).topological_order
    del model.graph.node[:]
    model.graph.node.extend(order)


def bn_levels(model: onnx.ModelProto, targets: list[str]) -> dict[str, int]:
    """Level of each target BN: the longest chain of target BNs strictly upstream of it."""
    index = GraphIndex(model)
    wanted = set(targets)
    depth: dict[str, int] = {}
    levels: dict[str, int] = {}
    for node in index.topological_order:
        d = max((depth.get(i, 0) for i in node.input if i), default=0)
        name = index.node_name(node)
        if node.op_type == "BatchNormalization" and name in wanted:
            levels[name] = d
            d += 1
        for out in node.output:
            depth[out] = d
    return levels


# --------------------------------------------------------------------------------------------------
# passes
# --------------------------------------------------------------------------------------------------
class _Progress:
    def __init__(self, label: str, total: int | None, enabled: bool):
        self.label, self.total, self.done = label, total, 0
        self.enabled = enabled and sys.stderr.isatty()

    def step(self, n: int) -> None:
        self.done += n
        if self.enabled:
            total = f"/{self.total}" if self.total else ""
            sys.stderr.write(f"\r{self.label}: {self.done}{total} samples")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _run_pass(session, source: Source, batch_size: int, fetch: list[str], label: str, progress: bool, consume):
    bar = _Progress(label, source.size, progress)
    samples = batches = 0
    for batch in source.batches(batch_size):
        check_finite(batch, source)
        values = session.run(fetch, batch.feeds)
        consume(len(batch), values)
        samples += len(batch)
        batches += 1
        bar.step(len(batch))
    bar.close()
    if samples == 0:
        raise VsonnxError(f"data source '{source.describe()}' yielded no samples.", "check the source and --limit.")
    return samples, batches


def calibrate(model: onnx.ModelProto, source: Source, targets: list[str], *, method: str = "batch",
              batch_size: int = 128, device: str = "auto", threads: int | None = None,
              reduction: str = "shifted", progress: bool = False) -> CalibrationResult:
    """Re-estimate the statistics of ``targets`` (BN node names) on ``source``."""
    if method not in METHODS:
        raise VsonnxError(f"unknown method '{method}'.", f"use one of {', '.join(METHODS)}.")
    if reduction not in REDUCTIONS:
        raise VsonnxError(f"unknown reduction '{reduction}'.", f"use one of {', '.join(REDUCTIONS)}.")
    if batch_size < 1:
        raise VsonnxError(f"batch size must be positive, got {batch_size}.", "pass --batch-size 2 or more.")
    start = time.perf_counter()
    if method == "batch":
        if batch_size < 2:
            raise VsonnxError("the batch method needs a batch size of at least 2 (batch statistics of one "
                              "sample are degenerate).", "pass --batch-size 32 or more, or --method population.")
        result = _calibrate_batch(model, source, targets, batch_size, device, threads, reduction, progress)
    else:
        result = _calibrate_population(model, source, targets, batch_size, device, threads, progress)
    result.seconds = time.perf_counter() - start
    return result


def _calibrate_batch(model, source, targets, batch_size, device, threads, reduction, progress):
    work, outputs = instrument_batch(model, targets, reduction)
    session = make_session(work, device=device, threads=threads)
    fetch = [t for trio in outputs.values() for t in trio]
    estimators = {}
    notes = []

    def consume(n_samples, values):
        for k, name in enumerate(outputs):
            mean, var, n = values[3 * k], values[3 * k + 1], float(values[3 * k + 2])
            if n < 2:
                notes.append(f"skipped a final batch of {n_samples} sample(s) for '{name}': fewer than 2 "
                             "elements per channel")
                continue
            estimators.setdefault(name, BatchAverage(mean.size)).update(int(round(n)), mean.reshape(-1),
                                                                          np.maximum(var.reshape(-1), 0.0))

    samples, batches = _run_pass(session, source, batch_size, fetch, "calibrating (batch)", progress, consume)
    stats = {name: BnStatistics(name, e.mean, e.var, e.count) for name, e in estimators.items()}
    return CalibrationResult("batch", samples, batches, stats, 1, 0.0, session.get_providers()[0],
                             sorted(set(notes)))


def _calibrate_population(model, source, targets, batch_size, device, threads, progress):
    levels = bn_levels(model, targets)
    new_stats: dict[str, BnStatistics] = {}
    samples = batches = passes = 0
    provider = ""
    for level in sorted(set(levels.values())):
        measure = [t for t in targets if levels[t] == level]
        work, outputs, shift_of = instrument_population(model, measure, new_stats)
        session = make_session(work, device=device, threads=threads)
        provider = session.get_providers()[0]
        fetch = [t for trio in outputs.values() for t in trio if t]
        moments = {name: None for name in measure}

        def consume(n_samples, values, moments=moments, outputs=outputs):
            got = dict(zip(fetch, values))
            for name, (m, ss, shape) in outputs.items():
                sample_mean = got[m].reshape(n_samples, -1).astype(np.float64)
                elements = int(np.prod(got[shape][2:]))
                if ss is None:
                    sample_m2 = np.zeros_like(sample_mean)
                else:
                    sample_m2 = np.maximum(got[ss].reshape(n_samples, -1) - elements * sample_mean ** 2, 0.0)
                if moments[name] is None:
                    moments[name] = ChannelMoments(sample_mean.shape[1])
                moments[name].update_samples(elements, sample_mean, sample_m2)

        samples, batches = _run_pass(session, source, batch_size, fetch,
                                     f"calibrating (population, level {level + 1})", progress, consume)
        passes += 1
        for name, m in moments.items():  # moments are of x - shift: add the shift back
            new_stats[name] = BnStatistics(name, m.mean + shift_of[name], m.var, m.count)
    return CalibrationResult("population", samples, batches, new_stats, passes, 0.0, provider)
