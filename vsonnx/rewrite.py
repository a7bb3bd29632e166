"""The rewrite pass: new constants into the model that is written (find -> check -> apply).

- find: ``targets(report, scope)``: the sites and every BN downstream of one (``scope="sites"``), or every
  BN (``scope="all"``), from the site finder `scan` uses;
- check: ``refusal(index, node, info, stats)`` returns None or why a BN is not rewritten:
  1. its running mean/var are not constants (initializers, Identity nodes of them, or constant subgraphs
     such as ConstantOfShape, which the written model then holds as initializers of this BN)
  2. it is in training mode  3. no statistics were measured (or can be: its output reaches no graph output)
  4. its stored mean/var are not finite, or the variance is negative (the model is broken there); and every
     BN of a model where one BN holds a stored mean that is not finite or a variance that is NaN or negative
     (``poisons``: every value after it is NaN, so a written model would output NaN whatever else is
     fixed; an infinite variance only zeroes its output and refuses that BN alone);
  ``plan`` runs find + check, so what `scan` shows per BN is what `fix` does;
  ``invalid_statistics`` checks every new statistic before anything is written:
  5. a new mean/var that is not finite, or a negative variance  6. statistics estimated from fewer than
     ``MIN_VALUES`` values per channel (e.g. a BatchNorm1d calibrated on fewer than 16 samples);
  7. (BNs inside If/Loop/Scan subgraphs, which sites.find_sites lists but does not analyse: never rewritten);
- apply: ``RecalibrateBatchNorm.apply`` writes new mean/var into the BN's initializers and returns whether
  anything changed (a second application of the same statistics changes nothing); ``apply_affine`` writes
  a per-output-channel correction y' = a*y + b into the weight and bias of a Conv/Gemm whose BN was folded
  (refused for other ops: only Conv and Gemm carry a bias). An initializer shared with another node is
  copied before it is edited, never changed in place.

This pass edits the ModelProto directly rather than through onnx-graphsurgeon: it only replaces initializer
values, and a gs round trip would drop what the written model must keep (model and node metadata, IR 3
graph inputs, node order); vsonnx.working_copy builds the working copies with gs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import VsonnxError
from .graph import GraphIndex, attribute, channel_bias
from .runtime import make_session
from .sites import BatchNormInfo, ScanReport
from .stats import BnStatistics

SCOPES = ("sites", "all")
MIN_VALUES = 16  # values per channel below which re-estimated statistics are refused (rule 6)


def targets(batchnorms: list[BatchNormInfo], scope: str) -> list[BatchNormInfo]:
    """find: the BNs in ``scope`` (sites and downstream, or all)."""
    if scope not in SCOPES:
        raise VsonnxError(f"unknown scope '{scope}'.", "use sites or all.")
    return [b for b in batchnorms if scope == "all" or b.site or b.downstream_of_site]


def refusal(index: GraphIndex, node: onnx.NodeProto, info: BatchNormInfo,
            stats: dict[str, BnStatistics] | None = None) -> str | None:
    """check: why this BN cannot be rewritten (None when it can); ``stats``, when given, must hold it."""
    if len(node.input) < 5 or any(index.constant(n) is None for n in node.input[3:5]):
        return "1: running mean/var are computed from the data, not constants"
    if info.training_mode:
        return "2: BatchNormalization is in training mode"
    if id(node) not in index.live:
        return "3: its output reaches no graph output, so nothing measures it (and it changes no output)"
    if stats is not None and info.name not in stats:
        return "3: no statistics were measured for it"
    mean, var = (np.asarray(index.constant(n), np.float64) for n in node.input[3:5])
    if poisons(mean, var) or not np.isfinite(var).all():
        return "4: its stored running mean/var are not finite or the variance is negative"
    return None


def poisons(mean: np.ndarray, var: np.ndarray) -> bool:
    """Stored statistics that make every value after the BN NaN: a mean that is not finite, a variance that
    is NaN or negative (sqrt of it is NaN); +inf alone only zeroes the output."""
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    return bool(not np.isfinite(mean).all() or np.isnan(var).any() or (var < 0).any())


def poisoning_batchnorms(index: GraphIndex) -> dict[str, onnx.NodeProto]:
    """The BNs whose stored statistics are constants that poison (see poisons), by name."""
    found = {}
    for name, node in index.batchnorms().items():
        stored = [index.constant(i) for i in node.input[3:5]]
        if len(stored) == 2 and stored[0] is not None and stored[1] is not None and poisons(*stored):
            found[name] = node
    return found


def invalid_statistics(stats: BnStatistics) -> str | None:
    """Why new statistics must not be written (rules 5 and 6), or None."""
    mean, var = np.asarray(stats.mean, np.float64), np.asarray(stats.var, np.float64)
    if not (np.isfinite(mean).all() and np.isfinite(var).all()):
        return "5: the new mean/var are not finite"
    if (var < 0).any():
        return "5: the new variance is negative"
    if stats.values is not None and stats.values < MIN_VALUES:
        return (f"6: estimated from {stats.values} value(s) per channel, fewer than {MIN_VALUES}; "
                "calibrate on more samples")
    return None


@dataclass
class Decision:
    name: str
    refusal: str | None  # None: it will be rewritten


SUBGRAPH = "7: inside an If/Loop/Scan subgraph, which vsonnx does not recalibrate"


def plan(model: onnx.ModelProto, report: ScanReport, scope: str, index: GraphIndex | None = None) -> list[Decision]:
    """find + check for every BN in scope, in graph order, then every BN inside a subgraph (rule 7)
    (``index``: the model's GraphIndex when the caller has one)."""
    index = index or GraphIndex(model)
    nodes = index.batchnorms()
    broken = ", ".join(f"'{n}'" for n in list(poisoning_batchnorms(index))[:3])
    poisoned = f"4: {broken} make(s) every value after it NaN, so a model written from this one would too"
    return [Decision(b.name, refusal(index, nodes[b.name], b) or (poisoned if broken else None))
            for b in targets(report.batchnorms, scope)] + [Decision(n, SUBGRAPH) for n in report.subgraph_batchnorms]


class RecalibrateBatchNorm:
    """apply: replace a BN's running statistics with re-estimated ones."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.index = GraphIndex(model)

    def apply(self, name: str, stats: BnStatistics | None) -> bool:
        if stats is None:
            raise VsonnxError(f"no statistics were measured for '{name}' (refusal 3).",
                              "calibrate it (it must be in the chosen scope).")
        node = self.index.node(name)
        changed = False
        for slot, value in ((3, stats.mean), (4, stats.var)):
            source = self.index.initializer_behind(node.input[slot])
            if source is None:  # computed by a constant subgraph: folded into an initializer of its own
                tensor = self._own_copy(node, slot, numpy_helper.from_array(
                    np.asarray(self.index.constant(node.input[slot])), node.input[slot]))
            else:
                tensor = self.index.initializers[source]
            old = numpy_helper.to_array(tensor)
            new = np.asarray(value, dtype=old.dtype).reshape(old.shape)
            if np.array_equal(old, new):
                continue
            if tensor.name != node.input[slot] or sum(list(n.input).count(tensor.name) for n in self.model.graph.node) > 1:
                tensor = self._own_copy(node, slot, tensor)  # shared, or behind an Identity: this BN's own
            tensor.CopyFrom(numpy_helper.from_array(new, tensor.name))
            changed = True
        return changed

    def _own_copy(self, node: onnx.NodeProto, slot: int, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """A copy of a shared initializer for ``node`` alone."""
        name = f"{tensor.name}__vsonnx_{slot}_{len(self.model.graph.initializer)}"
        new = add_initializer(self.model, tensor, name)
        self.index.initializers[new.name] = new
        node.input[slot] = new.name
        return new


def inference_form(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of a training-mode export in inference form, and what changed: every BatchNormalization in
    training mode (``training_mode=1``, running-statistic outputs) normalises with its stored statistics
    (attribute 0, the extra outputs dropped), every Dropout whose ``training_mode`` is a constant true gets
    false. Refuses (VsonnxError) a graph that reads a BN's running-statistic outputs or computes a Dropout's
    training mode from the data. A model already in inference form comes back unchanged, with no notes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex(out)
    read = {i for n in out.graph.node for i in n.input} | {o.name for o in out.graph.output}
    bns = dropouts = 0
    for node in out.graph.node:
        if node.op_type == "BatchNormalization" and (attribute(node, "training_mode", 0) or len(node.output) > 1):
            extra = [o for o in node.output[1:] if o in read]
            if extra:
                raise VsonnxError(f"BatchNormalization '{index.node_name(node)}' is in training mode and the graph "
                                  f"reads its running statistics ('{extra[0]}').", "re-export the model in eval mode.")
            del node.output[1:]
            for a in [a for a in node.attribute if a.name in ("training_mode", "momentum")]:
                node.attribute.remove(a)
            bns += 1
        elif node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            mode = index.constant(node.input[2])
            if mode is None:
                raise VsonnxError(f"Dropout '{index.node_name(node)}' computes its training mode from the data.",
                                  "re-export the model in eval mode.")
            if bool(np.asarray(mode).reshape(-1)[0]):
                node.input[2] = _false(out)
                dropouts += 1
    notes = [f"converted from a training-mode export: {bns} BatchNormalization now use their stored statistics, "
             f"{dropouts} Dropout switched to inference"] if bns or dropouts else []
    return out, notes


def _false(model: onnx.ModelProto) -> str:
    name = "vsonnx_inference_mode"
    if not any(t.name == name for t in model.graph.initializer):
        add_initializer(model, numpy_helper.from_array(np.array(False)), name)
    return name


def add_initializer(model: onnx.ModelProto, tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    """A copy of ``tensor`` named ``name`` in the model's initializers; IR 3 models also list it among the
    graph inputs, as that IR requires."""
    new = model.graph.initializer.add()
    new.CopyFrom(tensor)
    new.name = name
    if model.ir_version < 4:
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    return new


def with_statistics(model: onnx.ModelProto, stats: dict[str, BnStatistics]) -> onnx.ModelProto:
    """A copy of ``model`` with ``stats`` applied."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rewrite = RecalibrateBatchNorm(out)
    for name, st in stats.items():
        rewrite.apply(name, st)
    return out


def apply_affine(model: onnx.ModelProto, corrections: dict[str, tuple[np.ndarray, np.ndarray]]) -> onnx.ModelProto:
    """A copy where each named Conv/Gemm computes a*y + b per output channel (weight and bias rewritten
    into new initializers, so shared ones stay intact; initializers left unused are dropped)."""
    out = copy.deepcopy(model)
    index = GraphIndex(out)
    for name, (a, b) in corrections.items():
        node = index.node(name)
        if node.op_type not in ("Conv", "Gemm"):
            raise VsonnxError(f"folded layer '{name}' is a {node.op_type}; only Conv and Gemm carry a bias.",
                              "re-export with vsonnx.export, or name other sites.")
        weight = numpy_helper.to_array(index.initializers[node.input[1]])
        w = weight.astype(np.float64)
        if node.op_type == "Conv":
            w = w * a.reshape((-1,) + (1,) * (w.ndim - 1))
        else:
            w = w * (a[:, None] if attribute(node, "transB", 0) else a[None, :])
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        stored = index.constant(bias_name) if bias_name else None
        bias = channel_bias(node.op_type, stored, a.size, attribute(node, "beta", 1.0))
        if bias is None or (bias_name and stored is None):
            raise VsonnxError(f"folded layer '{name}' adds a bias that is not one constant per output channel.",
                              "re-export with vsonnx.export (BN kept), or name other sites.")
        bias = bias * a + b  # y' = a * (W x + bias) + b; Gemm's beta is folded in and set to 1
        for slot, value, suffix in ((1, w, "w"), (2, bias, "b")):
            new_name = f"{name}__vsonnx_{suffix}"
            add_initializer(out, numpy_helper.from_array(value.astype(weight.dtype)), new_name)
            while len(node.input) <= slot:
                node.input.append("")
            node.input[slot] = new_name
        if node.op_type == "Gemm":
            kept_attributes = [x for x in node.attribute if x.name != "beta"]
            del node.attribute[:]
            node.attribute.extend(kept_attributes)
    used = {i for n in out.graph.node for i in n.input} | {i.name for i in out.graph.input}
    kept = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def validate(model: onnx.ModelProto, source: onnx.ModelProto | None = None) -> None:
    """The onnx checker and an onnxruntime session with its default graph optimisations (what a user's
    session resolves: a dead node whose shapes contradict each other passes with optimisations off) must
    both accept a model before it is written; the checker only where it accepts ``source``, the model it was
    made from (a model the checker already refused, e.g. a graph output without a shape, stays as it was)."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        try:
            onnx.checker.check_model(source) if source is not None else None
        except onnx.checker.ValidationError:
            pass
        else:
            raise RuntimeError(f"vsonnx produced an invalid model (bug): {exc}") from None
    make_session(model, device="cpu", optimize=True)
