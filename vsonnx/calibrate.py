"""Re-estimating BatchNormalization statistics with forward passes only (DESIGN 5.2, 5.3).

Statistics come from extra graph outputs added to a *working copy* of the model (never from fetching
whole activations). For a BN input x of shape [N, C, ...] the copy computes per-sample moments of x shifted
by the BN's stored running mean s (close to the real mean, so E[y^2] - E[y]^2 does not cancel badly):

    y = x - s;   g1 = GlobalAveragePool(y);   g2 = GlobalAveragePool(y * y)        ([N, C, 1, ...])

(rank-2 inputs [N, C]: g1 = y, g2 = y * y). Global average pooling keeps onnxruntime's blocked (NCHWc)
convolution layout intact, where ReduceMean over the batch axis would force layout conversions. The
[N, C] results are combined in float64 on the host: per-sample moments make the statistics independent of
batching, and they are tiny compared with the activations.

Methods:
- ``batch`` (the paper's "Adjust", PyTorch-equivalent): dropout off; every recalibrated BN normalises with
  its *batch* mean s + mean_n(g1) and biased variance mean_n(g2) - mean_n(g1)^2 during the pass (the BN node
  is fed these computed statistics); new mean = average of batch means, new var = average of unbiased batch
  variances, equal weight per batch. Equals PyTorch (BN modules in train mode, Dropout in eval,
  momentum=None) on the same batches.
- ``population`` (exact inference semantics): each BN gets the mean and population variance of its input
  over the whole calibration set while every recalibrated BN upstream already uses its new statistics.
  BNs are grouped by *level* (longest chain of recalibrated BNs upstream) and measured level by level. By
  default (vsonnx.staged) each pass runs only its stage of the graph and reads earlier stages' tensors
  back from a disk spill, so every node is computed once; graphs with subgraphs fall back to one pruned
  pass per level. Moments merge exactly (Chan), so the result does not depend on batch size or order.
- ``relative``: two ``batch`` passes over the same samples, with Dropout active as in training (seeded,
  graph optimisations off) and off; the change between them is carried over to the stored statistics
  (stats.transfer_change) instead of replacing them, so what they describe beyond the dropout noise (e.g.
  augmented training images) is kept.

Refuses: batch size 1 for ``batch``/``relative`` (unbiased variance undefined); BNs whose input rank is
unknown; for ``relative``, Dropout of opsets below 12 (no training mode to simulate).
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .data import ReplaySource, Source, check_finite
from .errors import VsonnxError
from .graph import GraphIndex, attribute
from .model import default_opset
from .runtime import make_session, run
from .stats import BatchAverage, ChannelMoments, transfer_change

METHODS = ("batch", "population", "relative")
DROPOUT_SEED = 0


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
def working_copy(model: onnx.ModelProto, keep_dropout_modes: bool = False) -> onnx.ModelProto:
    """A copy with dropout off (training_mode inputs forced false, unless ``keep_dropout_modes``), a
    symbolic batch dimension on every graph input and output, and no stale intermediate shapes."""
    work = copy.deepcopy(model)
    graph = work.graph
    false_name = "vsonnx_false"
    for node in graph.node if not keep_dropout_modes else []:
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


class TensorShapes(dict):
    """tensor name -> shape (None for unknown dims); ``dtypes``: tensor name -> ONNX element type."""

    def __init__(self):
        super().__init__()
        self.dtypes: dict[str, int] = {}


def tensor_shapes(model: onnx.ModelProto) -> TensorShapes:
    """Shape (None for unknown dims) and element type of every tensor shape inference can tell."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    shapes = TensorShapes()
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = value.type.tensor_type
        if t.elem_type:
            shapes.dtypes[value.name] = t.elem_type
        if t.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return shapes


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

    def reduce(self, op: str, x: str, out: str, axes: list[int], keepdims: int = 1) -> str:
        if self.opset >= 18:
            axes_name = self.const(f"{out}_axes", np.array(axes, np.int64))
            self.nodes.append(helper.make_node(op, [x, axes_name], [out], keepdims=keepdims))
        else:
            self.nodes.append(helper.make_node(op, [x], [out], axes=axes, keepdims=keepdims))
        return out

    def node(self, op: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def sample_moments(self, tap: "Tap", prefix: str):
        """(g1, g2, size): per-sample means of y = x - shift and of y^2 ([N, C, 1...] tensor names) and the
        elements per sample and channel: an int when static, else the name of a Shape(x) output (a
        Shape node on x would force onnxruntime to convert x out of its blocked layout)."""
        x, rank, channels, shift, elements = tap.tensor, tap.rank, tap.channels, tap.shift, tap.elements
        bshape = [1, channels] + [1] * (rank - 2)
        np_dtype = helper.tensor_dtype_to_np_dtype(tap.dtype)
        s = self.const(f"{prefix}_shift", np.asarray(shift, np_dtype).reshape(bshape))
        y = self.node("Sub", [x, s], f"{prefix}_y")
        if tap.dtype != TensorProto.FLOAT:  # float16/bfloat16/double inputs: moments in float32
            y = self.node("Cast", [y], f"{prefix}_y32", to=TensorProto.FLOAT)
        yy = self.node("Mul", [y, y], f"{prefix}_yy")
        shape = elements if rank == 2 or elements is not None else self.node("Shape", [x], f"{prefix}_shape")
        if rank == 2:
            return y, yy, 1
        if isinstance(shape, str):
            self.int64_outputs.add(shape)
        g1 = self.node("GlobalAveragePool", [y], f"{prefix}_g1")
        g2 = self.node("GlobalAveragePool", [yy], f"{prefix}_g2")
        return g1, g2, shape

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


@dataclass
class Tap:
    """A tensor whose per-channel moments a pass measures, as moments of (x - shift)."""

    tensor: str
    rank: int
    channels: int
    shift: np.ndarray
    elements: int | None  # per sample and channel, when static
    dtype: int = TensorProto.FLOAT  # ONNX element type of the tensor; moments are taken in float32


def bn_tap(index: GraphIndex, node: onnx.NodeProto, shapes: dict[str, tuple]) -> Tap:
    """The input of a BN, shifted by its stored running mean."""
    shape = shapes.get(node.input[0])
    if shape is None or len(shape) < 2:
        raise VsonnxError(f"the rank of the input of BatchNormalization '{index.node_name(node)}' is unknown "
                          f"or below 2.", "run onnx shape inference / re-export with static ranks.")
    mean = index.constant(node.input[3])
    scale = index.constant(node.input[1])
    channels = int(np.asarray(scale if scale is not None else mean).size)
    shift = np.zeros(channels, np.float32) if mean is None else np.asarray(mean, np.float32).reshape(-1)
    return Tap(node.input[0], len(shape), channels, shift, _static_elements(shape),
               shapes.dtypes.get(node.input[0], TensorProto.FLOAT))


def tensor_tap(tensor: str, shapes: dict[str, tuple]) -> Tap | None:
    """Any tensor [N, C, ...] with a static channel count (no shift); None when its shape is unknown."""
    shape = shapes.get(tensor)
    if shape is None or len(shape) < 2 or not shape[1]:
        return None
    return Tap(tensor, len(shape), int(shape[1]), np.zeros(shape[1], np.float32), _static_elements(shape),
               shapes.dtypes.get(tensor, TensorProto.FLOAT))


def _static_elements(shape: tuple) -> int | None:
    spatial = shape[2:]
    return int(np.prod(spatial)) if all(isinstance(d, int) and d > 0 for d in spatial) else None


def stored_statistics(model: onnx.ModelProto, names: list[str]) -> dict[str, BnStatistics]:
    """The running mean/var the BNs ``names`` hold now, in float64 (their inputs 3 and 4 must be constant)."""
    index = GraphIndex(model)
    nodes = _bn_nodes(model, names)
    return {n: BnStatistics(n, np.asarray(index.constant(nodes[n].input[3]), np.float64).reshape(-1),
                            np.asarray(index.constant(nodes[n].input[4]), np.float64).reshape(-1), 0)
            for n in names}


def dropout_seeds(seed: int, count: int) -> list[int]:
    """Seeds for ``count`` simulated Dropout nodes, drawn from ``seed``: onnxruntime's masks for nearby seeds
    (0, 1, ...) are correlated (measured: 6% less simulated noise two dropouts apart)."""
    return [int(s) for s in np.random.default_rng(seed).integers(1, 2**31 - 1, count)]


def activate_dropouts(model: onnx.ModelProto, seed: int = DROPOUT_SEED) -> None:
    """Set every Dropout of ``model`` (in place) to training mode, each with its own seed drawn from ``seed``."""
    if default_opset(model) < 12 and any(n.op_type == "Dropout" for n in model.graph.node):
        raise VsonnxError(f"Dropout of opset {default_opset(model)} has no training mode to simulate.",
                          "use --method batch or population.")
    graph = model.graph
    true_name, half_name = "vsonnx_dropout_on", "vsonnx_dropout_default_ratio"
    graph.initializer.extend([numpy_helper.from_array(np.array(True), true_name),
                              numpy_helper.from_array(np.array(0.5, np.float32), half_name)])
    dropouts = [n for n in graph.node if n.op_type == "Dropout"]
    for node, node_seed in zip(dropouts, dropout_seeds(seed, len(dropouts))):
        while len(node.input) < 3:
            node.input.append("")
        node.input[1] = node.input[1] or half_name
        node.input[2] = true_name
        for a in list(node.attribute):
            if a.name == "seed":
                node.attribute.remove(a)
        node.attribute.append(helper.make_attribute("seed", int(node_seed)))


def instrument_batch(model: onnx.ModelProto, targets: list[str], dropout_active: bool = False):
    """Working copy where each target BN normalises with its batch statistics (and every Dropout is in
    training mode with ``dropout_active``); returns (model, {bn: (g1, g2, elements or Shape output)},
    {bn: shift})."""
    work = working_copy(model, keep_dropout_modes=dropout_active)
    if dropout_active:
        activate_dropouts(work)
    shapes = tensor_shapes(work)
    index = GraphIndex(work)
    nodes = _bn_nodes(work, targets)
    builder = _Builder(work)
    outputs, shifts = {}, {}
    for k, name in enumerate(targets):
        node = nodes[name]
        tap = bn_tap(index, node, shapes)
        prefix = f"vsonnx_s{k}"
        g1, g2, size = builder.sample_moments(tap, prefix)
        axes = [a for a in range(tap.rank) if a != 1]
        shift = tap.shift
        m = builder.reduce("ReduceMean", g1, f"{prefix}_m", axes, keepdims=0)
        q = builder.reduce("ReduceMean", g2, f"{prefix}_q", axes, keepdims=0)
        m2 = builder.node("Mul", [m, m], f"{prefix}_m2")
        var = builder.node("Sub", [q, m2], f"{prefix}_var")
        mean = builder.node("Add", [m, builder.const(f"{prefix}_shift1", shift.astype(np.float32))], f"{prefix}_mean")
        stat_type = shapes.dtypes.get(node.input[3], TensorProto.FLOAT)
        if stat_type != TensorProto.FLOAT:  # the BN's mean/var type
            mean = builder.node("Cast", [mean], f"{prefix}_mean_t", to=stat_type)
            var = builder.node("Cast", [var], f"{prefix}_var_t", to=stat_type)
        node.input[3], node.input[4] = mean, var  # the BN now normalises with batch statistics
        outputs[name], shifts[name] = (g1, g2, size), shift.astype(np.float64)
    builder.finish(_fetch(outputs))
    _topological_sort(work)
    return work, outputs, shifts


def instrument_moments(model: onnx.ModelProto, taps: dict[str, Tap], new_stats: dict[str, BnStatistics],
                       keep_dropout_modes: bool = False):
    """Working copy where BNs in ``new_stats`` use them, every tap outputs per-sample moments of its
    tensor minus the tap's shift, and everything not needed for those outputs is pruned.
    Returns (model, {tap: (g1, g2, elements or Shape output)})."""
    work = working_copy(model, keep_dropout_modes)
    _write_statistics(work, new_stats)
    builder = _Builder(work)
    outputs = {key: builder.sample_moments(tap, f"vsonnx_p{k}") for k, (key, tap) in enumerate(taps.items())}
    fetch = _fetch(outputs)
    builder.finish(fetch)
    _prune_to(work, fetch)
    _topological_sort(work)
    return work, outputs


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
    fetch = _fetch(outputs)
    moments = {key: ChannelMoments(tap.channels) for key, tap in taps.items()}
    samples, batches = _run_pass(session, source, batch_size, fetch, label, progress,
                                 lambda b, n, got: accumulate_moments(moments, outputs, got, n))
    return unshift(moments, taps), samples, batches, session.get_providers()[0]


def accumulate_moments(moments: dict[str, ChannelMoments], outputs: dict, got: dict, n_samples: int) -> None:
    """Add one batch's per-sample moments (fetched ``got`` for the tap ``outputs``) to ``moments``."""
    for key, trio in outputs.items():
        elements, sample_mean, sample_m2 = _per_sample(got, trio, n_samples)
        moments[key].update_samples(elements, sample_mean, sample_m2)


def unshift(moments: dict[str, ChannelMoments], taps: dict[str, Tap]) -> dict[str, ChannelMoments]:
    """The taps measured x - shift: add each shift back to the mean (the variance is unchanged)."""
    for key, m in moments.items():
        m.mean = m.mean + taps[key].shift.astype(np.float64)
    return moments


def _write_statistics(model: onnx.ModelProto, stats: dict[str, BnStatistics]) -> None:
    """Point each BN's mean/var inputs at fresh initializers holding ``stats`` (working copies only)."""
    if not stats:
        return
    nodes = _bn_nodes(model, list(stats))
    inits = {t.name: t for t in model.graph.initializer}
    for k, (name, st) in enumerate(stats.items()):
        node = nodes[name]
        old = inits.get(node.input[3])
        dtype = helper.tensor_dtype_to_np_dtype(old.data_type) if old is not None else np.float32
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
    """Level of each target node (a BN, or any node whose output is corrected): the longest chain of
    targets strictly upstream of it."""
    index = GraphIndex(model)
    wanted = set(targets)
    depth: dict[str, int] = {}
    levels: dict[str, int] = {}
    for node in index.topological_order:
        d = max((depth.get(i, 0) for i in node.input if i), default=0)
        name = index.node_name(node)
        if name in wanted:
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


def _run_pass(session, source: Source, batch_size: int, fetch: list[str], label: str, progress: bool, consume,
              feeds=None):
    """Run ``session`` on every batch and hand ``consume(batch_index, n_samples, {name: value})`` the fetched
    outputs; ``feeds(batch_index, batch)`` builds the inputs (default: the batch's own feeds)."""
    bar = _Progress(label, source.size, progress)
    samples = batches = 0
    for b, batch in enumerate(source.batches(batch_size)):
        check_finite(batch, source)
        values = run(session, fetch, batch.feeds if feeds is None else feeds(b, batch))
        consume(b, len(batch), dict(zip(fetch, values)))
        samples += len(batch)
        batches += 1
        bar.step(len(batch))
    bar.close()
    if samples == 0:
        raise VsonnxError(f"data source '{source.describe()}' yielded no samples.", "check the source and --limit.")
    return samples, batches


def calibrate(model: onnx.ModelProto, source: Source, targets: list[str], *, method: str = "batch",
              batch_size: int = 128, device: str = "auto", threads: int | None = None,
              progress: bool = False) -> CalibrationResult:
    """Re-estimate the statistics of ``targets`` (BN node names) on ``source``."""
    if method not in METHODS:
        raise VsonnxError(f"unknown method '{method}'.", f"use one of {', '.join(METHODS)}.")
    if batch_size < 1:
        raise VsonnxError(f"batch size must be positive, got {batch_size}.", "pass --batch-size 2 or more.")
    start = time.perf_counter()
    if method in ("batch", "relative") and batch_size < 2:
        raise VsonnxError(f"the {method} method needs a batch size of at least 2 (batch statistics of one "
                          "sample are degenerate).", "pass --batch-size 32 or more, or --method population.")
    if method == "batch":
        result = _calibrate_batch(model, source, targets, batch_size, device, threads, progress)
    elif method == "relative":
        result = _calibrate_relative(model, ReplaySource(source), targets, batch_size, device, threads, progress)
    else:  # several passes over the same data: decode it once
        result = _population(model, ReplaySource(source), targets, batch_size, device, threads, progress)
    result.seconds = time.perf_counter() - start
    return result


def _fetch(outputs: dict) -> list[str]:
    """Output names to fetch: g1, g2 and, where the spatial size is not static, Shape(x)."""
    return [t for trio in outputs.values() for t in trio if isinstance(t, str)]


def _per_sample(got: dict, trio: tuple, n_samples: int):
    """(elements per sample and channel, per-sample means [N, C], per-sample sums of squared deviations
    [N, C]) in float64 from the fetched g1/g2 outputs (moments of x - shift)."""
    g1, g2, size = got[trio[0]], got[trio[1]], trio[2]
    elements = size if isinstance(size, int) else int(np.prod(got[size][2:]))
    mean = g1.reshape(n_samples, -1).astype(np.float64)
    m2 = np.maximum(g2.reshape(n_samples, -1).astype(np.float64) - mean * mean, 0.0) * elements
    return elements, mean, m2


def _calibrate_batch(model, source, targets, batch_size, device, threads, progress, dropout_active=False):
    work, outputs, shifts = instrument_batch(model, targets, dropout_active)
    # onnxruntime's graph optimisations eliminate Dropout even in training mode: keep them off then
    session = make_session(work, device=device, threads=threads, optimize=not dropout_active)
    fetch = _fetch(outputs)
    estimators = {}
    notes = []

    def consume(b, n_samples, got):
        for name, trio in outputs.items():
            elements, sample_mean, sample_m2 = _per_sample(got, trio, n_samples)
            if n_samples * elements < 2:
                notes.append(f"skipped a final batch of {n_samples} sample(s) for '{name}': fewer than 2 "
                             "elements per channel")
                continue
            batch = ChannelMoments(sample_mean.shape[1])
            batch.update_samples(elements, sample_mean, sample_m2)
            estimators.setdefault(name, BatchAverage(batch.mean.size)).update(batch.count, batch.mean + shifts[name],
                                                                                batch.var)

    label = "calibrating (batch, dropout on)" if dropout_active else "calibrating (batch)"
    samples, batches = _run_pass(session, source, batch_size, fetch, label, progress, consume)
    stats = {name: BnStatistics(name, e.mean, e.var, e.count) for name, e in estimators.items()}
    return CalibrationResult("batch", samples, batches, stats, 1, 0.0, session.get_providers()[0],
                             sorted(set(notes)))


def _calibrate_relative(model, source, targets, batch_size, device, threads, progress):
    on = _calibrate_batch(model, source, targets, batch_size, device, threads, progress, dropout_active=True)
    off = _calibrate_batch(model, source, targets, batch_size, device, threads, progress)
    stats = {}
    for name, stored in stored_statistics(model, list(off.statistics)).items():
        before, after = on.statistics[name], off.statistics[name]
        stats[name] = BnStatistics(name, *transfer_change(stored.mean, stored.var, (before.mean, before.var),
                                                          (after.mean, after.var)), after.count)
    return CalibrationResult("relative", off.samples, off.batches, stats, 2, 0.0, off.provider,
                             sorted(set(on.notes + off.notes)))


def _population(model, source, targets, batch_size, device, threads, progress):
    """Staged (each node computed once, stage boundaries spilled to disk) where the graph allows it, else
    one pruned pass per level."""
    from .staged import _SpillTooLarge, calibrate_population_staged, has_subgraphs

    if not has_subgraphs(model):
        try:
            return calibrate_population_staged(model, source, targets, batch_size=batch_size, device=device,
                                               threads=threads, progress=progress)
        except _SpillTooLarge:
            pass
    return _calibrate_population(model, source, targets, batch_size, device, threads, progress)


def _calibrate_population(model, source, targets, batch_size, device, threads, progress):
    levels = bn_levels(model, targets)
    index = GraphIndex(model)
    shapes = tensor_shapes(working_copy(model))
    nodes = _bn_nodes(model, targets)
    new_stats: dict[str, BnStatistics] = {}
    samples = batches = passes = 0
    provider = ""
    for level in sorted(set(levels.values())):
        taps = {t: bn_tap(index, nodes[t], shapes) for t in targets if levels[t] == level}
        moments, samples, batches, provider = measure_moments(
            model, source, taps, new_stats, batch_size=batch_size, device=device, threads=threads,
            progress=progress, label=f"calibrating (population, level {level + 1})")
        passes += 1
        for name, m in moments.items():
            new_stats[name] = BnStatistics(name, m.mean, m.var, m.count)
    return CalibrationResult("population", samples, batches, new_stats, passes, 0.0, provider)
