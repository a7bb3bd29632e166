"""Is an ONNX graph well formed enough to index, run and name (DESIGN 3)? Checked once, when a model is
loaded (vsonnx.model.load_model): nodes out of topological order are sorted, everything else that no tool can
run or vsonnx cannot name is a user error (VsonnxError) naming what is wrong.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import VsonnxError
from .graph import GraphIndex, subgraphs


def check_structure(model: onnx.ModelProto, where: str = "the model") -> None:
    """Refuse (VsonnxError) a top-level graph that no tool can run or vsonnx cannot name: no graph output,
    two nodes of one name, a node that does not fit its operator's schema (input count, attribute types; ops
    of the default domain only), a tensor produced twice, an input that nothing produces, a cycle, an
    initializer whose data does not fill its dims, BatchNormalization parameters of different lengths.
    Subgraphs may read outer tensors and are not checked here."""
    graph = model.graph
    if not graph.output:
        raise VsonnxError(f"{where} is malformed: its graph has no outputs.", "re-export the model.")
    produced: dict[str, str] = {}
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    index = GraphIndex(model)
    _check_node_names(graph, where)
    _check_schemas(model, index, where)
    for node in graph.node:
        for out in filter(None, node.output):
            if out in produced or out in defined:
                raise VsonnxError(f"{where} is malformed: tensor '{out}' is produced twice (by node "
                                  f"'{index.node_name(node)}' and {produced.get(out, 'a graph input or initializer')}).",
                                  "re-export the model; tensor names must be unique.")
            produced[out] = f"node '{index.node_name(node)}'"
    for node in graph.node:
        missing = [i for i in node.input if i and i not in produced and i not in defined]
        if missing:
            raise VsonnxError(f"{where} is malformed: node '{index.node_name(node)}' reads '{missing[0]}', which no "
                              "node, graph input or initializer defines.", "re-export the model.")
    cyclic = _has_cycle(index)
    if cyclic is not None:
        raise VsonnxError(f"{where} is malformed: its graph has a cycle (through node '{index.node_name(cyclic)}').",
                          "re-export the model.")
    for tensor in graph.initializer:
        _check_initializer(tensor, where)
    for node in index.nodes_of("Dropout"):
        for slot, what in ((1, "ratio"), (2, "training_mode")):
            value = index.constant(node.input[slot]) if len(node.input) > slot else None
            if value is not None and np.asarray(value).size != 1:
                raise VsonnxError(f"{where} is malformed: Dropout '{index.node_name(node)}' has a {what} of "
                                  f"{np.asarray(value).size} values; ONNX wants a scalar.", "re-export the model.")
    for name, node in index.batchnorms().items():
        sizes = [int(np.asarray(v).size) for v in (index.constant(i) for i in node.input[1:5]) if v is not None]
        if len(set(sizes)) > 1:
            raise VsonnxError(f"{where} is malformed: BatchNormalization '{name}' has scale/bias/mean/var of lengths "
                              f"{sizes}.", "re-export the model; the four must have one value per channel.")


def _check_node_names(graph: onnx.GraphProto, where: str) -> None:
    seen: set[str] = set()
    for node in graph.node:
        if node.name and node.name in seen:
            count = sum(n.name == node.name for n in graph.node)
            raise VsonnxError(f"{where} has {count} nodes named '{node.name}'; vsonnx names BNs and sites by node "
                              "name.", "give the nodes unique names (e.g. onnx-graphsurgeon, or re-export).")
        seen.add(node.name)


def _check_schemas(model: onnx.ModelProto, index: GraphIndex, where: str) -> None:
    """Each node of the default domain against its operator's schema at the model's opset (nodes with
    subgraphs are left out: their subgraphs may read outer tensors, which the node check cannot see)."""
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = model.ir_version
    ctx.opset_imports = {o.domain: o.version for o in model.opset_import}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or subgraphs(node):
            continue
        try:
            onnx.checker.check_node(node, ctx)
        except Exception as exc:  # onnx.checker.ValidationError, or a C++ error for unknown ops
            raise VsonnxError(f"{where} is malformed: node '{index.node_name(node)}' ({node.op_type}) does not fit "
                              f"its operator ({str(exc).splitlines()[0][:160]}).",
                              "re-export the model, or check it with `python -m onnx.checker MODEL`.") from None


def sort_topologically(model: onnx.ModelProto) -> bool:
    """Put the top-level nodes in topological order in place (ONNX requires it; some tools write other
    orders); True when they were not in it. A graph with a cycle is left for check_structure to refuse."""
    index = GraphIndex(model)
    seen: set[str] = set()
    in_order = True
    for node in model.graph.node:
        if any(i in index.producer and i not in seen for i in node.input):
            in_order = False
            break
        seen.update(node.output)
    if in_order or _has_cycle(index) is not None:
        return False
    order = index.topological_order
    nodes = [onnx.NodeProto() for _ in order]
    for copy, node in zip(nodes, order):
        copy.CopyFrom(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return True


def _has_cycle(index: GraphIndex) -> onnx.NodeProto | None:
    """A node on a cycle, or None: every node's inputs must come from nodes placed before it in the
    topological order (GraphIndex keeps the file order for the nodes of a cycle)."""
    position = {id(n): k for k, n in enumerate(index.topological_order)}
    for node in index.topological_order:
        for i in node.input:
            producer = index.producer.get(i)
            if producer is not None and position[id(producer)] >= position[id(node)]:
                return node
    return None


def _check_initializer(tensor: onnx.TensorProto, where: str) -> None:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return
    try:
        numpy_helper.to_array(tensor)
    except Exception as exc:  # the data does not fill the dims, or an unknown type
        raise VsonnxError(f"{where} is malformed: initializer '{tensor.name}' (dims {list(tensor.dims)}) cannot be "
                          f"read ({str(exc).splitlines()[0][:100]}).", "re-export the model.") from None
