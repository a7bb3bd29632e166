"""``population``: exact inference semantics (DESIGN 5.3).

Each BN gets the mean and population variance of its input over the whole calibration set while every
recalibrated BN upstream already uses its new statistics. BNs are grouped by *level* (longest chain of
recalibrated BNs upstream) and measured level by level. Moments merge exactly (Chan), so the result does not
depend on batch size or order.

Fast path (``staged``): the graph is cut into stages at the recalibrated BNs. Pass k runs only the nodes of
stage k (those whose inputs depend on exactly k levels of recalibrated BNs; a recalibrated BN itself runs in
the stage after its level, once its new statistics are known) and reads the tensors it needs from earlier
stages back from a spill folder on disk, where earlier passes wrote them batch by batch (vsonnx.spill: files
of tensors no later pass reads are rewritten in place rather than deleted, which is many times cheaper than
writing fresh file space; the page cache keeps reads cheap; writes and the next batch's reads run on
background threads while onnxruntime computes). Only passes that need the graph inputs read the data; the
others get batches of the sizes the first pass saw. Every node is computed once per sample, the statistics
are the same per-sample moments (so the answer is the same), and no activation is held in memory beyond one
batch.
Falls back to one pruned pass per level for graphs with subgraphs (If/Loop/Scan read outer tensors
implicitly), and when the spill would exceed ``MAX_SPILL_BYTES`` or cannot be written.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from ..data import Batch, Source, replayable
from ..graph import GraphIndex, has_subgraphs, tensor_shapes
from ..model import default_opset, scratch_folder
from ..runtime import make_session, measure_moments, run_pass
from ..taps import StatisticBuilder, Tap, accumulate_moments, bn_tap, fetch_names, unshift, write_statistics
from ..working_copy import node_name, to_model, working_copy, working_graph
from ..spill import Spill
from ..stats import BnStatistics, Estimate, ChannelMoments
from . import EstimateRequest

MAX_SPILL_BYTES = 16 << 30


def estimate(request: EstimateRequest) -> Estimate:
    """Staged where the graph allows it, else one pruned pass per level."""
    source = replayable(request.source)
    if not has_subgraphs(request.model):
        try:
            return _staged(request, source)
        except _SpillTooLarge:
            pass
    return _per_level(request, source)


def measure_levels(request: EstimateRequest, source, levels: dict[str, int], tap_of, model_of,
                   new_stats: dict[str, BnStatistics], label: str):
    """The naive population loop: per level (lowest first), one pruned pass measuring the taps of that level's
    targets (``tap_of(name)``) on ``model_of()`` with the BNs of ``new_stats`` already using them. Yields
    (moments by target, samples, batches, provider); the caller records the level's results (in
    ``new_stats``, or elsewhere) before the next level is measured."""
    for level in sorted(set(levels.values())):
        taps = {t: tap_of(t) for t, at in levels.items() if at == level}
        yield measure_moments(model_of(), source, taps, new_stats, batch_size=request.batch_size,
                              device=request.device, threads=request.threads, progress=request.progress,
                              label=f"{label}: level {level + 1}")


def _per_level(request: EstimateRequest, source) -> Estimate:
    model, targets = request.model, request.targets
    index = GraphIndex(model)
    shapes = tensor_shapes(working_copy(model))
    nodes = index.batchnorms(targets)
    levels = index.levels(targets)
    new_stats: dict[str, BnStatistics] = {}
    samples = batches = 0
    provider = ""
    for moments, samples, batches, provider in measure_levels(
            request, source, levels, lambda t: bn_tap(index, nodes[t], shapes), lambda: model, new_stats,
            "calibrating (population)"):
        new_stats.update({name: BnStatistics(name, m.mean, m.var, m.count, m.count) for name, m in moments.items()})
    return Estimate("population", samples, batches, new_stats, len(set(levels.values())), 0.0, provider)


class _SpillTooLarge(Exception):
    """The spilled tensors would exceed the budget: the caller uses the per-level passes instead."""


@dataclass
class _Plan:
    """Where every node and tensor of the working copy runs: ``passes`` node name -> pass (None: only static
    inputs, copied into every pass that needs it); ``stage`` tensor -> the pass producing it; ``taps`` per
    level; ``last_use`` tensor -> the last pass reading it."""

    passes: dict[str, int | None]
    stage: dict[str, int]
    taps: dict[int, dict[str, Tap]]
    last_use: dict[str, int]

    @property
    def count(self) -> int:
        return max(self.taps) + 1


def _plan(work: onnx.ModelProto, targets: list[str]) -> _Plan:
    index = GraphIndex(work)
    stage: dict[str, int] = {}
    passes: dict[str, int | None] = {}
    levels: dict[str, int] = {}
    graph_inputs = {i.name for i in work.graph.input}
    for node in index.topological_order:
        name = index.node_name(node)
        dynamic = [i for i in node.input if i and (i in stage or i in graph_inputs)]
        if not dynamic:
            passes[name] = None
            continue
        s = max(stage.get(i, 0) for i in dynamic)
        if name in targets:
            levels[name] = s
            passes[name], s = s + 1, s + 1
        else:
            passes[name] = s
        stage.update({out: s for out in node.output if out})
    shapes = tensor_shapes(work)
    taps: dict[int, dict[str, Tap]] = {}
    for t in targets:
        taps.setdefault(levels[t], {})[t] = bn_tap(index, index.by_name[t], shapes)
    last_use: dict[str, int] = {}
    for name, node in index.by_name.items():
        for i in node.input:
            if i in stage and passes[name] is not None:
                last_use[i] = max(last_use.get(i, -1), passes[name])
    for level, level_taps in taps.items():  # taps count as consumers in their level's pass
        for tap in level_taps.values():
            last_use[tap.tensor] = max(last_use.get(tap.tensor, -1), level)
    return _Plan(passes, stage, taps, last_use)


def _stage_graph(work: onnx.ModelProto, plan: _Plan, k: int, new_stats: dict[str, BnStatistics]):
    """The gs graph of pass k: its nodes (plus static helpers), earlier stages' tensors as graph inputs, the
    new statistics of BNs already measured, the taps of level k and the tensors later passes read as outputs.
    Returns (graph, tap outputs) or None when the pass has nothing to do."""
    graph = working_graph(work)
    graph.nodes = [n for n in graph.nodes if plan.passes[node_name(n)] in (k, None)]
    write_statistics(graph, new_stats)
    tensors = graph.tensors()
    produced = {t.name for n in graph.nodes if plan.passes[node_name(n)] == k for t in n.outputs}
    made_here = {t.name for n in graph.nodes for t in n.outputs}
    cut = sorted({t.name for n in graph.nodes for t in n.inputs
                  if t.name in plan.stage and plan.stage[t.name] <= k and t.name not in made_here})
    inputs = [t for t in graph.inputs if not isinstance(t, gs.Constant)]
    for name in cut:
        tensor = tensors[name]
        tensor.inputs.clear()  # produced by an earlier pass: read from the spill
        inputs.append(tensor)
    graph.inputs = inputs
    builder = StatisticBuilder(graph, default_opset(work) or 13)
    outputs = builder.add_taps(plan.taps.get(k, {}), "vsonnx_p")
    spill_out = [tensors[t] for t in sorted(produced) if plan.last_use.get(t, -1) > k]
    builder.finish(spill_out, prune=True)
    if not graph.nodes and not outputs:
        return None
    return graph, outputs, [t.name for t in spill_out]


def _staged(request: EstimateRequest, source) -> Estimate:
    work = working_copy(request.model)
    plan = _plan(work, request.targets)
    dtypes = tensor_shapes(work).dtypes
    new_stats: dict[str, BnStatistics] = {}
    samples = batches = 0
    provider = ""
    sizes: list[int] = []  # samples per batch, recorded by the first pass
    with scratch_folder("stages") as folder:
        spill = Spill(folder)
        for k in range(plan.count):
            staged = _stage_graph(work, plan, k, new_stats)
            if staged is None:
                continue
            graph, outputs, spill_out = staged
            for tensor in graph.inputs + graph.outputs:  # spilled tensors keep their element type
                if tensor.dtype is None:
                    tensor.dtype = helper.tensor_dtype_to_np_dtype(dtypes.get(tensor.name, TensorProto.FLOAT))
            session = make_session(to_model(graph, work), device=request.device, threads=request.threads)
            provider = session.get_providers()[0]
            moments, sizes = _run_stage(session, source, sizes, request, plan, k, outputs, spill_out, spill)
            samples, batches = sum(sizes), len(sizes)
            new_stats.update({t: BnStatistics(t, m.mean, m.var, m.count, m.count)
                              for t, m in unshift(moments, plan.taps.get(k, {})).items()})
            spill.release([key for key in spill.keys() if plan.last_use.get(key[0], -1) <= k])  # no later pass reads
    return Estimate("population", samples, batches, new_stats, plan.count, 0.0, provider)


def _run_stage(session, source, seen: list[int], request: EstimateRequest, plan: _Plan, k: int, outputs: dict,
               spill_out: list[str], spill: Spill):
    """One pass of the staged method: graph inputs from the batch, earlier stages from the spill; taps
    accumulated, tensors of later passes spilled. Spill files are written and the next batch's read on
    background threads while onnxruntime runs (it releases the GIL). A pass after the first (``seen``: the first's
    samples per batch) that reads no graph input does not read the data again. Returns (moments, samples per
    batch)."""
    needed = [i.name for i in session.get_inputs()]
    graph_inputs = {i.name for i in request.model.graph.input}
    spilled_in = [n for n in needed if n not in graph_inputs]
    if seen and len(spilled_in) == len(needed):
        source = _Sizes(seen, source)
    moments = {t: ChannelMoments(tap.channels) for t, tap in plan.taps.get(k, {}).items()}
    sizes: list[int] = []

    def read(b, prefetch=False):
        if prefetch and not all((n, b) in spill for n in spilled_in):
            return None  # past the last batch
        return {n: spill.get((n, b)) for n in spilled_in}

    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        ahead: dict[int, object] = {}
        writes: list = []

        def feeds(b, batch):
            loaded = {}
            if spilled_in:
                prefetched = ahead.pop(b, None)
                loaded = (prefetched.result() if prefetched else None) or read(b)
                ahead[b + 1] = reader.submit(read, b + 1, True)
            return {n: batch.feeds[n] if n in graph_inputs else loaded[n] for n in needed}

        def consume(b, n_samples, got):
            sizes.append(n_samples)
            accumulate_moments(moments, outputs, got, n_samples)
            writes.extend(writer.submit(spill.put, (t, b), got[t]) for t in spill_out)
            while len(writes) > 2 * len(spill_out):  # at most two batches waiting to be written
                _written(writes.pop(0))
            if spill_out and (b + 1) * sum(got[t].nbytes for t in spill_out) > MAX_SPILL_BYTES:
                raise _SpillTooLarge

        run_pass(session, source, request.batch_size, fetch_names(outputs) + spill_out,
                 f"calibrating (population, stage {k + 1}/{plan.count})", request.progress, consume, feeds)
        for w in writes:
            _written(w)
    return moments, sizes


class _Sizes(Source):
    """The data as a later stage that reads only the spill sees it: batches without feeds, of the sizes the
    first pass saw (no rows gathered, decoded or checked again)."""

    replays = True

    def __init__(self, sizes: list[int], data: Source):
        self.sizes, self.spec, self.size = sizes, data.spec, sum(sizes)

    def batches(self, batch_size: int):
        return (Batch({}, None, n) for n in self.sizes)


def _written(write) -> None:
    """Wait for a spill write; disk full or not writable: the per-level passes need no spill."""
    try:
        write.result()
    except OSError:
        raise _SpillTooLarge from None

