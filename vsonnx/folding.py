"""Evidence that an export folded BatchNormalization into the Conv/Gemm before it (DESIGN 5.6), and what a
correction of such a fold means.

- ``folded_batchnorms``: the BNs torch's default exporter says it folded (node metadata);
- ``looks_folded``: a Conv/ConvTranspose/Gemm whose output meets an activation before any normalisation
  (where a BN followed it in training, it was folded into these weights); ``unnormalised_weight_after``: the
  first such layer after a tensor;
- ``folded_layers`` / ``inside_folded``: the folded layers a named-sites correction adjusts, and the sites that
  lie inside a fold (between the layer's product and its bias);
- ``folded_message`` / ``KEEP_BN_EXPORTS``: what that correction is (relative to the lost statistics) and the
  exports that keep every BN instead.
"""
from __future__ import annotations

import onnx

from .graph import (ACTIVATION_OPS, FOLD_TARGETS, MERGE_OPS, NORMALIZATION_OPS, SHAPE_OPS, WEIGHT_OPS, GraphIndex,
                    folded_by_exporter, module_of)

# Exports that keep every BN unfolded (each checked by hand on 2026-12-03: BN nodes counted in the result).
KEEP_BN_EXPORTS = ("vsonnx.export(model, x, 'model.onnx') (keeps Dropout too); "
                   "torch.onnx.export(model, (x,), 'model.onnx', dynamo=True, optimize=False); "
                   "onnxslim model.onnx slim.onnx --skip-fusion-patterns FusionConvBN FusionConvTransposeBN; "
                   "onnxsim (keeps BN and Dropout)")


def folded_message(layers: list[str]) -> str:
    """What a correction of BNs folded into ``layers`` means, and how to avoid needing it."""
    return (f"{len(layers)} BatchNormalization layer(s) were folded into the weights of {', '.join(layers[:4])}"
            f"{', ...' if len(layers) > 4 else ''} before vsonnx saw the model: their stored statistics are lost, so "
            "each was corrected relative to them (the layer's output moments with dropout off matched to those "
            "with dropout on: scale sqrt(var_on / var_off), shift mean_on - scale * mean_off), which equals "
            "re-estimating the BN only where its stored statistics were the dropout-on statistics of this "
            "calibration data. To correct exactly, export with the BNs kept: " + KEEP_BN_EXPORTS + ".")


def folded_batchnorms(index: GraphIndex) -> list[dict]:
    """The BNs the exporter says it folded, with their module, the layer and that layer's own module."""
    found = []
    for node in index.nodes_of(*WEIGHT_OPS):
        if folded_by_exporter(node):
            weight = node.input[1] if len(node.input) > 1 else ""
            found.append({"batchnorm": module_of(node), "layer": index.node_name(node),
                          "layer_module": weight[:-len(".weight")] if weight.endswith(".weight") else None})
    return found


def unnormalised_weight_after(index: GraphIndex, tensor: str) -> str | None:
    """'<op> '<name>'' when ``tensor`` reaches a weight layer whose output meets a nonlinearity before any
    normalisation (graph outputs, i.e. classifiers, are fine)."""
    for weight in _first_reached(index, tensor, FOLD_TARGETS):
        if looks_folded(index, weight):
            return f"{weight.op_type} '{index.node_name(weight)}'"
    return None


def looks_folded(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """A Conv/ConvTranspose/Gemm whose output meets an activation before any normalisation: where a BN
    followed it in training, the export folded it into these weights (Softmax and max pooling are no such
    evidence: a classifier ends in one, and a BN does not sit before the other)."""
    if node.op_type not in FOLD_TARGETS or len(node.input) < 2 or not index.is_constant(node.input[1]):
        return False
    hit = _first_reached(index, node.output[0], NORMALIZATION_OPS | ACTIVATION_OPS)
    return any(n.op_type in ACTIVATION_OPS for n in hit)


def _first_reached(index: GraphIndex, tensor: str, targets: frozenset[str]) -> list:
    """Nodes of ``targets`` first met going forward from ``tensor`` through shape/merge/bias ops."""
    found, seen, stack = [], set(), [tensor]
    while stack:
        t = stack.pop()
        for node in index.consumers.get(t, []):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in targets:
                found.append(node)
            elif node.op_type in SHAPE_OPS | MERGE_OPS | {"Dropout", "Sub"}:
                stack.extend(o for o in node.output if o)
    return found


def inside_folded(model: onnx.ModelProto, sites: dict[str, float]) -> frozenset[str]:
    """The site tensors produced by a folded Conv/Gemm: dropout acted inside the fold (placement a)."""
    index = GraphIndex(model)
    return frozenset(t for t in sites if t in index.producer and index.producer[t].op_type in ("Conv", "Gemm")
                     and looks_folded(index, index.producer[t]))


def folded_layers(model_with_dropouts: onnx.ModelProto, sites: dict[str, float]) -> list[str]:
    """Weight layers that produce a site tensor or lie downstream of one and look folded (module docstring)."""
    index = GraphIndex(model_with_dropouts)
    involved = {id(n) for n in index.downstream_nodes(list(sites))} | {id(index.producer[t]) for t in sites
                                                                      if t in index.producer}
    return [index.node_name(n) for n in index.topological_order if id(n) in involved and looks_folded(index, n)]
