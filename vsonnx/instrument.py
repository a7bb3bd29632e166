"""Working copies of a model for onnxruntime passes: dropout switched off or simulated, statistic taps,
BN statistics swapped, graphs cut to what a pass needs (DESIGN 3, 5.2, 5.3).

Every edit here goes through onnx-graphsurgeon: ``gs.import_onnx``, tensors and nodes edited as objects,
``cleanup`` (pruning to the wanted outputs) and ``toposort``, then ``gs.export_onnx``. A gs round trip drops
node metadata and may drop initializers from the graph inputs of IR 3 models: that is harmless here, since
working copies are only ever run, never written; the written model is edited in place by vsonnx.rewrite.
Graphs are imported from a private copy (``import_graph``), so the source model stays byte for byte as it was.

Statistic taps: for a BN input x of shape [N, C, ...] a copy computes per-sample moments of x shifted by
the BN's stored running mean s (close to the real mean, so E[y^2] - E[y]^2 does not cancel badly):

    y = x - s;   g1 = GlobalAveragePool(y);   g2 = GlobalAveragePool(y * y)        ([N, C, 1, ...])

(rank-2 inputs [N, C]: g1 = y, g2 = y * y). Global average pooling keeps onnxruntime's blocked (NCHWc)
convolution layout intact, where ReduceMean over the batch axis would force layout conversions. The
[N, C] results are combined in float64 on the host (vsonnx.stats): per-sample moments make the statistics
independent of batching, and they are tiny compared with the activations, which are never fetched.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from .data import Source
from .errors import VsonnxError
from .graph import GraphIndex, TensorShapes, channel_bias, display_name, tensor_shapes
from .model import default_opset
from .random_feeds import DROPOUT_SEED, LEVELS, RANDOM_PREFIX
from .runtime import make_session, run_pass
from .stats import BnStatistics, ChannelMoments

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


def _const(name: str, value) -> gs.Constant:
    return gs.Constant(name, np.asarray(value))


def _redirect(graph: gs.Graph, tensor: gs.Tensor, replacement: gs.Tensor, skip: gs.Node | None = None) -> None:
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
    off = _const("vsonnx_false", False)
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


def simulated_graph(model: onnx.ModelProto, dropout: bool, *, seed: int = DROPOUT_SEED,
                    channelwise: frozenset[str] = frozenset(), fed: bool = True) -> tuple[gs.Graph, TensorShapes]:
    """``working_graph`` with dropout off, or with ``dropout`` every Dropout simulated in training mode
    (simulate_dropouts; ``fed``: with fed draws where shapes allow, for onnxruntime's CPU provider, else every
    draw by RandomUniformLike, which the CUDA provider runs on the GPU), and the shapes of the working copy
    before the simulation (one shape inference; the simulation keeps every tensor name)."""
    graph = working_graph(model, keep_dropout_modes=dropout)
    shapes = tensor_shapes(to_model(graph.copy(), model))
    if dropout:
        simulate_dropouts(graph, default_opset(model) or 13, shapes.dtypes, seed=seed, channelwise=channelwise,
                          shapes=shapes if fed else None)
    return graph, shapes


def dropout_seeds(seed: int, count: int) -> list[int]:
    """Seeds for ``count`` simulated Dropout nodes, drawn from ``seed``: onnxruntime's masks for nearby seeds
    (0, 1, ...) are correlated (measured: 6% less simulated noise two dropouts apart)."""
    return [int(s) for s in np.random.default_rng(seed).integers(1, 2**31 - 1, count)]


def simulate_dropouts(graph: gs.Graph, opset: int, dtypes: dict[str, int], seed: int = DROPOUT_SEED,
                      channelwise: frozenset[str] = frozenset(), shapes: TensorShapes | None = None) -> None:
    """Replace every Dropout of ``graph`` by explicit operations that drop as in training, with a fresh mask
    per run:  y = x * (u >= r) / (1 - r).  Where ``shapes`` (of the graph before the simulation) know x's shape
    but for the batch, u is fed: uint16 draws in a graph input of that shape, compared with 65536 r
    (vsonnx.random_feeds; make_session draws them, seeded); elsewhere u = RandomUniformLike(x) with a seed of
    its own drawn from ``seed`` (about 4x slower: one thread). Dropout nodes named in ``channelwise``
    (Dropout1d/2d/3d, inputs of rank >= 3) drop whole channels: u has shape [N, C, 1, ...] (drawn like
    GlobalAveragePool(x)), broadcast.
    onnxruntime removes Dropout nodes when graph optimisations are on, even in training mode; these operations
    it keeps, so the passes that simulate training run optimised. Any opset (the ratio comes from the
    attribute below opset 12). Refuses a constant ratio outside [0, 1)."""
    dropouts = [n for n in graph.nodes if n.op == "Dropout"]
    for k, (node, node_seed) in enumerate(zip(dropouts, dropout_seeds(seed, len(dropouts)))):
        x, prefix = node.inputs[0], f"vsonnx_drop{k}"
        ratio = node.inputs[1] if opset >= 12 and len(node.inputs) > 1 and node.inputs[1].name else \
            _const(f"{prefix}_ratio", np.float32(node.attrs.get("ratio", 0.5)))
        if isinstance(ratio, gs.Constant) and not 0 <= float(np.asarray(ratio.values)) < 1:
            raise VsonnxError(f"Dropout '{node_name(node)}' has ratio {float(np.asarray(ratio.values)):g}, outside "
                              "[0, 1): its training cannot be simulated.", "use --method batch or population.")
        x_type = helper.tensor_dtype_to_np_dtype(dtypes.get(x.name, TensorProto.FLOAT))
        by_channel = node_name(node) in channelwise

        def op(name, kind, inputs, dtype=np.float32, **attrs):
            out = gs.Variable(f"{prefix}_{name}", dtype=dtype)
            graph.layer(op=kind, inputs=inputs, outputs=[out], attrs=attrs)
            return out

        r = op("r", "Cast", [ratio], to=TensorProto.FLOAT)
        fed_shape = _random_input_shape(shapes, x.name, by_channel) if shapes is not None else None
        if fed_shape is not None:  # drop where u < ceil(65536 r), at most 65535, compared as uint16: the rule of
            # random_feeds.drop_threshold, computed here in the graph because r may be a tensor
            u = gs.Variable(f"{RANDOM_PREFIX}{k}", dtype=np.uint16, shape=fed_shape)
            graph.inputs.append(u)
            levels = op("levels", "Ceil", [op("r_levels", "Mul", [r, _const(f"{prefix}_65536", np.float32(LEVELS))])])
            top = _const(f"{prefix}_65535", np.float32(LEVELS - 1))
            threshold = op("threshold", "Cast", [op("clipped", "Min", [levels, top])], np.uint16, to=TensorProto.UINT16)
        else:
            like = op("pooled", "GlobalAveragePool", [x], x_type) if by_channel else x
            u = op("u", "RandomUniformLike", [like], dtype=TensorProto.FLOAT, seed=float(node_seed))
            threshold = r
        keep = op("keep", "Not", [op("drop", "Less", [u, threshold], dtype=bool)], dtype=bool)
        x_onnx_type = int(dtypes.get(x.name, TensorProto.FLOAT))
        scale = op("scale", "Div", [_const(f"{prefix}_one", np.float32(1)), op("p", "Sub", [_const(f"{prefix}_1", np.float32(1)), r])])
        kept = op("kept", "Mul", [x, op("keepx", "Cast", [keep], x_type, to=x_onnx_type)], x_type)
        outputs = list(node.outputs)
        node.outputs.clear()
        # two Muls: faster than one by Where(drop, 0, scale) (onnxruntime's Where broadcasts scalars slowly)
        graph.layer(op="Mul", inputs=[kept, op("scalex", "Cast", [scale], x_type, to=x_onnx_type)], outputs=[outputs[0]])
        if len(outputs) > 1 and outputs[1].name:  # the mask output, when the graph reads it
            graph.layer(op="Identity", inputs=[keep], outputs=[outputs[1]])
    graph.cleanup()


def _random_input_shape(shapes: TensorShapes, name: str, by_channel: bool) -> list | None:
    """The shape of the draws for a Dropout on tensor ``name``: [batch, ...] (by channel: [batch, C, 1, ...])
    when every dim but the batch is known, else None."""
    shape, symbols = shapes.get(name), shapes.symbols.get(name)
    if not shape or symbols is None or symbols[0] != BATCH_DIM or any(d is None for d in shape[1:]):
        return None
    if by_channel and len(shape) >= 3:
        return [BATCH_DIM, shape[1]] + [1] * (len(shape) - 2)
    return [BATCH_DIM, *shape[1:]]


def insert_dropouts(model: onnx.ModelProto, sites: dict[str, float], *, training: bool, seed: int = DROPOUT_SEED,
                    before_bias: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """A copy with Dropout(ratio, training_mode) on each site tensor, feeding all its former consumers; a
    site in ``before_bias`` (the output of a Conv/Gemm) gets it between the layer's product and its bias; a
    site in ``sites.per_sample`` (when ``sites`` carries that set: a drop path named by its module) is
    dropped per sample, in the form vsonnx.export writes stochastic depth (a Dropout of ones [N, 1, ...]
    scaling the tensor). Refuses a site that is a graph output, and a per-sample site of unknown rank."""
    graph = import_graph(model)
    tensors = graph.tensors()
    outputs = {t.name for t in graph.outputs}
    per_sample = getattr(sites, "per_sample", frozenset())
    ranks = {n: len(s) for n, s in tensor_shapes(model).items() if s is not None} if per_sample else {}
    for k, ((name, ratio), node_seed) in enumerate(zip(sites.items(), dropout_seeds(seed, len(sites)))):
        tensor = tensors[name]
        if name in per_sample:
            if name in outputs or name not in ranks:
                raise VsonnxError(f"drop-path site '{name}' is a graph output or of unknown rank.",
                                  "name a tensor inside the network, or run onnx shape inference first.")
            _drop_path(graph, tensor, ranks[name], ratio, training, node_seed, k)
            continue
        if name in before_bias:
            dropped_input = gs.Variable(f"{name}__vsonnx_product")
            dropped = gs.Variable(f"{dropped_input.name}__vsonnx_dropout")
            _split_bias(graph, tensor, dropped_input, dropped, k)
        else:
            if name in outputs:
                raise VsonnxError(f"site '{name}' is a graph output.", "name a tensor inside the network.")
            dropped_input, dropped = tensor, gs.Variable(f"{name}__vsonnx_dropout")
            _redirect(graph, tensor, dropped)
        graph.layer(op="Dropout", name=f"vsonnx_dropout_{k}", attrs={"seed": node_seed},
                    inputs=[dropped_input, _const(f"vsonnx_site{k}_ratio", np.float32(ratio)),
                            _const(f"vsonnx_site{k}_training", training)], outputs=[dropped])
    return to_model(graph, model)


def _drop_path(graph: gs.Graph, tensor: gs.Variable, rank: int, ratio: float, training: bool, seed: int,
               k: int) -> None:
    """``tensor`` * Dropout(ones [N, 1, ...]) for all its former consumers (per-sample noise)."""
    def op(kind, inputs, name, dtype=np.float32, **attrs):
        out = gs.Variable(f"vsonnx_path{k}_{name}", dtype=dtype)
        graph.layer(op=kind, name=f"vsonnx_path{k}_{name}", inputs=inputs, outputs=[out], attrs=attrs)
        return out

    scaled = gs.Variable(f"{tensor.name}__vsonnx_drop_path")
    _redirect(graph, tensor, scaled)
    shape = op("Shape", [tensor], "shape", np.int64)
    batch = op("Slice", [shape, _const(f"vsonnx_path{k}_0", np.array([0], np.int64)),
                         _const(f"vsonnx_path{k}_1", np.array([1], np.int64))], "batch", np.int64)
    dims = op("Concat", [batch, _const(f"vsonnx_path{k}_rest", np.ones(rank - 1, np.int64))], "dims", np.int64,
              axis=0)
    ones = op("ConstantOfShape", [dims], "ones", value=onnx.numpy_helper.from_array(np.ones(1, np.float32)))
    kept = op("Dropout", [ones, _const(f"vsonnx_site{k}_ratio", np.float32(ratio)),
                          _const(f"vsonnx_site{k}_training", training)], "mask", seed=seed)
    graph.layer(op="Mul", name=f"vsonnx_path{k}_mul", inputs=[tensor, kept], outputs=[scaled])


def _split_bias(graph: gs.Graph, tensor: gs.Variable, product: gs.Variable, dropped: gs.Variable, k: int) -> None:
    """Make the Conv/Gemm producing ``tensor`` output ``product`` without its bias; ``tensor`` becomes
    ``dropped`` (the dropout of the product, inserted by the caller) + bias, through an Add (or Identity
    when the layer has no constant bias)."""
    layer = tensor.inputs[0]
    layer.outputs[0] = product
    bias = layer.inputs[2] if len(layer.inputs) > 2 and isinstance(layer.inputs[2], gs.Constant) else None
    if bias is None:
        graph.layer(op="Identity", name=f"vsonnx_bias_{k}", inputs=[dropped], outputs=[tensor])
        return
    weight = np.asarray(layer.inputs[1].values)
    channels = weight.shape[0] if layer.op == "Conv" or layer.attrs.get("transB", 0) else weight.shape[-1]
    values = channel_bias(layer.op, bias.values, channels, layer.attrs.get("beta", 1.0))
    if values is None:  # a per-row Gemm C: the bias stays in the layer, the dropout acts on product + bias
        graph.layer(op="Identity", name=f"vsonnx_bias_{k}", inputs=[dropped], outputs=[tensor])
        return
    if layer.op == "Conv":
        values = values.reshape((-1,) + (1,) * (weight.ndim - 2))
    layer.inputs = layer.inputs[:2]
    graph.layer(op="Add", name=f"vsonnx_bias_{k}", outputs=[tensor],
                inputs=[dropped, _const(f"vsonnx_site{k}_bias", values.astype(weight.dtype))])


# --------------------------------------------------------------------------------------------------
# statistic taps
# --------------------------------------------------------------------------------------------------
@dataclass
class Tap:
    """A tensor whose per-channel moments a pass measures, as moments of (x - shift)."""

    tensor: str
    rank: int
    channels: int
    shift: np.ndarray
    elements: int | None  # per sample and channel, when static
    dtype: int = TensorProto.FLOAT  # ONNX element type of the tensor; moments are taken in float32


def bn_tap(index: GraphIndex, node: onnx.NodeProto, shapes: TensorShapes) -> Tap:
    """The input of a BN, shifted by its stored running mean. Refuses an input of unknown rank or rank < 2."""
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


def tensor_tap(tensor: str, shapes: TensorShapes) -> Tap | None:
    """Any tensor [N, C, ...] with a static channel count (no shift); None when its shape is unknown."""
    shape = shapes.get(tensor)
    if shape is None or len(shape) < 2 or not shape[1]:
        return None
    return Tap(tensor, len(shape), int(shape[1]), np.zeros(shape[1], np.float32), _static_elements(shape),
               shapes.dtypes.get(tensor, TensorProto.FLOAT))


def _static_elements(shape: tuple) -> int | None:
    spatial = shape[2:]
    return int(np.prod(spatial)) if all(isinstance(d, int) and d > 0 for d in spatial) else None


class StatisticBuilder:
    """Adds statistic nodes to a gs graph in the model's opset (ReduceMean axes are an input from opset 18)
    and collects the names to fetch."""

    def __init__(self, graph: gs.Graph, opset: int):
        self.graph, self.opset = graph, opset
        self.tensors = graph.tensors()
        self.fetch: list[gs.Variable] = []
        self.created: dict[str, gs.Variable] = {}

    def node(self, op: str, inputs: list, out: str, dtype=np.float32, **attrs) -> gs.Variable:
        output = gs.Variable(out, dtype=dtype)
        self.graph.layer(op=op, inputs=inputs, outputs=[output], attrs=attrs)
        self.created[out] = output
        return output

    def reduce_mean(self, x: gs.Tensor, out: str, axes: list[int], keepdims: int = 0) -> gs.Variable:
        if self.opset >= 18:
            return self.node("ReduceMean", [x, _const(f"{out}_axes", np.array(axes, np.int64))], out,
                             keepdims=keepdims)
        return self.node("ReduceMean", [x], out, axes=axes, keepdims=keepdims)

    def elements(self, tap: Tap, prefix: str):
        """Elements per sample and channel of the tapped tensor: an int when static, else a Shape(x) tensor
        (only then: a Shape node on x would force onnxruntime to convert x out of its blocked layout)."""
        if tap.elements is not None:
            return tap.elements
        return self.node("Shape", [self.tensors[tap.tensor]], f"{prefix}_shape", np.int64)

    def sample_moments(self, tap: Tap, prefix: str) -> tuple:
        """(g1, g2, size): per-sample means of y = x - shift and of y^2 ([N, C, 1...] tensors) and the
        elements per sample and channel (``elements``)."""
        x, rank = self.tensors[tap.tensor], tap.rank
        np_dtype = helper.tensor_dtype_to_np_dtype(tap.dtype)
        shift = _const(f"{prefix}_shift", np.asarray(tap.shift, np_dtype).reshape([1, tap.channels] + [1] * (rank - 2)))
        y = self.node("Sub", [x, shift], f"{prefix}_y", dtype=np_dtype)
        if tap.dtype != TensorProto.FLOAT:  # float16/bfloat16/double inputs: moments in float32
            y = self.node("Cast", [y], f"{prefix}_y32", to=TensorProto.FLOAT)
        yy = self.node("Mul", [y, y], f"{prefix}_yy")
        if rank == 2:
            return y, yy, 1
        return (self.node("GlobalAveragePool", [y], f"{prefix}_g1"),
                self.node("GlobalAveragePool", [yy], f"{prefix}_g2"), self.elements(tap, prefix))

    def add_taps(self, taps: dict[str, Tap], prefix: str) -> dict[str, tuple]:
        """Moments of every tap: {key: (g1 name, g2 name, elements or Shape output name)}; marks them fetched."""
        outputs = {}
        for k, (key, tap) in enumerate(taps.items()):
            trio = self.sample_moments(tap, f"{prefix}{k}")
            self.fetch += [t for t in trio if isinstance(t, gs.Variable)]
            outputs[key] = tuple(t.name if isinstance(t, gs.Variable) else t for t in trio)
        return outputs

    def finish(self, extra_outputs: list[gs.Tensor] = (), prune: bool = False) -> None:
        """Make the fetched tensors (and ``extra_outputs``) graph outputs; with ``prune`` they are the only ones
        and every node not needed for them is removed (gs cleanup)."""
        wanted = self.fetch + list(extra_outputs)
        self.graph.outputs = wanted if prune else self.graph.outputs + wanted
        if prune:
            self.graph.cleanup(remove_unused_graph_inputs=True)


def fetch_names(outputs: dict[str, tuple]) -> list[str]:
    """Output names to fetch: g1, g2 and, where the spatial size is not static, Shape(x)."""
    return [t for trio in outputs.values() for t in trio if isinstance(t, str)]


def fetched_elements(got: dict, size: int | str) -> int:
    """Elements per sample and channel: ``size`` itself when static, else from its fetched Shape(x)."""
    return size if isinstance(size, int) else int(np.prod(got[size][2:]))


def per_sample(got: dict, trio: tuple, n_samples: int):
    """(elements per sample and channel, per-sample means [N, C], per-sample sums of squared deviations
    [N, C]) in float64 from the fetched g1/g2 outputs (moments of x - shift)."""
    g1, g2 = got[trio[0]], got[trio[1]]
    elements = fetched_elements(got, trio[2])
    mean = g1.reshape(n_samples, -1).astype(np.float64)
    m2 = np.maximum(g2.reshape(n_samples, -1).astype(np.float64) - mean * mean, 0.0) * elements
    return elements, mean, m2


def accumulate_moments(moments: dict[str, ChannelMoments], outputs: dict, got: dict, n_samples: int) -> None:
    """Add one batch's per-sample moments (fetched ``got`` for the tap ``outputs``) to ``moments``."""
    for key, trio in outputs.items():
        elements, sample_mean, sample_m2 = per_sample(got, trio, n_samples)
        moments[key].update_samples(elements, sample_mean, sample_m2)


def unshift(moments: dict[str, ChannelMoments], taps: dict[str, Tap]) -> dict[str, ChannelMoments]:
    """The taps measured x - shift: add each shift back to the mean (the variance is unchanged)."""
    for key, m in moments.items():
        m.mean = m.mean + taps[key].shift.astype(np.float64)
    return moments


def write_statistics(graph: gs.Graph, stats: dict[str, BnStatistics]) -> None:
    """Point the mean/var inputs of each BN of ``stats`` present in ``graph`` at fresh constants (working
    copies only: the written model is edited by vsonnx.rewrite)."""
    nodes = nodes_by_name(graph)
    for k, (name, st) in enumerate(stats.items()):
        node = nodes.get(name)
        if node is None:
            continue
        old = node.inputs[3]
        dtype = old.values.dtype if isinstance(old, gs.Constant) else np.float32
        for slot, value in ((3, st.mean), (4, st.var)):
            node.inputs[slot] = _const(f"vsonnx_new_{k}_{slot}", np.asarray(value, dtype))


# --------------------------------------------------------------------------------------------------
# instrumented copies and the pass that reads them
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchOutputs:
    """Where a batch-pass copy puts one BN's batch mean and biased batch variance (float32, C values each) and
    the elements per sample and channel (an int, or a Shape(x) output when the spatial size is not static)."""

    mean: str
    var: str
    size: int | str

    def fetch(self) -> list[str]:
        return [self.mean, self.var] + ([self.size] if isinstance(self.size, str) else [])

    def batch(self, got: dict, n_samples: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(values per channel in the batch, batch mean, biased batch variance), float64."""
        mean, var = (np.asarray(got[t], np.float64).reshape(-1) for t in (self.mean, self.var))
        return n_samples * fetched_elements(got, self.size), mean, var


def instrument_batch(model: onnx.ModelProto, targets: list[str], dropout_active: bool = False,
                     channelwise: frozenset[str] = frozenset(), cpu: bool = True, threads: int = 1):
    """Working copy where each target BN normalises with its batch statistics and outputs them (every Dropout
    drops as in training with ``dropout_active``: simulate_dropouts, ``channelwise`` nodes by channel);
    returns (model, {bn: BatchOutputs}). Two ways to compute them, same maths:

    - onnxruntime's own kernel (``cpu``: its CPU provider, and a session of one thread): a float32 BN of opset
      >= 14 with one output runs in training mode with momentum 0, normalises and outputs the batch mean and
      biased variance (tools/bench_fix.py, PreResNet-20 at 1 thread: 1.20x plain inference; the taps this
      replaced, 1.41x). That kernel runs on one thread whatever the session has.
    - pooled in the graph (``_pooled_batch_statistics``, every other case): mean = mean_n(GAP(x)),
      var = mean_n(GAP((x - mean)^2)), y = (x - mean) * gamma / sqrt(var + eps) + beta in float32 with
      operators onnxruntime spreads over all threads (2 threads: 1.37x plain where the kernel took 1.66x on
      this VM's slow phase, about equal in its fast one; 1 thread: 1.33x).
    ``cpu`` also lets simulated dropouts read fed draws (simulated_graph)."""
    graph, shapes = simulated_graph(model, dropout_active, channelwise=channelwise, fed=cpu)
    index = GraphIndex(model)
    bn_nodes, nodes = index.batchnorms(targets), nodes_by_name(graph)
    opset = default_opset(model) or 13
    builder = StatisticBuilder(graph, opset)
    outputs: dict[str, BatchOutputs] = {}
    for k, name in enumerate(targets):
        prefix, tap, node = f"vsonnx_s{k}", bn_tap(index, bn_nodes[name], shapes), nodes[name]
        stat_type = shapes.dtypes.get(bn_nodes[name].input[3], TensorProto.FLOAT)
        if cpu and threads == 1 and opset >= 14 and tap.dtype == stat_type == TensorProto.FLOAT \
                and len(node.outputs) == 1:
            mean, var = (gs.Variable(f"{prefix}_{what}", dtype=np.float32) for what in ("mean", "var"))
            node.attrs.update(training_mode=1, momentum=0.0)  # running outputs = the batch's own statistics
            node.outputs = [node.outputs[0], mean, var]
        else:
            mean, var = _pooled_batch_statistics(builder, node, tap, prefix, stat_type)
        size = builder.elements(tap, prefix)
        builder.fetch += [t for t in (mean, var, size) if isinstance(t, gs.Variable)]
        outputs[name] = BatchOutputs(mean.name, var.name, size if isinstance(size, int) else size.name)
    builder.finish()
    graph.cleanup()  # the replaced BN nodes
    return to_model(graph, model), outputs


def _pooled_batch_statistics(builder: StatisticBuilder, node: gs.Node, tap: Tap, prefix: str, stat_type: int):
    """Make ``node`` normalise with the batch statistics of its input computed in the graph (instrument_batch);
    returns their tensors ([1, C, 1, ...], float32). The BN node is replaced by the operators, except one
    whose other outputs the graph reads: it is fed the statistics instead."""
    x = builder.tensors[tap.tensor]
    if tap.dtype != TensorProto.FLOAT:  # float16/bfloat16/double: statistics and normalisation in float32
        x = builder.node("Cast", [x], f"{prefix}_x32", to=TensorProto.FLOAT)

    def pooled(t, what):  # per-sample means over the spatial axes, then over the batch
        per_sample = builder.node("GlobalAveragePool", [t], f"{prefix}_{what}_n") if tap.rank > 2 else t
        return builder.reduce_mean(per_sample, f"{prefix}_{what}", [0], keepdims=1)

    mean = pooled(x, "mean")
    centred = builder.node("Sub", [x, mean], f"{prefix}_centred")
    var = pooled(builder.node("Mul", [centred, centred], f"{prefix}_squares"), "var")
    if len(node.outputs) > 1:
        flat = _const(f"{prefix}_flat", np.array([-1], np.int64))
        for slot, stat in ((3, mean), (4, var)):
            stat = builder.node("Reshape", [stat, flat], f"{stat.name}_flat")
            if stat_type != TensorProto.FLOAT:
                stat = builder.node("Cast", [stat], f"{stat.name}_t", to=stat_type)
            node.inputs[slot] = stat
        return mean, var
    view = _const(f"{prefix}_view", np.array([1, -1] + [1] * (tap.rank - 2), np.int64))

    def per_channel(t, what):  # gamma, beta (of any float type) as [1, C, 1, ...] float32
        shaped = builder.node("Reshape", [t, view], f"{prefix}_{what}", dtype=None)
        return builder.node("Cast", [shaped], f"{prefix}_{what}32", to=TensorProto.FLOAT)

    eps = _const(f"{prefix}_eps", np.float32(node.attrs.get("epsilon", 1e-5)))
    std = builder.node("Sqrt", [builder.node("Add", [var, eps], f"{prefix}_var_eps")], f"{prefix}_std")
    scale = builder.node("Div", [per_channel(node.inputs[1], "gamma"), std], f"{prefix}_scale")
    scaled = builder.node("Mul", [centred, scale], f"{prefix}_scaled")
    y, beta = node.outputs[0], per_channel(node.inputs[2], "beta")
    node.outputs.clear()
    if tap.dtype == TensorProto.FLOAT:
        builder.graph.layer(op="Add", inputs=[scaled, beta], outputs=[y])
    else:
        builder.graph.layer(op="Cast", inputs=[builder.node("Add", [scaled, beta], f"{prefix}_y32")], outputs=[y],
                            attrs={"to": tap.dtype})
    return mean, var


def instrument_moments(model: onnx.ModelProto, taps: dict[str, Tap], new_stats: dict[str, BnStatistics],
                       keep_dropout_modes: bool = False):
    """Working copy where BNs in ``new_stats`` use them, every tap outputs per-sample moments of its
    tensor minus the tap's shift, and everything not needed for those outputs is pruned.
    Returns (model, {tap: (g1, g2, elements or Shape output)})."""
    graph = working_graph(model, keep_dropout_modes)
    write_statistics(graph, new_stats)
    builder = StatisticBuilder(graph, default_opset(model) or 13)
    outputs = builder.add_taps(taps, "vsonnx_p")
    builder.finish(prune=True)
    return to_model(graph, model), outputs


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
    moments = {key: ChannelMoments(tap.channels) for key, tap in taps.items()}
    samples, batches = run_pass(session, source, batch_size, fetch_names(outputs), label, progress,
                                lambda b, n, got: accumulate_moments(moments, outputs, got, n))
    return unshift(moments, taps), samples, batches, session.get_providers()[0]


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
