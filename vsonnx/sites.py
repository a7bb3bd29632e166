"""Finding Dropout -> ... -> BatchNormalization sites (DESIGN 5.1).

A *site* is a BatchNormalization (any input rank >= 2, channel axis 1) whose input is reachable from a
Dropout output without crossing another normalisation. The path from each Dropout to the BN is classified:

- ``direct``: only shape ops (Identity/Reshape/Flatten/Squeeze/Unsqueeze/Cast) or a constant bias on the way;
- ``weight``: exactly one Conv/ConvTranspose/Gemm/MatMul with a constant weight on the way (fan-in d and the
  paper's mean cos^2(theta) recorded);
- ``merge``: an Add/Sum/Concat joins the dropout path with another computed tensor;
- ``other``: anything else (activation, pooling, two weight layers, ...).
When several dropouts or paths reach one BN the most general class wins (other > merge > weight > direct).

Stochastic depth (a residual branch dropped per sample in training) is recognised by its structure, as
vsonnx.export writes it: ``Mul(branch, Dropout(ones[N, 1, ...]))`` (``stochastic_depth_branch``); its noise
(kind ``sample``) starts at the Mul's output, usually reaching the next block's BN through the Add.

Every BN is reported, sites or not, with whether it lies downstream of a site (its statistics change once
a site is fixed). ``find_sites`` is pure: it reads the model and never changes it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
import onnx

from . import theory
from .folding import folded_batchnorms, looks_folded, unnormalised_weight_after
from .graph import (FOLD_TARGETS, MERGE_OPS, NORMALIZATION_OPS, SHAPE_OPS, WEIGHT_OPS, GraphIndex, attribute,
                    folded_by_exporter)
from .model import default_opset, get_metadata

PATH_ORDER = ("direct", "weight", "merge", "other")
EXPORT_HINT = (
    "export with vsonnx.export(model, example_input, 'model.onnx'), which keeps Dropout and unfolded BN; "
    "or name where dropout acted with `vsonnx fix --calib DATA --dropout NAME=RATIO`, NAME a tensor, a node or a "
    "PyTorch module pattern such as 'layer*.bn2' (BNs kept in the "
    "graph are recalibrated, BNs folded into a Conv/Gemm are corrected in its weights; name the layer after the "
    "dropout, or, when the dropout sat between a conv and its folded BN, the conv's output tensor)."
)


@dataclass
class DropoutInfo:
    name: str
    output: str
    ratio: float | None  # drop probability r (retain p = 1 - r); None when not statically known
    training_mode: bool | None  # None when not statically known
    channelwise: bool = False  # Dropout1d/2d/3d (from vsonnx.export metadata)
    per_sample: bool = False  # stochastic depth: the Dropout drops a tensor of ones that scales a branch
    acts_on: str = ""  # the tensor the noise multiplies (the Dropout's input; for stochastic depth the branch)

    @property
    def noise(self) -> str:
        """'sample' (stochastic depth), 'channel' (Dropout1d/2d/3d) or 'element'."""
        return "sample" if self.per_sample else "channel" if self.channelwise else "element"


@dataclass
class WeightInfo:
    op: str
    name: str
    fan_in: int | None
    cos2: float | None


@dataclass
class BatchNormInfo:
    name: str
    input: str
    channels: int
    epsilon: float
    training_mode: bool
    site: bool = False
    downstream_of_site: bool = False
    dropouts: list[DropoutInfo] = field(default_factory=list)
    path: str | None = None
    weight: WeightInfo | None = None
    predicted_var_ratio: float | None = None
    # (dropout name, weight node or None) of every path, when all are additive (see _Path.additive)
    noise_paths: list[tuple[str, str | None]] | None = field(default=None, repr=False)
    data_free: str | None = None  # sites: what fix --data-free would do, or why it cannot (set by scan)
    fix: str | None = None  # what fix would do: recalibrate / unchanged / refused: <reason> (set by scan)
    # filled by vsonnx.shift.measure_shift (scan --calib)
    real_var_ratio: float | None = None
    shift_metric: float | None = None
    mean_shift: float | None = None
    prediction_error: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("noise_paths")
        d["dropouts"] = [{"name": x.name, "ratio": x.ratio, "channelwise": x.channelwise} for x in self.dropouts]
        if self.weight is not None:
            d["weight"] = {"op": self.weight.op, "name": self.weight.name, "fan_in": self.weight.fan_in,
                           "cos2": self.weight.cos2}
        return d


@dataclass
class ScanReport:
    model: str
    batchnorms: list[BatchNormInfo]
    dropouts: list[DropoutInfo]
    warnings: list[str]
    calibration: dict | None = None  # set when measured on data (scan --calib)
    subgraph_batchnorms: list[str] = field(default_factory=list)  # 'If node/then_branch/BN name', not analysed
    subgraph_fix: dict[str, str] = field(default_factory=dict)  # what fix would do with them (scan: rule 7)
    # BNs the exporter folded into a Conv/Gemm (its metadata says so): {batchnorm: module, layer: node name,
    # layer_module: the conv/linear module, from its weight's name, or None}
    folded_batchnorms: list[dict] = field(default_factory=list)
    # what each name `fix --dropout NAME=RATIO` accepts would mean (vsonnx.site_names.site_names)
    names: dict[str, str] = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # what the model says about its data (vsonnx.data.data_contract)

    @property
    def sites(self) -> list[BatchNormInfo]:
        return [b for b in self.batchnorms if b.site]

    @property
    def stochastic_depth(self) -> bool:
        """Whether every site's noise is stochastic depth (a residual branch dropped per sample)."""
        reaching = [d for b in self.sites for d in b.dropouts]
        return bool(reaching) and all(d.per_sample for d in reaching)

    @property
    def channelwise_dropouts(self) -> frozenset[str]:
        """Dropout nodes that drop whole channels (Dropout1d/2d/3d, from vsonnx.export's metadata)."""
        return frozenset(d.name for d in self.dropouts if d.channelwise)

    def to_dict(self) -> dict:
        measured = self.calibration is not None
        rows = []
        for b in self.batchnorms:
            row = b.to_dict()
            if not measured:
                for key in ("real_var_ratio", "shift_metric", "mean_shift", "prediction_error"):
                    row.pop(key)
            rows.append(row)
        out = {"model": self.model, "batchnorms": rows, "dropouts": [asdict(d) for d in self.dropouts],
               "subgraph_batchnorms": list(self.subgraph_batchnorms), "subgraph_fix": dict(self.subgraph_fix),
               "folded_batchnorms": list(self.folded_batchnorms), "names": dict(self.names), "data": dict(self.data),
               "warnings": list(self.warnings)}
        if measured:
            out["calibration"] = self.calibration
        return out


class _Path(NamedTuple):
    """What lies between one Dropout and the current tensor (weights counted up to 2)."""

    n_weight: int
    weight_node: str | None
    merge: bool
    other: bool
    concat: bool = False

    def through(self, kind: str, node_name: str) -> "_Path":
        if kind == "weight":
            n = min(self.n_weight + 1, 2)
            return self._replace(n_weight=n, weight_node=node_name if n == 1 else None)
        if kind == "merge":
            return self._replace(merge=True)
        if kind == "concat":
            return self._replace(merge=True, concat=True)
        if kind == "other":
            return self._replace(other=True)
        return self

    @property
    def additive(self) -> bool:
        """Noise arrives unchanged but for at most one weight layer and sums (Add/Sum): predictable."""
        return not (self.other or self.concat or self.n_weight > 1)

    @property
    def kind(self) -> str:
        if self.other or self.n_weight > 1:
            return "other"
        if self.merge:
            return "merge"
        return "weight" if self.n_weight == 1 else "direct"


def dropout_info(index: GraphIndex, node: onnx.NodeProto, channelwise: set[str]) -> DropoutInfo:
    """Resolve ratio and training_mode of a Dropout in its opset<12 (attribute) or >=12 (input) form."""
    opset = default_opset(index.model) or 13
    name = index.node_name(node)
    if opset < 12:
        ratio = float(attribute(node, "ratio", 0.5))
        training = False
    else:
        ratio, training = 0.5, False
        if len(node.input) > 1 and node.input[1]:
            value = index.constant(node.input[1])
            ratio = None if value is None else float(np.asarray(value).reshape(-1)[0])
        if len(node.input) > 2 and node.input[2]:
            value = index.constant(node.input[2])
            training = None if value is None else bool(np.asarray(value).reshape(-1)[0])
    branch = stochastic_depth_branch(index, node)
    return DropoutInfo(name, node.output[0], ratio, training, name in channelwise, branch is not None,
                       branch[1] if branch else node.input[0])


def stochastic_depth_branch(index: GraphIndex, node: onnx.NodeProto) -> tuple[onnx.NodeProto, str] | None:
    """(the Mul, the branch tensor) when Dropout ``node`` is stochastic depth as vsonnx.export writes it:
    it drops a tensor of ones ([N, 1, ...]: per sample) and its only consumer is a Mul scaling a dynamic
    branch by it. At inference that is the identity; the form needs no metadata to be recognised."""
    users = index.consumers.get(node.output[0], [])
    if not node.input or not _all_ones(index, node.input[0]) or len(users) != 1 or users[0].op_type != "Mul":
        return None
    mul = users[0]
    others = [i for i in mul.input if i != node.output[0]]
    if len(others) != 1 or index.is_constant(others[0]):
        return None
    return mul, others[0]


def _all_ones(index: GraphIndex, tensor: str) -> bool:
    """True when ``tensor`` is 1 everywhere whatever the input: a constant of ones, ConstantOfShape(1), or
    Expand of a constant 1 (through Cast/CastLike/Identity)."""
    for _ in range(8):
        value = index.constant(tensor)
        if value is not None:
            return bool(np.size(value)) and bool(np.all(np.asarray(value) == 1))
        node = index.producer.get(tensor)
        if node is None:
            return False
        if node.op_type == "ConstantOfShape":
            filled = attribute(node, "value")
            return filled is not None and bool(np.all(onnx.numpy_helper.to_array(filled) == 1))
        if node.op_type not in ("Cast", "CastLike", "Identity", "Expand"):
            return False
        tensor = node.input[0]
    return False


# inputs whose values never reach the output: only their type or shape does (e.g. torch's default exporter
# gives a bias-free Conv a zero bias Expand(CastLike(0, x), C), which reads x for its element type only)
_TYPE_OR_SHAPE_INPUTS = {"CastLike": (1,), "Shape": (0,), "Size": (0,), "ConstantOfShape": (0,), "Expand": (1,),
                         "EyeLike": (0,), "RandomUniformLike": (0,), "RandomNormalLike": (0,)}


def _value_inputs(index: GraphIndex, node: onnx.NodeProto) -> list[str]:
    """The dynamic inputs of ``node`` whose values (not just type or shape) flow into its outputs."""
    skip, dynamic = _TYPE_OR_SHAPE_INPUTS.get(node.op_type, ()), set(index.dynamic_inputs(node))
    return [t for k, t in enumerate(node.input) if t in dynamic and k not in skip]


def _bn_info(index: GraphIndex, node: onnx.NodeProto) -> BatchNormInfo:
    channels = 0
    for i in node.input[1:5]:
        value = index.constant(i)
        if value is not None:
            channels = int(np.asarray(value).size)
            break
    n_outputs = len([o for o in node.output if o])
    training = bool(attribute(node, "training_mode", 0)) or n_outputs > 1
    return BatchNormInfo(
        name=index.node_name(node), input=node.input[0], channels=channels,
        epsilon=float(attribute(node, "epsilon", 1e-5)), training_mode=training,
    )


def _step_kind(index: GraphIndex, node: onnx.NodeProto, noisy=lambda tensor: True) -> str:
    """How a node changes a dropout path: 'shape', 'weight', 'merge' or 'other'. ``noisy(tensor)``: whether
    dropout noise reaches that tensor (a computed but noise-free bias keeps a weight layer a 'weight' step)."""
    dynamic = index.dynamic_inputs(node)
    op = node.op_type
    if op in SHAPE_OPS or (op in ("Add", "Sub") and len(dynamic) == 1):
        return "shape"
    if (op in WEIGHT_OPS and len(node.input) > 1 and index.is_constant(node.input[1])
            and not any(noisy(t) for t in dynamic if t != node.input[0])):
        return "weight"
    if op in MERGE_OPS and len(dynamic) > 1:
        return "concat" if op == "Concat" else "merge"
    return "other"


def _weight_info(index: GraphIndex, name: str) -> WeightInfo:
    node = index.by_name[name]
    w = index.constant(node.input[1])
    fan_in = cos2 = None
    if w is not None and w.ndim >= 2:
        fan_in, cos2 = theory.weight_cos2(
            w, node.op_type, trans_b=bool(attribute(node, "transB", 0)), group=int(attribute(node, "group", 1))
        )
        cos2 = round(cos2, 6)
    return WeightInfo(node.op_type, name, fan_in, cos2)


def _predict_direct(index: GraphIndex, bn: onnx.NodeProto, dropouts: list[DropoutInfo]) -> float | None:
    """Eq. 8 with c = the BN's running mean and v recovered from its running variance (DESIGN 5.4);
    mean over channels of v / Var_train. None when a ratio or a statistic is not static."""
    if any(d.ratio is None or not 0 <= d.ratio < 1 for d in dropouts) or len(bn.input) < 5:
        return None
    mean, var = index.constant(bn.input[3]), index.constant(bn.input[4])
    if mean is None or var is None:
        return None
    p = float(np.prod([1.0 - d.ratio for d in dropouts]))
    v = np.maximum(theory.test_var_from_train_direct(mean, var, p), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(var > 0, v / np.asarray(var, np.float64), 1.0)
    return round(float(ratio.mean()), 6)


def _channelwise_dropouts(model: onnx.ModelProto) -> set[str]:
    raw = get_metadata(model).get("vsonnx.dropouts")
    if not raw:
        return set()
    try:
        return {d["node"] for d in json.loads(raw) if d.get("channelwise")}
    except (ValueError, TypeError, KeyError):
        return set()


def find_sites(model: onnx.ModelProto, model_name: str = "<memory>", index: GraphIndex | None = None) -> ScanReport:
    """Index every BN, classify Dropout->BN paths, collect the warnings a user needs (``index``: if known)."""
    index = index or GraphIndex(model)
    channelwise = _channelwise_dropouts(model)
    dropouts = {index.node_name(n): dropout_info(index, n, channelwise) for n in index.nodes_of("Dropout")}
    scaled_by = {index.node_name(index.consumers[d.output][0]): name for name, d in dropouts.items() if d.per_sample}
    paths: dict[str, dict[str, set[_Path]]] = {}  # tensor -> dropout name -> paths reaching it
    batchnorms: list[BatchNormInfo] = []
    bn_nodes: dict[str, onnx.NodeProto] = {}
    for node in index.topological_order:
        incoming: dict[str, set[_Path]] = {}
        for t in _value_inputs(index, node):
            for d, ps in paths.get(t, {}).items():
                incoming.setdefault(d, set()).update(ps)
        if node.op_type == "BatchNormalization":
            info = _bn_info(index, node)
            reaching = paths.get(node.input[0], {})
            _classify(index, info, node, reaching, dropouts)
            batchnorms.append(info)
            bn_nodes[info.name] = node
            continue
        if node.op_type in NORMALIZATION_OPS:
            continue
        if node.op_type == "Dropout" and dropouts[index.node_name(node)].per_sample:
            continue  # its noise starts at the Mul it feeds
        if node.op_type == "Dropout":
            outgoing = {d: set(ps) for d, ps in incoming.items()}
            if dropouts[index.node_name(node)].ratio != 0:  # a ratio-0 Dropout is the identity even in training
                outgoing.setdefault(index.node_name(node), set()).add(_Path(0, None, False, False))
            if outgoing:
                paths[node.output[0]] = outgoing
            continue
        name = index.node_name(node)
        depth = scaled_by.get(name)
        kind = "shape" if depth else _step_kind(index, node, lambda t: t in paths)  # SD: the Mul scales by 1
        outgoing = {d: {p.through(kind, name) for p in ps} for d, ps in incoming.items()}
        if depth and dropouts[depth].ratio != 0:
            outgoing.setdefault(depth, set()).add(_Path(0, None, False, False))
        if outgoing:
            for out in node.output:
                if out:
                    paths[out] = outgoing
    site_outputs = [bn_nodes[b.name].output[0] for b in batchnorms if b.site]
    downstream = {index.node_name(n) for n in index.downstream_nodes(site_outputs)}
    for b in batchnorms:
        b.downstream_of_site = b.name in downstream
    warnings = _warnings(index, batchnorms, list(dropouts.values()))
    folded = folded_batchnorms(index)
    if folded:
        warnings.append(f"the exporter folded {len(folded)} BatchNormalization into Conv/Gemm layers (modules "
                        f"{', '.join(f['batchnorm'] or '?' for f in folded[:4])}{', ...' if len(folded) > 4 else ''}): "
                        "fix corrects them in the weights once told where dropout acted: --dropout 'MODULE=RATIO' "
                        "with the BN module for placement (a) (e.g. 'layer*.bn2=0.5'), the conv/linear module for "
                        "placement (b); or re-export with vsonnx.export.")
    inner = subgraph_batchnorms(model.graph)
    if inner:
        warnings.append(f"{len(inner)} BatchNormalization inside If/Loop/Scan subgraphs ({', '.join(inner[:3])}"
                        f"{', ...' if len(inner) > 3 else ''}): vsonnx neither analyses nor recalibrates them.")
    return ScanReport(model_name, batchnorms, list(dropouts.values()), warnings, subgraph_batchnorms=inner,
                      folded_batchnorms=folded)


def subgraph_batchnorms(graph: onnx.GraphProto, prefix: str = "") -> list[str]:
    """Names ('<node>/<attribute>/<BN>') of the BatchNormalization nodes inside the subgraphs of ``graph``."""
    found = []
    for node in graph.node:
        for attr in node.attribute:
            for k, sub in enumerate([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                                    list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []):
                where = f"{prefix}{node.name or node.op_type}/{attr.name}{f'[{k}]' if attr.graphs else ''}/"
                found += [where + (n.name or n.output[0]) for n in sub.node if n.op_type == "BatchNormalization"]
                found += subgraph_batchnorms(sub, where)
    return found


def _classify(index, info: BatchNormInfo, node, reaching: dict[str, set[_Path]], dropouts) -> None:
    if not reaching:
        return
    info.site = True
    info.dropouts = [dropouts[d] for d in reaching]
    all_paths = [p for ps in reaching.values() for p in ps]
    info.path = max((p.kind for p in all_paths), key=PATH_ORDER.index)
    weight_nodes = {p.weight_node for p in all_paths if p.n_weight == 1}
    if info.path in ("weight", "merge") and len(weight_nodes) == 1:
        info.weight = _weight_info(index, weight_nodes.pop())
    if info.path == "direct":
        info.predicted_var_ratio = _predict_direct(index, node, info.dropouts)
    if all(p.additive for p in all_paths):
        info.noise_paths = sorted({(d, p.weight_node) for d, ps in reaching.items() for p in ps}, key=str)


def _warnings(index: GraphIndex, batchnorms: list[BatchNormInfo], dropouts: list[DropoutInfo]) -> list[str]:
    """What scan and fix say about the graph as a whole: folding evidence (one line at most where the graph
    has no BN at all: it may never have had one), BNs in training mode, odd Dropouts."""
    warnings: list[str] = []
    folded = [n for n in index.nodes_of(*FOLD_TARGETS) if looks_folded(index, n)]
    by_exporter = any(folded_by_exporter(n) for n in index.nodes_of(*WEIGHT_OPS))  # its own warning (find_sites)
    if folded and (not dropouts or not batchnorms) and not by_exporter:
        what = "no BatchNormalization" if not batchnorms else "no Dropout"
        warnings.append(
            f"the graph has {what}, and {len(folded)} layer(s) such as '{index.node_name(folded[0])}' look folded "
            "(an activation follows with no BatchNormalization): if the network was trained with dropout before "
            "BNs, the export removed the Dropout and folded the BNs (torch.onnx.export in eval mode does); "
            + EXPORT_HINT
        )
    for b in batchnorms:
        if b.training_mode:
            warnings.append(
                f"BatchNormalization '{b.name}' is in training mode (training_mode=1 or extra outputs): it "
                "normalises with batch statistics at inference; fix first switches it to its stored statistics "
                "(inference form), then corrects them."
            )
    for d in dropouts:
        if d.ratio is None:
            warnings.append(f"Dropout '{d.name}': its ratio is computed at run time, not a constant; "
                            "predictions for its sites need data.")
        elif not 0 <= d.ratio < 1:
            warnings.append(f"Dropout '{d.name}': its ratio {d.ratio:g} is outside [0, 1), which no training used; "
                            "its sites cannot be predicted or simulated.")
        if d.training_mode is None or d.training_mode:
            state = "is not a constant" if d.training_mode is None else "is true"
            warnings.append(f"Dropout '{d.name}': training_mode {state}, so it may drop values at inference"
                            + ("; fix first switches it off." if d.training_mode else "."))
        folded = unnormalised_weight_after(index, d.output) if batchnorms else None
        if folded:
            warnings.append(
                f"Dropout '{d.name}' feeds {folded} with no BatchNormalization before the next nonlinearity: "
                "if the network had a BN there, the export folded it into the weights (torch.onnx.export in "
                "eval mode does); " + EXPORT_HINT
            )
    return warnings
