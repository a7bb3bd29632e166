"""Dropout in a working copy: simulated in training mode (fresh seeded masks per run, fed uniform draws or
RandomUniformLike, channel-wise for Dropout1d/2d/3d) and inserted where an export removed it (named sites,
drop paths, between a folded layer's product and its bias) (DESIGN 5.2, 5.3).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from .errors import VsonnxError
from .graph import TensorShapes, channel_bias, tensor_shapes
from .model import default_opset
from .random_feeds import DROPOUT_SEED, LEVELS, RANDOM_PREFIX
from .working_copy import BATCH_DIM, const_tensor, redirect, import_graph, node_name, to_model, working_graph


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
            const_tensor(f"{prefix}_ratio", np.float32(node.attrs.get("ratio", 0.5)))
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
            levels = op("levels", "Ceil", [op("r_levels", "Mul", [r, const_tensor(f"{prefix}_65536", np.float32(LEVELS))])])
            top = const_tensor(f"{prefix}_65535", np.float32(LEVELS - 1))
            threshold = op("threshold", "Cast", [op("clipped", "Min", [levels, top])], np.uint16, to=TensorProto.UINT16)
        else:
            like = op("pooled", "GlobalAveragePool", [x], x_type) if by_channel else x
            u = op("u", "RandomUniformLike", [like], dtype=TensorProto.FLOAT, seed=float(node_seed))
            threshold = r
        keep = op("keep", "Not", [op("drop", "Less", [u, threshold], dtype=bool)], dtype=bool)
        x_onnx_type = int(dtypes.get(x.name, TensorProto.FLOAT))
        scale = op("scale", "Div", [const_tensor(f"{prefix}_one", np.float32(1)), op("p", "Sub", [const_tensor(f"{prefix}_1", np.float32(1)), r])])
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
            redirect(graph, tensor, dropped)
        graph.layer(op="Dropout", name=f"vsonnx_dropout_{k}", attrs={"seed": node_seed},
                    inputs=[dropped_input, const_tensor(f"vsonnx_site{k}_ratio", np.float32(ratio)),
                            const_tensor(f"vsonnx_site{k}_training", training)], outputs=[dropped])
    return to_model(graph, model)


def _drop_path(graph: gs.Graph, tensor: gs.Variable, rank: int, ratio: float, training: bool, seed: int,
               k: int) -> None:
    """``tensor`` * Dropout(ones [N, 1, ...]) for all its former consumers (per-sample noise)."""
    def op(kind, inputs, name, dtype=np.float32, **attrs):
        out = gs.Variable(f"vsonnx_path{k}_{name}", dtype=dtype)
        graph.layer(op=kind, name=f"vsonnx_path{k}_{name}", inputs=inputs, outputs=[out], attrs=attrs)
        return out

    scaled = gs.Variable(f"{tensor.name}__vsonnx_drop_path")
    redirect(graph, tensor, scaled)
    shape = op("Shape", [tensor], "shape", np.int64)
    batch = op("Slice", [shape, const_tensor(f"vsonnx_path{k}_0", np.array([0], np.int64)),
                         const_tensor(f"vsonnx_path{k}_1", np.array([1], np.int64))], "batch", np.int64)
    dims = op("Concat", [batch, const_tensor(f"vsonnx_path{k}_rest", np.ones(rank - 1, np.int64))], "dims", np.int64,
              axis=0)
    ones = op("ConstantOfShape", [dims], "ones", value=onnx.numpy_helper.from_array(np.ones(1, np.float32)))
    kept = op("Dropout", [ones, const_tensor(f"vsonnx_site{k}_ratio", np.float32(ratio)),
                          const_tensor(f"vsonnx_site{k}_training", training)], "mask", seed=seed)
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
                inputs=[dropped, const_tensor(f"vsonnx_site{k}_bias", values.astype(weight.dtype))])
