"""Naming the dropout sites of models whose export erased them (DESIGN 3, 5.6): Dropout removed, BN
possibly folded. The correction itself is the ``named_sites`` method (vsonnx.methods.named_sites).

The user names where dropout acted in training: ``--dropout NAME=RATIO``, NAME a PyTorch module pattern
(module_sites), a node (stands for its first input: for a folded Conv, name the Conv) or a tensor, or ``--sites sites.json``
(``{"dropout": {"NAME": RATIO, ...}}``). Working copies then carry Dropout nodes there
(training_mode false for analysis and test-time passes; true, seeded, to simulate training), so the site
finder, the calibrator and the reports work unchanged.

Refuses: names that are not tensors, nodes, modules or layers of the graph (an Error lists the near ones);
names that match several different places (an Error lists the candidates); ratios outside [0, 1).
"""
from __future__ import annotations

import difflib
import fnmatch
import json
import re
from pathlib import Path

import onnx

from .errors import VsonnxError
from .graph import FOLD_TARGETS, WEIGHT_OPS, GraphIndex, folded_by_exporter, module_of, scope_module, scope_op
from .model import get_metadata
from .simulate import insert_dropouts
from .folding import folded_layers, looks_folded


DROP_PATH = re.compile(r"(drop_?path|stochastic_depth|drop_connect)\d*$")  # timm, torchvision, EfficientNet
SHORTCUT_MODULES = frozenset({"downsample", "shortcut", "skip", "proj"})


class Sites(dict):
    """{site tensor: drop ratio}, and ``per_sample``: the sites dropped per sample (drop paths named by their
    module; vsonnx.simulate.insert_dropouts reads it)."""

    def __init__(self, *args, per_sample=frozenset(), **kwargs):
        super().__init__(*args, **kwargs)
        self.per_sample = frozenset(per_sample)


def residual_branches(model: onnx.ModelProto) -> dict[str, list[list[str]]]:
    """Module -> for each residual Add of that module (its scoped name or metadata), the inputs computed
    inside the module but not by a shortcut/downsample submodule: where a drop path of that module acted."""
    index = GraphIndex(model)
    found: dict[str, list[list[str]]] = {}
    for node in index.nodes_of("Add"):
        parent = _own_module(node)
        if not parent:
            continue
        inside = []
        for t in node.input:
            producer = index.producer.get(t)
            module = (_own_module(producer) if producer is not None else None) or scope_module(t)
            below = module[len(parent) + 1:].split(".") if module and module.startswith(parent + ".") else None
            if below and not SHORTCUT_MODULES & set(below):
                inside.append(t)
        found.setdefault(parent, []).append(inside)
    return found


def _drop_path_sites(name: str, branches: dict[str, list[list[str]]], ratio: float) -> dict[str, float] | None:
    """The branch inputs a drop-path module name (``stages.*.blocks.*.drop_path``) stands for: per module
    matching its parent, the one residual Add's one branch input; None when the name is no drop path or no
    module matches; an error listing the candidates when one is ambiguous."""
    parent, _, last = name.rpartition(".")
    if not parent or not DROP_PATH.search(last):
        return None
    matched = [m for m in branches if fnmatch.fnmatchcase(m, parent)]
    sites = {}
    for module in matched:
        adds = branches[module]
        if len(adds) != 1 or len(adds[0]) != 1:
            candidates = [t for add in adds for t in add] or ["(no input computed inside the module)"]
            raise VsonnxError(f"'{name}': which residual branch of '{module}' the drop path scaled is ambiguous "
                              f"({len(adds)} Add(s)); candidates: {', '.join(candidates)}.",
                              "name the branch tensor itself with --dropout TENSOR=RATIO.")
        sites[adds[0][0]] = ratio
    return sites or None


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
                              'write {"dropout": {"NAME": RATIO}}.') from None
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


def module_sites(model: onnx.ModelProto) -> dict[str, list[str]]:
    """PyTorch module name -> the tensors where a dropout acting on that module's input sits in the graph:
    - a BatchNormalization module (placement a): the BN's input, or, when the BN was folded into the
      Conv/Gemm before it, that layer's output (the dropout then acted inside the fold). A fold is known from
      the default exporter's metadata, or from the layer's output tensor still carrying the BN's scoped name
      (``/blocks/blocks.0/bn2/BatchNormalization_output_0``: onnxslim and other tools rename nodes but keep
      tensor names);
    - a Conv/Linear module (placement b): the layer's input. The layer is found by its module name in the
      exporter's metadata or node name (vsonnx.graph.module_of; a scoped node name counts only when it ends
      in the node's own op, since tools name fused nodes after removed tensors), or by its weight's name
      ``MODULE.weight``, which both exporters keep: this names a conv whose own metadata records only the BN
      folded into it;
    - a Dropout module whose node is still in the graph: its output (where its noise acts);
    - Keras layers through tf2onnx (names ``<model>/<layer>_1/<ops>``, Keras 3 adding ``_1``; both the layer
      name and the suffixed one are accepted): a BN folded into a Conv/Gemm/MatMul is that node, named after
      the BN's ops (``.../bn1_1/batchnorm/mul_1``), or renamed (``Conv__14``) with the BN's folded bias as its
      bias (``.../bn1_1/batchnorm/sub:0``): the site is its output; a conv/dense layer is found by its
      weight's name (``.../conv1_1/convolution/...``: its input); a BN kept, by its node name (its input).
      A Keras Dropout layer leaves no trace in the graph: name the layer after it."""
    index = GraphIndex(model)
    sites: dict[str, list[str]] = {}
    for node in index.graph.node:
        _add_keras_sites(index, node, sites)
        module = _own_module(node)
        if node.op_type == "BatchNormalization" and module:
            sites.setdefault(module, []).append(node.input[0])
        elif node.op_type == "Dropout" and module:
            sites.setdefault(module, []).append(node.output[0])
        elif node.op_type in WEIGHT_OPS:
            if module and folded_by_exporter(node):
                sites.setdefault(module, []).append(node.output[0])
            elif module:
                sites.setdefault(module, []).append(node.input[0])
            weight = node.input[1] if len(node.input) > 1 else ""
            if weight.endswith(".weight") and weight in index.initializers:
                sites.setdefault(weight[:-len(".weight")], []).append(node.input[0])
            folded = scope_module(node.output[0]) if scope_op(node.output[0]) == "BatchNormalization" else None
            if folded and node.op_type in FOLD_TARGETS:
                sites.setdefault(folded, []).append(node.output[0])
    return {m: list(dict.fromkeys(ts)) for m, ts in sites.items()}


def keras_layer(name: str) -> str | None:
    """The Keras layer a tf2onnx node, tensor or initializer name belongs to (``functional_1/bn1_1/batchnorm/
    mul_1`` -> ``bn1_1``), or None for names not of that form (TorchScript scopes start with '/')."""
    parts = name.split("/")
    return parts[1] if len(parts) >= 3 and parts[0] and parts[1] else None


def _keras_names(layer: str) -> list[str]:
    """A layer's name as tf2onnx wrote it and without the ``_1`` Keras 3 appends in functional graphs."""
    bare = re.sub(r"_\d+$", "", layer)
    return [layer] if bare == layer else [layer, bare]


def _add_keras_sites(index: GraphIndex, node: onnx.NodeProto, sites: dict[str, list[str]]) -> None:
    if node.op_type not in WEIGHT_OPS | {"BatchNormalization"}:
        return
    layer = keras_layer(node.name)
    bias = node.input[2] if node.op_type in FOLD_TARGETS and len(node.input) > 2 else ""
    if node.op_type == "BatchNormalization":
        found = [(layer, node.input[0])] if layer else []
    elif layer and "batchnorm" in node.name.split("/")[2:]:  # a BN folded into this layer, which took its name
        found = [(layer, node.output[0])]
    elif keras_layer(bias) and "batchnorm" in bias.split("/")[2:]:  # ... or renamed Conv__NN, its bias the BN's
        found = [(keras_layer(bias), node.output[0])]
    else:
        found = []
    weight = keras_layer(node.input[1]) if node.op_type in WEIGHT_OPS and len(node.input) > 1 else None
    if weight is not None and node.input[1] in index.initializers:
        found.append((weight, node.input[0]))
    for name, tensor in found:
        for alias in _keras_names(name):
            sites.setdefault(alias, []).append(tensor)


def _own_module(node: onnx.NodeProto) -> str | None:
    """module_of, except for a scoped node name that ends in another op than the node's (a fused node named
    after a tensor it replaced)."""
    op = scope_op(node.name)
    return module_of(node) if op is None or op == node.op_type else None


def removed_dropouts(model: onnx.ModelProto) -> dict[str, dict]:
    """Dropout module -> its vsonnx.dropouts record, for each Dropout the metadata lists whose node is no
    longer in the graph (a tool removed it after vsonnx.export)."""
    present = {n.name for n in model.graph.node if n.op_type == "Dropout"}
    records = dropout_records(model)
    return {r["module"]: r for r in records if r.get("module") and r.get("node") not in present}


def dropout_records(model: onnx.ModelProto) -> list[dict]:
    try:
        records = json.loads(get_metadata(model).get("vsonnx.dropouts", "[]"))
    except ValueError:
        return []
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def site_names(model: onnx.ModelProto) -> dict[str, str]:
    """What each name ``--dropout NAME=RATIO`` accepts would mean: module -> where the dropout would act
    (module_sites), and each Dropout module a tool removed -> the modules it fed (from the metadata)."""
    index = GraphIndex(model)
    described = {}
    for module, tensors in module_sites(model).items():
        where = []
        for t in tensors:
            producer = index.producer.get(t)
            if producer is not None and producer.op_type in FOLD_TARGETS and t == producer.output[0] and (
                    folded_by_exporter(producer) or scope_op(t) == "BatchNormalization" or looks_folded(index, producer)):
                where.append(f"inside the BN folded into {producer.op_type} '{index.node_name(producer)}' (its output)")
            else:
                readers = sorted({f"{n.op_type} '{index.node_name(n)}'" for n in index.consumers.get(t, [])})
                where.append(f"on '{t}', read by {', '.join(readers[:2]) or 'nothing'}")
        described[module] = "; ".join(where)
    for module, record in removed_dropouts(model).items():
        feeds = _feeds(record)
        described[module] = (f"removed Dropout (ratio {record.get('ratio')}): acts where {', '.join(feeds)} read "
                             "(fix restores it)" if feeds else
                             f"removed Dropout (ratio {record.get('ratio')}): what it fed is not recorded")
    return dict(sorted(described.items()))


def _feeds(record: dict) -> list[str]:
    """The modules a vsonnx.dropouts record says its Dropout fed (empty for records of older exports)."""
    return [f["module"] for f in record.get("feeds", []) if isinstance(f, dict) and f.get("module")]


def restored_sites(model: onnx.ModelProto) -> tuple[dict[str, float], list[str]]:
    """({site tensor: ratio}, what could not be restored) for the Dropouts vsonnx.export recorded that a
    tool removed since: each record names the modules its output fed, which module_sites finds again."""
    modules = module_sites(model)
    sites, missing = {}, []
    for module, record in removed_dropouts(model).items():
        feeds = [f for f in _feeds(record) if f in modules]
        if not feeds or record.get("ratio") is None:
            missing.append(module)
            continue
        sites.update({t: float(record["ratio"]) for f in feeds for t in modules[f]})
    return sites, missing


def restoration_note(model: onnx.ModelProto, restores: str) -> tuple[dict[str, float], str | None]:
    """(the sites restored_sites gives, what scan and fix say about Dropouts a tool removed after vsonnx.export:
    how many, how many sites ``restores`` (e.g. "restored") from the metadata, which cannot be restored; None
    when there are none)."""
    removed = removed_dropouts(model)
    if not removed:
        return {}, None
    sites, missing = restored_sites(model)
    said = f"the model's vsonnx.dropouts metadata lists {len(removed)} Dropout(s) a tool removed after vsonnx.export"
    if sites:
        said += f"; {restores} {len(sites)} site(s) from it"
    if missing:
        said += (f"; what {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''} fed is not recorded (an "
                 "export by an older vsonnx): name the modules after them with --dropout, e.g. the BNs they fed")
    return sites, said + "."


def resolve_sites(model: onnx.ModelProto, named: dict[str, float]) -> Sites:
    """{site tensor: ratio} from names: a tensor, a node (its first input), a PyTorch module name pattern
    (shell-style, ``*`` may cross dots; see module_sites), a Dropout module a tool removed after
    vsonnx.export (its site is what the module fed, from the vsonnx.dropouts metadata), or a drop-path module
    (``...drop_path``, ``...stochastic_depth``), which the export erased: the branch input of its block's
    residual Add, dropped per sample (``Sites.per_sample``). Tensor and node names
    win over a pattern matching the same text; a name matching nothing is an error listing the closest
    names, and so is a removed Dropout module whose record does not say what it fed."""
    index = GraphIndex(model)
    nodes = index.by_name
    tensors = set(index.producer) | {i.name for i in model.graph.input}
    modules = module_sites(model)
    removed = removed_dropouts(model)
    branches = residual_branches(model)
    resolved, per_sample = {}, set()
    for name, ratio in named.items():
        dropped = [m for m in removed if fnmatch.fnmatchcase(m, name)]
        if name in tensors:
            resolved[name] = ratio
        elif name in nodes:
            resolved[nodes[name].input[0]] = ratio
        elif dropped:
            resolved.update(_fed_sites(name, dropped, removed, modules, ratio))
        elif matched := [m for m in modules if fnmatch.fnmatchcase(m, name)]:
            resolved.update({t: ratio for m in matched for t in modules[m]})
        elif (paths := _drop_path_sites(name, branches, ratio)) is not None:
            resolved.update(paths)
            per_sample.update(paths)
        else:
            close = difflib.get_close_matches(name, [*modules, *removed, *nodes, *tensors], n=5, cutoff=0.4)
            raise VsonnxError(f"'{name}' is neither a tensor, a node nor a PyTorch module or Keras layer of the model.",
                              "name a module or layer ('layer1.0.bn2', 'layer*.bn2', 'bn1'), a node or a tensor (a "
                              "Dropout the export removed leaves no name behind unless vsonnx.export recorded it: "
                              "name the layer it fed)" + (f"; closest: {', '.join(close)}." if close else
                                                          "; `vsonnx scan MODEL` lists the names."))
    return Sites(resolved, per_sample=per_sample)


def _fed_sites(name: str, dropped: list[str], removed: dict[str, dict], modules: dict[str, list[str]],
               ratio: float) -> dict[str, float]:
    """The sites of removed Dropout modules ``dropped``: where the modules they fed read their input."""
    sites = {}
    for module in dropped:
        feeds = _feeds(removed[module])
        found = [f for f in feeds if f in modules]
        if not found:
            raise VsonnxError(f"'{name}' names the Dropout module '{module}', which the graph no longer holds, and "
                              "the model's metadata does not say which module it fed"
                              + (f" ({', '.join(feeds)} not found)" if feeds else "") + ".",
                              "name the module right after it instead (e.g. the BatchNorm it fed), or a tensor.")
        sites.update({t: ratio for f in found for t in modules[f]})
    return sites


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
