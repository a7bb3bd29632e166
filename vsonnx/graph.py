"""A read-only index of an ONNX graph: producers, consumers, constants, topological order, node lookup,
the stored statistics of its BatchNormalization nodes and the shapes shape inference can tell.

Only the top-level graph is indexed; subgraphs of If/Loop/Scan are opaque nodes. This index reads the
original ModelProto (it keeps metadata and node order untouched); edits of working copies go through
onnx-graphsurgeon in vsonnx.working_copy. Whether a graph is well formed at all: vsonnx.graph_check.
"""
from __future__ import annotations

import ast
from collections import defaultdict, deque
from functools import cached_property

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import VsonnxError
from .stats import BnStatistics

NORMALIZATION_OPS = frozenset(
    {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization"}
)
WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Ops that only move values around: a Dropout -> (these) -> BN path is still a `direct` site.
SHAPE_OPS = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"})
MERGE_OPS = frozenset({"Add", "Sum", "Concat"})
NONLINEAR_OPS = frozenset(
    {"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu",
     "Selu", "Celu", "Gelu", "Mish", "Softplus", "Softsign", "ThresholdedRelu", "Softmax", "LogSoftmax",
     "MaxPool", "GlobalMaxPool"}
)
# Layers an exporter folds a BN into, and what a BN sits before (an activation; not Softmax, which ends a
# classifier, nor max pooling): a FOLD_TARGETS layer whose output meets one of these before any
# normalisation is the evidence that an export folded a BN into it.
FOLD_TARGETS = frozenset({"Conv", "ConvTranspose", "Gemm"})
ACTIVATION_OPS = NONLINEAR_OPS - {"Softmax", "LogSoftmax", "MaxPool", "GlobalMaxPool"}


class GraphIndex:
    """Producers, consumers and statically known values of the tensors of ``model.graph``."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.graph_outputs = {o.name for o in self.graph.output}
        self._const_cache: dict[str, np.ndarray | None] = {}

    def node_name(self, node: onnx.NodeProto) -> str:
        """The node's name, or a stable stand-in built from its first output when it has none."""
        return display_name(node.name, node.op_type, node.output[0] if node.output else None)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of tensor ``name`` if it is static: an initializer, a Constant node's output, a
        ConstantOfShape of a static shape (old Model Zoo exports build BN statistics that way), or an
        Identity/Cast of one. None when it depends on graph inputs (or the name is empty)."""
        if not name:
            return None
        if name in self._const_cache:
            return self._const_cache[name]
        value: np.ndarray | None = None
        if name in self.initializers:
            value = numpy_helper.to_array(self.initializers[name])
        elif name in self.producer:
            node = self.producer[name]
            if node.op_type == "Constant":
                value = constant_node_value(node)
            elif node.op_type == "ConstantOfShape" and node.input:
                shape = self.constant(node.input[0])
                fill = attribute(node, "value")
                fill = numpy_helper.to_array(fill).reshape(-1)[:1] if fill is not None else np.zeros(1, np.float32)
                value = None if shape is None else np.full(np.asarray(shape, np.int64).reshape(-1), fill[0], fill.dtype)
            elif node.op_type in ("Identity", "Cast") and node.input:
                src = self.constant(node.input[0])
                if src is not None and node.op_type == "Cast":
                    to = next((a.i for a in node.attribute if a.name == "to"), None)
                    src = src.astype(onnx.helper.tensor_dtype_to_np_dtype(to)) if to else src
                value = src
        self._const_cache[name] = value
        return value

    def initializer_behind(self, name: str) -> str | None:
        """The initializer ``name`` is, directly or through Identity nodes (legacy exports route running
        statistics that way), or None."""
        seen = set()
        while name and name not in self.initializers and name not in seen:
            seen.add(name)
            node = self.producer.get(name)
            if node is None or node.op_type != "Identity":
                return None
            name = node.input[0]
        return name if name in self.initializers else None

    def is_constant(self, name: str) -> bool:
        return self.constant(name) is not None

    def dynamic_inputs(self, node: onnx.NodeProto) -> list[str]:
        """Inputs of ``node`` that are not statically known (graph inputs or computed tensors)."""
        return [i for i in node.input if i and not self.is_constant(i)]

    def nodes_of(self, *op_types: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if n.op_type in op_types]

    @cached_property
    def by_name(self) -> dict[str, onnx.NodeProto]:
        """Every node under ``node_name``."""
        return {self.node_name(n): n for n in self.graph.node}

    def node(self, name: str) -> onnx.NodeProto:
        """The node called ``name`` (see node_name); a user error naming the closest names when absent."""
        found = self.by_name.get(name)
        if found is None:
            raise VsonnxError(f"the model has no node named '{name}'.", "list the names with `vsonnx scan MODEL --json`.")
        return found

    def batchnorms(self, names: list[str] | None = None) -> dict[str, onnx.NodeProto]:
        """BatchNormalization nodes by name: all of them, or exactly ``names`` (a user error if one is missing)."""
        found = {name: n for name, n in self.by_name.items() if n.op_type == "BatchNormalization"}
        if names is None:
            return found
        missing = [n for n in names if n not in found]
        if missing:
            raise VsonnxError(f"no BatchNormalization named {missing[:3]} in the model.",
                              "check the names with vsonnx scan.")
        return {n: found[n] for n in names}

    def stored_statistics(self, names: list[str]) -> dict[str, BnStatistics]:
        """The running mean/var the BNs ``names`` hold now, in float64 (their inputs 3 and 4 must be constant)."""
        nodes = self.batchnorms(names)
        return {n: BnStatistics(n, np.asarray(self.constant(nodes[n].input[3]), np.float64).reshape(-1),
                                np.asarray(self.constant(nodes[n].input[4]), np.float64).reshape(-1), 0)
                for n in names}

    @cached_property
    def live(self) -> frozenset[int]:
        """ids of the nodes whose outputs reach a graph output (an If/Loop/Scan reads the outer tensors its
        subgraphs name as well as its own inputs)."""
        seen: set[int] = set()
        stack = [self.producer[o] for o in self.graph_outputs if o in self.producer]
        while stack:
            node = stack.pop()
            if id(node) not in seen:
                seen.add(id(node))
                reads = list(node.input) + [i for g in subgraphs(node) for n in g.node for i in n.input]
                stack.extend(self.producer[i] for i in reads if i in self.producer)
        return frozenset(seen)

    @cached_property
    def topological_order(self) -> list[onnx.NodeProto]:
        """Nodes in an order where every producer precedes its consumers (Kahn's algorithm)."""
        nodes = list(self.graph.node)
        position = {id(n): i for i, n in enumerate(nodes)}
        indegree = {id(n): 0 for n in nodes}
        for n in nodes:
            indegree[id(n)] = len({self.producer[i].output[0] for i in n.input if i in self.producer})
        ready = deque(n for n in nodes if indegree[id(n)] == 0)
        order: list[onnx.NodeProto] = []
        while ready:
            node = ready.popleft()
            order.append(node)
            done = set()
            for out in node.output:
                for consumer in self.consumers.get(out, []):
                    if id(consumer) in done:
                        continue
                    # a consumer that reads several outputs of this node counts it once
                    if any(i in node.output for i in consumer.input):
                        done.add(id(consumer))
                        indegree[id(consumer)] -= 1
                        if indegree[id(consumer)] == 0:
                            ready.append(consumer)
        if len(order) != len(nodes):  # a cycle: keep file order for the rest
            seen = {id(n) for n in order}
            order += sorted((n for n in nodes if id(n) not in seen), key=lambda n: position[id(n)])
        return order

    def downstream_nodes(self, tensors: list[str]) -> list[onnx.NodeProto]:
        """Every node that (transitively) consumes one of ``tensors``."""
        seen: set[int] = set()
        result: list[onnx.NodeProto] = []
        stack = list(tensors)
        while stack:
            t = stack.pop()
            for node in self.consumers.get(t, []):
                if id(node) not in seen:
                    seen.add(id(node))
                    result.append(node)
                    stack.extend(o for o in node.output if o)
        return result

    def upstream_nodes(self, tensor: str) -> list[onnx.NodeProto]:
        """Every node ``tensor`` (transitively) depends on."""
        seen: set[int] = set()
        result: list[onnx.NodeProto] = []
        stack = [tensor]
        while stack:
            node = self.producer.get(stack.pop())
            if node is not None and id(node) not in seen:
                seen.add(id(node))
                result.append(node)
                stack.extend(i for i in node.input if i)
        return result

    def levels(self, targets: list[str]) -> dict[str, int]:
        """Level of each target node (a BN, or any node whose output is corrected): the longest chain of
        targets strictly upstream of it."""
        wanted = set(targets)
        depth: dict[str, int] = {}
        levels: dict[str, int] = {}
        for node in self.topological_order:
            d = max((depth.get(i, 0) for i in node.input if i), default=0)
            name = self.node_name(node)
            if name in wanted:
                levels[name] = d
                d += 1
            for out in node.output:
                depth[out] = d
        return levels


class TensorShapes(dict):
    """tensor name -> shape (None for unknown dims); ``dtypes``: tensor name -> ONNX element type;
    ``symbols``: tensor name -> the symbolic name of each dim (None where it has none)."""

    def __init__(self):
        super().__init__()
        self.dtypes: dict[str, int] = {}
        self.symbols: dict[str, tuple[str | None, ...]] = {}


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
            shapes.symbols[value.name] = tuple(d.dim_param if d.HasField("dim_param") else None for d in t.shape.dim)
    return shapes


def display_name(name: str, op_type: str, first_output: str | None) -> str:
    """The name vsonnx gives a node: its own, or '<op>:<first output>' when it has none (one rule for the
    ModelProto index and for onnx-graphsurgeon's nodes in vsonnx.working_copy)."""
    return name or f"{op_type}:{first_output or '?'}"


def channel_bias(op_type: str, bias, channels: int, beta: float = 1.0) -> np.ndarray | None:
    """The bias a Conv or Gemm adds to each of its ``channels`` outputs, as float64 [channels]: Conv's B,
    Gemm's beta * C for C a scalar, [N] or [1, N] (zeros when ``bias`` is None); None when it is not one
    value per output channel (a Gemm C of shape [M, N] with M > 1 adds a different bias per row)."""
    if bias is None:
        return np.zeros(channels)
    values = np.asarray(bias, np.float64) * (beta if op_type == "Gemm" else 1.0)
    if values.size not in (1, channels) or (values.ndim == 2 and values.shape[0] != 1):
        return None
    return np.broadcast_to(values.reshape(-1), (channels,)).copy()


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs of an If/Loop/Scan node (nested ones included), empty for other nodes."""
    found = []
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            found.append(g)
            found += [inner for n in g.node for inner in subgraphs(n)]
    return found


def has_subgraphs(model: onnx.ModelProto) -> bool:
    """True when a node carries a subgraph (If/Loop/Scan), which reads outer tensors implicitly."""
    return any(subgraphs(n) for n in model.graph.node)


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def attribute(node: onnx.NodeProto, name: str, default=None):
    """A node attribute's Python value, or ``default`` when absent."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def module_of(node: onnx.NodeProto) -> str | None:
    """The PyTorch module a node was exported from, when the exporter said so: torch's default (dynamo)
    exporter in the node's ``pkg.torch.onnx.name_scopes`` metadata (``['', 'layer1', 'layer1.0', 'layer1.0.bn',
    '<op>']`` -> ``layer1.0.bn``; for a Conv a BN was folded into, that BN), the TorchScript exporter in the
    node's name (``/layer1/layer1.0/bn/BatchNormalization`` -> ``layer1.0.bn``, see scope_module)."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            names = [str(s) for s in ast.literal_eval(scopes)]
        except (ValueError, SyntaxError):
            names = []
        return names[-2] if len(names) >= 2 and names[-2] else None
    return scope_module(node.name)


def scope_module(name: str) -> str | None:
    """The PyTorch module path in a TorchScript-scoped node or tensor name, whose segments are the scopes
    down to the op: each segment either extends the one before it (a container's child: ``blocks`` ->
    ``blocks.0``) or names an attribute of the module so far. ``/stages/stages.1/blocks/blocks.0/norm1/
    BatchNormalization`` -> ``stages.1.blocks.0.norm1``; ``/features/features.1/features.1.0/block/0/Conv``
    -> ``features.1.0.block.0``; tensors (``.../bn2/BatchNormalization_output_0``) likewise. None for names
    not of that form."""
    if not name.startswith("/") or name.count("/") < 2:
        return None
    path, previous = "", None
    for segment in name.strip("/").split("/")[:-1]:
        if previous is not None and segment.startswith(previous + "."):
            path += segment[len(previous):]
        else:
            path = f"{path}.{segment}" if path else segment
        previous = segment
    return path or None


def scope_op(name: str) -> str | None:
    """The op type a TorchScript-scoped node or tensor name ends in (``.../bn2/BatchNormalization_output_0``
    -> ``BatchNormalization``), or None."""
    if scope_module(name) is None:
        return None
    return name.rsplit("/", 1)[-1].split("_output_")[0].split("_")[0] or None


def folded_by_exporter(node: onnx.NodeProto) -> bool:
    """torch's default (dynamo) exporter marks a Conv/Gemm it folded a BN into in the node's metadata."""
    return any(p.key == "pkg.onnxscript.rewriter.rule_name" and "FuseBatchNorm" in p.value for p in node.metadata_props)
