"""Naming the dropout sites of models whose export erased them (DESIGN 3, 5.6): Dropout removed, BN
possibly folded. The correction itself is the ``named_sites`` method (vsonnx.methods.named_sites).

The user names where dropout acted in training: ``--dropout TENSOR_OR_NODE=RATIO`` (a node name stands
for its first input: for a folded Conv, name the Conv) or ``--sites sites.json``
(``{"dropout": {"TENSOR_OR_NODE": RATIO, ...}}``). Working copies then carry Dropout nodes there
(training_mode false for analysis and test-time passes; true, seeded, to simulate training), so the site
finder, the calibrator and the reports work unchanged.

Correction (vsonnx.methods.named_sites; population semantics, exact at test time), in level order
like the population method:
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

import json
from pathlib import Path

import onnx

from .errors import VsonnxError
from .graph import GraphIndex
from .instrument import insert_dropouts
from .sites import looks_folded


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
    nodes = index.by_name
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
