"""Models whose export erased the evidence (DESIGN 3, 5.6): Dropout removed, BN possibly folded.

The user names where dropout acted in training: ``--dropout TENSOR_OR_NODE=RATIO`` (a node name stands
for its first input: for a folded Conv, name the Conv) or ``--sites sites.json``
(``{"dropout": {"TENSOR_OR_NODE": RATIO, ...}}``). Working copies then carry Dropout nodes there
(training_mode false for analysis and test-time passes; true, seeded, to simulate training), so the site
finder, the calibrator and the reports work unchanged.

Correction (population semantics, exact at test time), in level order like calibrate's population method:
- a BN still in the graph at a site or downstream of one gets the test-time mean/variance of its input;
- a weight layer downstream of a site that looks folded (its output meets a nonlinearity before any
  normalisation: the BN that followed it was folded in) gets a per-output-channel affine correction
  y' = a*y + b with a = sqrt(Var_train(y) / Var_test(y)), b = E_train(y) - a*E_test(y): the test-time output
  moments (dropout off, upstream corrected) are matched to the training-time ones (simulated with dropout
  on, original constants), which is what re-estimating the folded BN would have done. The correction is
  written into the weight and bias (no new nodes).
Refuses: names that are not tensors or nodes of the graph; ratios outside [0, 1); MatMul folded layers
(no bias input to carry b).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .calibrate import (BnStatistics, bn_levels, bn_tap, dropout_seeds, measure_moments, tensor_shapes,
                        tensor_tap, working_copy)
from .data import ReplaySource, Source
from .errors import VsonnxError
from .graph import GraphIndex, attribute
from .sites import find_sites, looks_folded

SEED = 0


def parse_dropout_specs(specs: list[str] | tuple[str, ...], sites_file: str | Path | None = None) -> dict[str, float]:
    """{'tensor or node': drop ratio} from NAME=RATIO strings and/or a sites.json file."""
    named: dict[str, float] = {}
    if sites_file is not None:
        try:
            raw = json.loads(Path(sites_file).read_text())
            entries = raw["dropout"] if isinstance(raw, dict) else raw
            named.update({str(k): float(v) for k, v in dict(entries).items()})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VsonnxError(f"cannot read sites file '{sites_file}' ({type(exc).__name__}).",
                              'write {"dropout": {"TENSOR_OR_NODE": RATIO}}.') from None
    for spec in specs:
        name, sep, value = spec.rpartition("=")
        try:
            named[name] = float(value)
        except ValueError:
            name = ""
        if not sep or not name:
            raise VsonnxError(f"--dropout '{spec}' is not NAME=RATIO.", "write e.g. --dropout /layer1/conv2/Conv=0.5.")
    for name, ratio in named.items():
        if not 0 <= ratio < 1:
            raise VsonnxError(f"dropout ratio {ratio} for '{name}' is outside [0, 1).", "give the drop probability.")
    return named


def resolve_sites(model: onnx.ModelProto, named: dict[str, float]) -> dict[str, float]:
    """Map node names to their first input; every name must be a tensor or node of the graph."""
    index = GraphIndex(model)
    nodes = {index.node_name(n): n for n in model.graph.node}
    tensors = set(index.producer) | {i.name for i in model.graph.input}
    resolved = {}
    for name, ratio in named.items():
        if name in tensors:
            resolved[name] = ratio
        elif name in nodes:
            resolved[nodes[name].input[0]] = ratio
        else:
            close = sorted(t for t in tensors | set(nodes) if name.split("/")[-1] and name.split("/")[-1] in t)[:3]
            raise VsonnxError(f"'{name}' is neither a tensor nor a node of the model.",
                              "list names with `vsonnx scan MODEL --json` or netron" + (f"; similar: {close}" if close else "."))
    return resolved


def insert_dropouts(model: onnx.ModelProto, sites: dict[str, float], *, training: bool, seed: int = SEED,
                    before_bias: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """A copy with Dropout(ratio, training_mode) on each site tensor, feeding all its former consumers; a
    site in ``before_bias`` (the output of a Conv/Gemm) gets it between the layer's product and its bias."""
    out = copy.deepcopy(model)
    graph = out.graph
    new_nodes = []
    seeds = dropout_seeds(seed, len(sites))
    index = GraphIndex(out) if before_bias else None
    for k, (tensor, ratio) in enumerate(sites.items()):
        dropped_input = f"{tensor}__vsonnx_product" if tensor in before_bias else tensor
        dropped = f"{dropped_input}__vsonnx_dropout"
        if tensor in before_bias:
            new_nodes.append(_split_bias(out, index, tensor, dropped_input, dropped, k))
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == dropped_input:
                    node.input[i] = dropped
        for o in graph.output:
            if o.name == dropped_input:
                raise VsonnxError(f"site '{tensor}' is a graph output.", "name a tensor inside the network.")
        r, t = f"vsonnx_site{k}_ratio", f"vsonnx_site{k}_training"
        graph.initializer.extend([numpy_helper.from_array(np.array(ratio, np.float32), r),
                                  numpy_helper.from_array(np.array(training), t)])
        new_nodes.append(helper.make_node("Dropout", [dropped_input, r, t], [dropped], name=f"vsonnx_dropout_{k}",
                                          seed=seeds[k]))
    graph.node.extend(new_nodes)
    order = GraphIndex(out).topological_order
    del graph.node[:]
    graph.node.extend(order)
    return out


def _split_bias(model: onnx.ModelProto, index: GraphIndex, tensor: str, product: str, dropped: str,
                k: int) -> onnx.NodeProto:
    """Rewrite the Conv/Gemm producing ``tensor`` to output ``product`` without its bias; return the node
    computing ``tensor`` = ``dropped`` (the caller's Dropout of ``product``) + bias."""
    layer = index.producer[tensor]
    layer.output[0] = product
    bias_input = 2
    bias = index.constant(layer.input[bias_input]) if len(layer.input) > bias_input and layer.input[bias_input] else None
    if bias is None:
        return helper.make_node("Identity", [dropped], [tensor], name=f"vsonnx_bias_{k}")
    weight = np.asarray(index.constant(layer.input[1]))
    bias = np.asarray(bias, np.float64)
    if layer.op_type == "Conv":
        bias = bias.reshape((-1,) + (1,) * (weight.ndim - 2))
    else:
        bias = bias * attribute(layer, "beta", 1.0)
    name = f"vsonnx_site{k}_bias"
    model.graph.initializer.append(numpy_helper.from_array(bias.astype(weight.dtype), name))
    layer.input[bias_input] = ""
    return helper.make_node("Add", [dropped, name], [tensor], name=f"vsonnx_bias_{k}")


def inside_folded(model: onnx.ModelProto, sites: dict[str, float]) -> frozenset[str]:
    """The site tensors produced by a folded Conv/Gemm: dropout acted inside the fold (placement a)."""
    index = GraphIndex(model)
    return frozenset(t for t in sites if t in index.producer and index.producer[t].op_type in ("Conv", "Gemm")
                     and looks_folded(index, index.producer[t]))


def with_named_sites(model_path, named: dict[str, float]) -> tuple[onnx.ModelProto, list[str]]:
    """(analysis copy with Dropout nodes at the named sites, notes on what `fix --dropout` would change)."""
    from .model import load_model

    model = load_model(model_path)
    sites = resolve_sites(model, named)
    analysis = insert_dropouts(model, sites, training=False)
    folded = folded_layers(analysis, sites)
    notes = [f"analysed with Dropout inserted at {len(sites)} named site(s): {', '.join(sites)}"]
    if folded:
        notes.append(f"fix --dropout would correct {len(folded)} folded weight layer(s) in their weights: "
                     f"{', '.join(folded)}")
    return analysis, notes


def folded_layers(model_with_dropouts: onnx.ModelProto, sites: dict[str, float]) -> list[str]:
    """Weight layers that produce a site tensor or lie downstream of one and look folded (module docstring)."""
    index = GraphIndex(model_with_dropouts)
    involved = {id(n) for n in index.downstream_nodes(list(sites))} | {id(index.producer[t]) for t in sites
                                                                      if t in index.producer}
    return [index.node_name(n) for n in index.topological_order if id(n) in involved and looks_folded(index, n)]


def apply_affine(model: onnx.ModelProto, corrections: dict[str, tuple[np.ndarray, np.ndarray]]) -> onnx.ModelProto:
    """A copy where each named Conv/Gemm computes a*y + b per output channel (weights and bias rewritten;
    initializers shared with other nodes are copied first)."""
    out = copy.deepcopy(model)
    index = GraphIndex(out)
    inits = index.initializers
    for node in out.graph.node:
        name = index.node_name(node)
        if name not in corrections:
            continue
        a, b = corrections[name]
        if node.op_type not in ("Conv", "Gemm"):
            raise VsonnxError(f"folded layer '{name}' is a {node.op_type}; only Conv and Gemm carry a bias.",
                              "re-export with vsonnx.export, or name other sites.")
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        if node.op_type == "Conv":
            w = w * a.reshape((-1,) + (1,) * (w.ndim - 1))
        else:
            w = w * (a[:, None] if attribute(node, "transB", 0) else a[None, :])
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        bias = numpy_helper.to_array(inits[bias_name]).astype(np.float64) if bias_name else np.zeros(a.size)
        bias = np.broadcast_to(bias, a.shape) * a + b
        dtype = numpy_helper.to_array(inits[node.input[1]]).dtype
        for slot, value, suffix in ((1, w, "w"), (2, bias, "b")):
            new_name = f"{name}__vsonnx_{suffix}"
            out.graph.initializer.append(numpy_helper.from_array(value.astype(dtype), new_name))
            while len(node.input) <= slot:
                node.input.append("")
            node.input[slot] = new_name
    used = {i for n in out.graph.node for i in n.input}
    kept = [t for t in out.graph.initializer if t.name in used or t.name in {i.name for i in out.graph.input}]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def correct_stripped(model: onnx.ModelProto, source: Source, sites: dict[str, float], *, scope: str = "sites",
                     batch_size: int = 128, device: str = "auto", threads: int | None = None,
                     progress: bool = False):
    """Returns (corrected model without the inserted dropouts, BN statistics, affine corrections, report
    of the analysis copy, samples)."""
    source = ReplaySource(source)
    analysis = insert_dropouts(model, sites, training=False)
    report = find_sites(analysis)
    bns = [b.name for b in report.batchnorms if scope == "all" or b.site or b.downstream_of_site]
    folded = folded_layers(analysis, sites)
    if not bns and not folded:
        return None, {}, {}, report, 0
    index = GraphIndex(analysis)
    shapes = tensor_shapes(working_copy(analysis))
    nodes = {index.node_name(n): n for n in analysis.graph.node}
    train_moments = {}
    samples = 0
    if folded:
        simulated = insert_dropouts(model, sites, training=True, before_bias=inside_folded(model, sites))
        taps = {f: tensor_tap(nodes[f].output[0], shapes) for f in folded}
        train_moments, samples, _, _ = measure_moments(simulated, source, taps, batch_size=batch_size,
                                                       device=device, threads=threads, progress=progress,
                                                       label="simulating training (dropout on)",
                                                       keep_dropout_modes=True)
    levels = bn_levels(analysis, bns + folded)
    stats: dict[str, BnStatistics] = {}
    affine: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for level in sorted(set(levels.values())):
        items = [t for t in bns + folded if levels[t] == level]
        current = apply_affine(analysis, affine)
        taps = {t: (bn_tap(index, nodes[t], shapes) if t in bns else tensor_tap(nodes[t].output[0], shapes))
                for t in items}
        moments, samples, _, _ = measure_moments(current, source, taps, stats, batch_size=batch_size, device=device,
                                                 threads=threads, progress=progress,
                                                 label=f"calibrating (level {level + 1})")
        for t, m in moments.items():
            if t in bns:
                stats[t] = BnStatistics(t, m.mean, m.var, m.count)
            else:
                tr = train_moments[t]
                a = np.sqrt(tr.var / np.maximum(m.var, 1e-12))
                affine[t] = (a, tr.mean - a * m.mean)
    corrected = apply_affine(model, affine)
    return corrected, stats, affine, report, samples
