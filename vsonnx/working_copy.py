"""Working copies of a model for onnxruntime passes (DESIGN 3): dropout switched off, a symbolic batch
dimension, constant subgraphs folded; the gs round trip every edit of a working copy goes through.

Every edit goes through onnx-graphsurgeon: ``gs.import_onnx``, tensors and nodes edited as objects,
``cleanup`` (pruning to the wanted outputs) and ``toposort``, then ``gs.export_onnx``. A gs round trip drops
node metadata and may drop initializers from the graph inputs of IR 3 models: that is harmless here, since
working copies are only ever run, never written; the written model is edited in place by vsonnx.rewrite.
Graphs are imported from a private copy (``import_graph``), so the source model stays byte for byte as it was.
Dropout simulation is vsonnx.simulate, statistic taps vsonnx.taps.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import display_name

BATCH_DIM = "vsonnx_batch"


# --------------------------------------------------------------------------------------------------
# gs round trip
# --------------------------------------------------------------------------------------------------
def node_name(node: gs.Node) -> str:
    """The name vsonnx uses for a gs node (graph.display_name, as GraphIndex.node_name)."""
    return display_name(node.name, node.op, node.outputs[0].name if node.outputs else None)


def nodes_by_name(graph: gs.Graph) -> dict[str, gs.Node]:
    return {node_name(n): n for n in graph.nodes}


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """``gs.import_onnx`` of a private copy: gs keeps the source's TensorProtos as constant values and its
    export sets their ``name`` (e.g. on an unnamed Constant node's tensor), which would change the model a
    working copy was made from."""
    private = onnx.ModelProto()
    private.CopyFrom(model)
    return gs.import_onnx(private)


def to_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` with the opsets and model metadata of ``like`` (gs keeps neither metadata nor, for
    IR 3, the initializers among the inputs; the copy gets at least IR 4, which needs neither)."""
    graph.toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    model.ir_version = max(like.ir_version, 4)
    model.metadata_props.extend(like.metadata_props)
    return model


def const_tensor(name: str, value) -> gs.Constant:
    return gs.Constant(name, np.asarray(value))


def redirect(graph: gs.Graph, tensor: gs.Tensor, replacement: gs.Tensor, skip: gs.Node | None = None) -> None:
    """Every consumer of ``tensor`` (but ``skip``) reads ``replacement`` instead."""
    for consumer in list(tensor.outputs):
        if consumer is skip:
            continue
        for i, t in enumerate(consumer.inputs):
            if t is tensor:
                consumer.inputs[i] = replacement


# --------------------------------------------------------------------------------------------------
# working copies
# --------------------------------------------------------------------------------------------------
def working_graph(model: onnx.ModelProto, keep_dropout_modes: bool = False) -> gs.Graph:
    """A gs graph of ``model`` with dropout off (training_mode inputs forced false, is_test set, unless
    ``keep_dropout_modes``), a symbolic batch dimension on every graph input and output, and no stale
    intermediate shapes."""
    graph = import_graph(model)
    off = const_tensor("vsonnx_false", False)
    for node in graph.nodes if not keep_dropout_modes else []:
        if node.op == "Dropout" and len(node.inputs) > 2 and node.inputs[2].name:
            node.inputs[2] = off
        if node.op == "Dropout" and node.attrs.get("is_test") == 0:
            node.attrs["is_test"] = 1
    io = {id(t) for t in graph.inputs + graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            continue
        if id(tensor) not in io:
            tensor.shape, tensor.dtype = None, None
        elif tensor.shape is not None and len(tensor.shape) > 0:
            tensor.shape = [BATCH_DIM, *tensor.shape[1:]]
    graph.cleanup()  # e.g. the Constant nodes that fed the training_mode inputs switched off above
    _fold_constant_nodes(graph)
    return graph


RANDOM_OPS = ("Dropout", "RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli",
              "Multinomial")


def _fold_constant_nodes(graph: gs.Graph) -> None:
    """Fold nodes computed from constants only (e.g. torch's default exporter computes ReduceMean axes with a
    Reshape of constants, and zero conv biases as Expand(Shape(weight))): with the intermediate shapes
    cleared, shape inference cannot see through them, and every tensor after them would have an unknown rank.
    Random ops are never folded (a folded Dropout in training mode would freeze one mask)."""
    def foldable(node: gs.Node) -> bool:
        return (node.op not in RANDOM_OPS and bool(node.inputs)
                and all(isinstance(t, gs.Constant) or not t.name for t in node.inputs))

    if any(foldable(n) for n in graph.nodes):
        graph.fold_constants(should_exclude_node=lambda n: n.op in RANDOM_OPS, size_threshold=1 << 24,
                             error_ok=True)
        graph.cleanup()


def working_copy(model: onnx.ModelProto, keep_dropout_modes: bool = False) -> onnx.ModelProto:
    """``working_graph`` exported: what onnxruntime runs for inference and analysis."""
    return to_model(working_graph(model, keep_dropout_modes), model)
