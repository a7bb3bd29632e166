"""Population statistics in one forward computation: the graph is cut into stages at the recalibrated BNs.

The naive population method runs one pass per BN level, and each pass recomputes everything upstream of
that level. Here pass k runs only the nodes of stage k (those whose inputs depend on exactly k levels of
recalibrated BNs; a recalibrated BN itself runs in the stage after its level, once its new statistics are
known) and reads the tensors it needs from earlier stages back from a spill folder on disk, where each
earlier pass wrote them batch by batch (``np.save``; the operating system's page cache keeps this cheap).
Every node is computed once per sample, the statistics are the same per-sample moments as the naive
method (so the answer is the same), and no activation tensor is held in memory beyond one batch.

Used for graphs without subgraph-carrying nodes (If/Loop/Scan read outer tensors implicitly); the caller
falls back to the naive per-level passes otherwise, and when the spill would exceed ``max_spill_bytes`` or
cannot be written.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .calibrate import (BnStatistics, CalibrationResult, _Builder, _fetch, _prune_to, _run_pass,
                        _topological_sort, _write_statistics, accumulate_moments, bn_tap, tensor_shapes, unshift,
                        working_copy)
from .data import Source
from .graph import GraphIndex
from .runtime import make_session
from .stats import ChannelMoments


def has_subgraphs(model: onnx.ModelProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in model.graph.node for a in n.attribute)


def _stages(work: onnx.ModelProto, index: GraphIndex, targets: set[str]):
    """(pass of every node by name, level of every target, stage of every tensor). Nodes with only static
    inputs get pass None: they are copied into every pass that needs them."""
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
        for out in node.output:
            if out:
                stage[out] = s
    return passes, levels, stage


def calibrate_population_staged(model: onnx.ModelProto, source: Source, targets: list[str], *, batch_size: int,
                                device: str, threads: int | None, progress: bool,
                                max_spill_bytes: int = 16 << 30) -> CalibrationResult:
    work = working_copy(model)
    index = GraphIndex(work)
    wanted = set(targets)
    passes, levels, stage = _stages(work, index, wanted)
    shapes = tensor_shapes(work)
    types = shapes.dtypes
    nodes = {index.node_name(n): n for n in work.graph.node}
    graph_inputs = {i.name for i in work.graph.input}
    taps_by_level: dict[int, dict] = {}
    for t in targets:
        taps_by_level.setdefault(levels[t], {})[t] = bn_tap(index, nodes[t], shapes)
    last = max(taps_by_level)
    # the pass that consumes each tensor last (taps count as consumers in their level's pass)
    last_use: dict[str, int] = {}
    for name, node in nodes.items():
        p = passes[name]
        for i in node.input:
            if i and i in stage and p is not None:
                last_use[i] = max(last_use.get(i, -1), p)
    for level, taps in taps_by_level.items():
        for tap in taps.values():
            last_use[tap.tensor] = max(last_use.get(tap.tensor, -1), level)

    new_stats: dict[str, BnStatistics] = {}
    spill = Path(tempfile.mkdtemp(prefix="vsonnx-stages-"))
    samples = batches = 0
    provider = ""
    try:
        for k in range(last + 1):
            keep = [n for n in work.graph.node if passes[index.node_name(n)] in (k, None)]
            produced = {o for n in keep if passes[index.node_name(n)] == k for o in n.output if o}
            spill_out = sorted(t for t in produced if last_use.get(t, -1) > k)
            stage_model = _stage_model(work, keep, new_stats, graph_inputs, stage, k, types)
            builder = _Builder(stage_model)
            taps = taps_by_level.get(k, {})
            outputs = {t: builder.sample_moments(tap, f"vsonnx_p{j}") for j, (t, tap) in enumerate(taps.items())}
            fetch = _fetch(outputs)
            builder.finish(fetch)
            for t in spill_out:
                stage_model.graph.output.append(helper.make_tensor_value_info(t, types.get(t, TensorProto.FLOAT), None))
            _prune_to(stage_model, fetch + spill_out)
            _topological_sort(stage_model)
            if not stage_model.graph.node and not fetch:
                continue
            session = make_session(stage_model, device=device, threads=threads)
            provider = session.get_providers()[0]
            needed = [i.name for i in stage_model.graph.input]
            moments = {t: ChannelMoments(tap.channels) for t, tap in taps.items()}

            def feeds(b, batch):  # graph inputs from the batch, earlier stages from the spill
                return {n: batch.feeds[n] if n in graph_inputs else np.load(spill / f"{_file(n)}.{b}.npy")
                        for n in needed}

            def consume(b, n_samples, got):
                accumulate_moments(moments, outputs, got, n_samples)
                try:
                    for t in spill_out:
                        np.save(spill / f"{_file(t)}.{b}.npy", got[t])
                except OSError:  # disk full or not writable: the per-level passes need no spill
                    raise _SpillTooLarge from None
                if spill_out and (b + 1) * sum(got[t].nbytes for t in spill_out) > max_spill_bytes:
                    raise _SpillTooLarge

            samples, batches = _run_pass(session, source, batch_size, fetch + spill_out,
                                         f"calibrating (population, stage {k + 1}/{last + 1})", progress, consume,
                                         feeds)
            for t, m in unshift(moments, taps).items():
                new_stats[t] = BnStatistics(t, m.mean, m.var, m.count)
            for f in spill.iterdir():  # drop what no later pass reads
                if last_use.get(_unfile(f.name.rsplit(".", 2)[0]), -1) <= k:
                    f.unlink()
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    return CalibrationResult("population", samples, batches, new_stats, last + 1, 0.0, provider)


class _SpillTooLarge(Exception):
    """The spilled tensors would exceed the budget: the caller uses the per-level passes instead."""


def _file(tensor: str) -> str:
    return tensor.encode().hex()


def _unfile(stem: str) -> str:
    return bytes.fromhex(stem).decode()


def _stage_model(work, keep, new_stats, graph_inputs, stage, k, types) -> onnx.ModelProto:
    """The nodes of pass k (plus static helpers); tensors of earlier stages become graph inputs."""
    model = onnx.ModelProto()
    model.CopyFrom(work)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    _write_statistics_subset(model, new_stats)
    produced = {o for n in keep for o in n.output}
    inputs = []
    for n in keep:
        for i in n.input:
            if i and i not in produced and i in stage and stage[i] < k + 1 and i not in graph_inputs:
                inputs.append(i)
    existing = {i.name for i in model.graph.input}
    for name in dict.fromkeys(inputs):
        if name not in existing:
            model.graph.input.append(helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), None))
    del model.graph.output[:]
    return model


def _write_statistics_subset(model: onnx.ModelProto, stats: dict[str, BnStatistics]) -> None:
    present = {GraphIndex(model).node_name(n) for n in model.graph.node if n.op_type == "BatchNormalization"}
    _write_statistics(model, {k: v for k, v in stats.items() if k in present})
