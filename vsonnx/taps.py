"""Statistic taps: working copies that output per-sample moments of BN inputs (or any tensor), with new BN
statistics swapped in, and the batch-statistics copies of the batch method (DESIGN 5.2).

For a BN input x of shape [N, C, ...] a copy computes per-sample moments of x shifted by the BN's stored
running mean s (close to the real mean, so E[y^2] - E[y]^2 does not cancel badly):

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

from .errors import VsonnxError
from .graph import GraphIndex, TensorShapes
from .model import default_opset
from .stats import BnStatistics, ChannelMoments
from .simulate import simulated_graph
from .working_copy import const_tensor, nodes_by_name, to_model, working_graph


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
        unknown = sorted({f"{n.domain}:{n.op_type}" for n in index.upstream_nodes(node.input[0])
                          if n.domain not in ("", "ai.onnx")})
        if shape is None and unknown:  # onnx shape inference stops at operators of other domains
            raise VsonnxError(f"the rank of the input of BatchNormalization '{index.node_name(node)}' is unknown: "
                              f"onnx shape inference does not follow {', '.join(unknown[:3])} before it.",
                              "use the model from before onnxruntime's offline optimisation (which writes such "
                              "operators), or an export with standard ONNX operators only.")
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
            return self.node("ReduceMean", [x, const_tensor(f"{out}_axes", np.array(axes, np.int64))], out,
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
        shift = const_tensor(f"{prefix}_shift", np.asarray(tap.shift, np_dtype).reshape([1, tap.channels] + [1] * (rank - 2)))
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
            node.inputs[slot] = const_tensor(f"vsonnx_new_{k}_{slot}", np.asarray(value, dtype))


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
        flat = const_tensor(f"{prefix}_flat", np.array([-1], np.int64))
        for slot, stat in ((3, mean), (4, var)):
            stat = builder.node("Reshape", [stat, flat], f"{stat.name}_flat")
            if stat_type != TensorProto.FLOAT:
                stat = builder.node("Cast", [stat], f"{stat.name}_t", to=stat_type)
            node.inputs[slot] = stat
        return mean, var
    view = const_tensor(f"{prefix}_view", np.array([1, -1] + [1] * (tap.rank - 2), np.int64))

    def per_channel(t, what):  # gamma, beta (of any float type) as [1, C, 1, ...] float32
        shaped = builder.node("Reshape", [t, view], f"{prefix}_{what}", dtype=None)
        return builder.node("Cast", [shaped], f"{prefix}_{what}32", to=TensorProto.FLOAT)

    eps = const_tensor(f"{prefix}_eps", np.float32(node.attrs.get("epsilon", 1e-5)))
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
