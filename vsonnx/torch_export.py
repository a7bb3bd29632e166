"""PyTorch -> ONNX export that keeps the evidence vsonnx needs (torch is imported lazily).

Why a plain ``torch.onnx.export`` is not enough: exporting a model in eval mode (both the dynamo exporter
and the TorchScript one) removes every Dropout (it is the identity at inference) and folds each
Conv+BatchNormalization pair into the Conv. The Dropout->BN sites, their ratios and the BN statistics that
vsonnx re-estimates are then gone from the graph. ``export`` therefore:

1. replaces every ``nn.Dropout``/``Dropout1d/2d/3d`` (in a copy of the module) by an identity whose ONNX
   symbolic is ``Dropout(x, ratio, training_mode=false)``, so the node survives with its ratio and is still
   the identity for every runtime; stochastic depth (vsonnx.nets.StochasticDepth, torchvision's
   ``StochasticDepth``, timm's ``DropPath``, recognised by class name and attributes) becomes
   ``x * Dropout(ones[N, 1, ...], p)``: the identity at inference, a per-sample drop once the Dropout is
   simulated, and a form vsonnx.sites recognises without metadata (``mode="batch"``: ones[1, 1, ...]);
2. exports with torch's default exporter (``exporter="dynamo"``, the default) without its graph optimisation
   (which folds BN), each Dropout being a custom op (``vsonnx::dropout``) translated to ONNX Dropout; or with
   the TorchScript exporter (``exporter="torchscript"``) in ``TrainingMode.PRESERVE`` on the eval-mode copy;
   both keep every BatchNormalization unfolded and in inference mode (one output, running statistics as
   inputs);
3. gives every BN its own mean/var initializers (the exporter de-duplicates equal tensors through Identity
   nodes), makes the batch dimension dynamic, stores metadata (preprocessing, class names, dropout
   configuration, producer versions) and checks that onnxruntime reproduces ``model.eval()`` outputs.
"""
from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx

from .errors import VsonnxError
from .model import save_model, set_metadata

DEFAULT_OPSET = 17


def _dropout_function():
    import torch

    class OnnxDropout(torch.autograd.Function):
        """Identity in eval mode; exported as ONNX Dropout(ratio, training_mode=false)."""

        @staticmethod
        def forward(ctx, x, ratio: float):  # noqa: ARG004 - ratio is used by symbolic
            return x.clone()

        @staticmethod
        def symbolic(g, x, ratio: float):
            r = g.op("Constant", value_t=torch.tensor(ratio, dtype=torch.float32))
            t = g.op("Constant", value_t=torch.tensor(False))
            return g.op("Dropout", x, r, t, outputs=1)

    return OnnxDropout


def _torchscript_export(model, inputs, opset, input_names, output_names) -> onnx.ModelProto:
    import torch

    buffer = io.BytesIO()
    torch.onnx.export(model, inputs, buffer, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                      opset_version=opset, input_names=list(input_names), output_names=list(output_names),
                      dynamic_axes={n: {0: "batch"} for n in (*input_names, *output_names)}, do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def _dynamo_export(model, inputs, opset, input_names, output_names) -> onnx.ModelProto:
    import contextlib

    import torch

    try:
        from onnxscript import opset18 as op
    except ImportError:
        raise VsonnxError("exporter='dynamo' needs the onnxscript package.",
                          "pip install onnxscript (or 'vsonnx[train]'), or use exporter='torchscript'.") from None

    def onnx_dropout(x, ratio: float):
        inference = op.Constant(value=onnx.helper.make_tensor("mode", onnx.TensorProto.BOOL, [], [False]))
        y, _ = op.Dropout(x, op.Constant(value_float=ratio), inference)
        return y

    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(
            model, inputs, dynamo=True, optimize=False, opset_version=max(opset, 18), input_names=list(input_names),
            output_names=list(output_names), dynamic_shapes=tuple({0: torch.export.Dim("batch")} for _ in inputs),
            custom_translation_table={_dropout_op().default: onnx_dropout})
    return program.model_proto


_DROPOUT_OP = None


def _dropout_op():
    """torch.ops.vsonnx.dropout: the identity that torch.export keeps as one node (registered once)."""
    global _DROPOUT_OP
    if _DROPOUT_OP is None:
        import torch

        @torch.library.custom_op("vsonnx::dropout", mutates_args=(), schema="(Tensor x, float ratio) -> Tensor")
        def dropout(x, ratio):
            return x.clone()

        @dropout.register_fake
        def _(x, ratio):
            return torch.empty_like(x)

        _DROPOUT_OP = torch.ops.vsonnx.dropout
    return _DROPOUT_OP


def _exportable_copy(module, dynamo: bool = False):
    """Eval-mode deep copy with each Dropout replaced (by an autograd function with an ONNX symbolic for the
    TorchScript exporter, a custom op for dynamo); returns (copy, dropout descriptions, call order)."""
    import torch.nn as nn

    function = _dropout_op() if dynamo else _dropout_function().apply
    calls: list[str] = []
    described: dict[str, dict] = {}

    class KeptDropout(nn.Module):
        def __init__(self, name: str, p: float):
            super().__init__()
            self.name, self.p = name, p

        def forward(self, x):
            calls.append(self.name)
            return function(x, self.p)

    class KeptStochasticDepth(KeptDropout):
        """x * Dropout(ones of shape [N, 1, ...]): the identity at inference, per-sample drops in training."""

        def __init__(self, name: str, p: float, per_sample: bool):
            super().__init__(name, p)
            self.per_sample = per_sample

        def forward(self, x):
            calls.append(self.name)
            ones = x.new_ones(((x.shape[0],) if self.per_sample else (1,)) + (1,) * (x.dim() - 1))
            return x * function(ones, self.p)

    model = copy.deepcopy(module).eval()
    kinds = {nn.Dropout: "dropout", nn.Dropout1d: "dropout1d", nn.Dropout2d: "dropout2d", nn.Dropout3d: "dropout3d"}
    for name, child in list(model.named_modules()):
        kind = kinds.get(type(child))
        depth = _stochastic_depth(child) if kind is None else None
        if kind is None and depth is None:
            continue
        ratio = float(child.p) if depth is None else depth[0]
        described[name] = {"module": name, "ratio": ratio, "kind": kind or "stochastic_depth",
                           "channelwise": kind not in (None, "dropout")}
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, KeptDropout(name, ratio) if depth is None else KeptStochasticDepth(name, *depth))
    return model, described, calls


def _stochastic_depth(module) -> tuple[float, bool] | None:
    """(drop probability, per sample) of a stochastic-depth module (vsonnx.nets', torchvision's
    StochasticDepth, timm's DropPath, recognised by class name and attributes), else None."""
    kind = type(module).__name__
    if kind == "StochasticDepth" and hasattr(module, "p"):
        mode = getattr(module, "mode", "row")
        if mode not in ("row", "batch"):
            raise VsonnxError(f"StochasticDepth mode '{mode}' is not supported.", "use mode 'row' or 'batch'.")
        return float(module.p), mode == "row"
    if kind == "DropPath" and hasattr(module, "drop_prob"):
        if not getattr(module, "scale_by_keep", True) and module.drop_prob:
            raise VsonnxError("DropPath(scale_by_keep=False) shifts the mean in training as well; vsonnx models the "
                              "inverted scaling only.", "train with scale_by_keep=True (timm's default).")
        return float(module.drop_prob or 0.0), True
    return None


def _untie_batchnorm_inputs(model: onnx.ModelProto) -> None:
    """Replace BN inputs produced by Identity(initializer) with initializers of their own."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    dead = set()
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        for i, name in enumerate(node.input[1:5], start=1):
            src = producers.get(name)
            if src is not None and src.op_type == "Identity" and src.input[0] in inits:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(inits[src.input[0]])
                tensor.name = name
                model.graph.initializer.append(tensor)
                inits[name] = tensor
                dead.add(id(src))
    keep = [n for n in model.graph.node if id(n) not in dead]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def export(
    module,
    example_input,
    path: str | Path,
    *,
    preprocess: dict | None = None,
    class_names: list[str] | None = None,
    metadata: dict | None = None,
    input_names: tuple[str, ...] = ("input",),
    output_names: tuple[str, ...] = ("output",),
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    exporter: str = "dynamo",
) -> onnx.ModelProto:
    """Export ``module`` to ``path`` keeping Dropout nodes and unfolded inference-mode BN.

    ``preprocess``: {"mean": [...], "std": [...], "size": [H, W], "layout": "nchw", "scale": 1/255} (and
    "channels": "bgr" for a model trained on BGR images).
    Metadata is stored under ``vsonnx.*`` keys; ``metadata`` adds free-form entries (JSON-encoded if not
    str). With ``verify`` the ONNX outputs on ``example_input`` must match PyTorch to 1e-4 (max abs).
    ``exporter``: ``"dynamo"`` (the default, as for ``torch.onnx.export``: torch's default exporter without
    its graph optimisation, which would fold BN; each Dropout is a custom op translated to ONNX
    Dropout(ratio, training_mode=false); needs the onnxscript package) or ``"torchscript"`` (the deprecated
    exporter, ``TrainingMode.PRESERVE``; faster, and names nodes after module scopes).
    """
    try:
        import torch
    except ImportError:
        raise VsonnxError("vsonnx.export needs PyTorch.", "pip install 'vsonnx[train]' (or torch).") from None
    if exporter not in ("torchscript", "dynamo"):
        raise VsonnxError(f"unknown exporter '{exporter}'.", "use exporter='torchscript' or 'dynamo'.")

    model, described, calls = _exportable_copy(module, dynamo=exporter == "dynamo")
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.no_grad():
        expected = model(*inputs)  # the eval-mode copy: the user's module keeps its mode
    calls.clear()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        onnx_model = (_dynamo_export if exporter == "dynamo" else _torchscript_export)(
            model, inputs, opset, input_names, output_names)
    _untie_batchnorm_inputs(onnx_model)

    set_metadata(onnx_model, _metadata(onnx_model, described, calls, preprocess, class_names, metadata, exporter))
    onnx.checker.check_model(onnx_model)
    if verify:
        _verify(onnx_model, inputs, expected, input_names)
    save_model(onnx_model, path)
    return onnx_model


def _metadata(onnx_model: onnx.ModelProto, described: dict, calls: list, preprocess: dict | None,
              class_names: list[str] | None, metadata: dict | None, exporter: str) -> dict[str, str]:
    """The ``vsonnx.*`` metadata entries: each Dropout node with its module (when the modules were called once
    each, in graph order), the producer, preprocessing, class names and the caller's entries."""
    import torch

    from .graph import GraphIndex, module_of

    index = GraphIndex(onnx_model)
    dropout_nodes = [n for n in onnx_model.graph.node if n.op_type == "Dropout"]
    if len(dropout_nodes) == len(calls):
        # "feeds": the modules that read the dropout's output, so that a tool that later removes the Dropout
        # node (and folds the BN it fed) leaves enough to put the site back (vsonnx.site_names)
        records = [{"node": node.name, **described[name],
                    "feeds": [{"module": module_of(c), "op": c.op_type} for c in index.consumers.get(node.output[0], [])
                              if module_of(c)]}
                   for node, name in zip(dropout_nodes, calls)]
    else:  # a module called a data-dependent number of times; keep the module list only
        records = list(described.values())
    entries = {
        "vsonnx.dropouts": json.dumps(records),
        "vsonnx.producer": json.dumps({"torch": torch.__version__, "onnx": onnx.__version__,
                                       "exporter": "vsonnx.export (TorchScript, TrainingMode.PRESERVE)"
                                       if exporter == "torchscript" else "vsonnx.export (dynamo, not optimised)"}),
    }
    if preprocess:
        entries["vsonnx.preprocess"] = json.dumps(preprocess)
    if class_names:
        entries["vsonnx.class_names"] = json.dumps(list(class_names))
    for key, value in (metadata or {}).items():
        entries[key if key.startswith("vsonnx.") else f"vsonnx.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return entries


def _verify(onnx_model, inputs, expected, input_names) -> None:
    from .runtime import make_session

    session = make_session(onnx_model, device="cpu", optimize=False)
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(input_names, inputs)}
    got = session.run(None, feeds)[0]
    exp = (expected[0] if isinstance(expected, (tuple, list)) else expected).detach().cpu().numpy()
    diff = float(np.max(np.abs(got - exp))) if got.size else 0.0
    scale = float(np.max(np.abs(exp))) if exp.size else 0.0
    if diff > 1e-4 * max(1.0, scale):  # float32 rounding grows with the outputs (untrained deep nets: 1e6 and more)
        raise RuntimeError(f"exported ONNX model differs from PyTorch by {diff:.3g} (max abs, outputs up to "
                           f"{scale:.3g}); this is a bug")
