"""Run an ONNX graph with torch operators, so that gradients reach its inputs (needs torch).

Used by the data-free synthesis (vsonnx.methods.synthesized), which optimises inputs through the model, and
by the distillation (vsonnx.methods.distill), which fits BN constants through it. ``channels_last=True``
stores 4-D float tensors (conv weights, image inputs) channels-last: oneDNN's convolutions run about 20%
faster on CPU that way (same results up to float rounding; the synthesis and the distillation use it). Covers the
operators of exported CNN classifiers; any other operator (If/Loop/Scan with their subgraphs included) or a
Conv with auto_pad is refused with a VsonnxError naming it. Float tensors are computed in float32 whatever the model's precision.

Two switches change what the graph computes, as in PyTorch's ``train()``:
- ``batch_norm="batch"`` normalises every BatchNormalization with the statistics of the batch it sees
  (mean and biased variance over all axes but 1; torch's fused kernel, with those statistics
  differentiable: ``_BatchNormWithStatistics``) and reports them to ``observe(bn_name, mean, var)``;
  ``"stored"`` uses the model's running statistics.
- ``dropout=True`` applies every Dropout with its ratio (inverted dropout: kept values scaled by 1/p);
  nodes named in ``channelwise`` drop whole channels. On the CPU the masks come from numpy's 16-bit draws
  (as onnxruntime's simulation, vsonnx.random_feeds) seeded from torch's generator.
- ``affine={bn_name: (a, c)}`` makes those BatchNormalizations compute ``a * x + c`` per channel (the
  inference BN written as one scale and shift; the distillation learns them); ``output_affine={node: (a, c)}``
  maps the first output y of those nodes to ``a * y + c`` per channel (axis 1; folded Conv/Gemm layers).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from .errors import SYNTHESIS_HINT, VsonnxError
from .graph import GraphIndex, attribute, constant_node_value
from .random_feeds import scaled_keep_mask

_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float32,
           onnx.TensorProto.DOUBLE: torch.float32, onnx.TensorProto.INT64: torch.int64,
           onnx.TensorProto.INT32: torch.int64, onnx.TensorProto.BOOL: torch.bool}
_UNARY = {"Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Identity": lambda x: x,
          "HardSwish": F.hardswish, "Neg": torch.neg, "Sqrt": torch.sqrt, "Exp": torch.exp, "Abs": torch.abs}
_BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Pow": torch.pow}


def _tensor(value: np.ndarray) -> torch.Tensor:
    value = np.asarray(value)
    if value.dtype.kind == "f":
        return torch.from_numpy(value.astype(np.float32))
    if value.dtype.kind in "iu":
        return torch.from_numpy(value.astype(np.int64))
    return torch.from_numpy(value.copy())


def _ints(value) -> list[int]:
    return [int(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else value)]


class TorchGraph:
    """Callable: ``graph(feeds) -> {output name: tensor}`` (``fetch``: other tensors instead of the graph
    outputs; see the module docstring for the switches)."""

    def __init__(self, model: onnx.ModelProto, device: str = "cpu", channels_last: bool = False):
        index = GraphIndex(model)
        self.device, self.channels_last = device, channels_last
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.nodes = list(index.topological_order)
        self.names = [index.node_name(n) for n in self.nodes]
        self.outputs = [o.name for o in model.graph.output]
        self.constants = {t.name: self._layout(_tensor(numpy_helper.to_array(t)).to(device))
                          for t in model.graph.initializer}
        for node in self.nodes:
            if node.op_type not in _OPS and node.op_type not in _UNARY and node.op_type not in _BINARY:
                raise VsonnxError(f"the data-free synthesis cannot run operator {node.op_type} "
                                  f"('{index.node_name(node)}').",
                                  SYNTHESIS_HINT)
            if node.op_type == "Conv" and attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise VsonnxError(f"the data-free synthesis does not handle auto_pad ('{index.node_name(node)}').",
                                  SYNTHESIS_HINT)

    def __call__(self, feeds: dict[str, torch.Tensor], *, batch_norm: str = "stored", dropout: bool = False,
                 channelwise: frozenset[str] = frozenset(),
                 observe: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
                 affine: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 output_affine: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 fetch: list[str] | None = None) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(self.constants)
        env.update({k: self._layout(v.to(self.device)) for k, v in feeds.items()})
        state = _State(batch_norm, dropout, channelwise, observe, self.opset, affine or {})
        for node, name in zip(self.nodes, self.names):
            args = [env[i] if i else None for i in node.input]
            if node.op_type in _UNARY:
                result = _UNARY[node.op_type](args[0])
            elif node.op_type in _BINARY:
                result = _BINARY[node.op_type](args[0], args[1])
            else:
                result = _OPS[node.op_type](node, name, args, state)
            results = result if isinstance(result, tuple) else (result,)
            if output_affine and name in output_affine:
                a, c = output_affine[name]
                shape = [1, -1] + [1] * (results[0].dim() - 2)
                results = (results[0] * a.reshape(shape) + c.reshape(shape), *results[1:])
            for out, value in zip(node.output, results):
                if out:
                    env[out] = value
        return {o: env[o] for o in fetch or self.outputs}


    def _layout(self, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last and t.dim() == 4 and t.is_floating_point():
            return t.contiguous(memory_format=torch.channels_last)
        return t


class _State:
    def __init__(self, batch_norm, dropout, channelwise, observe, opset, affine):
        if batch_norm not in ("stored", "batch"):
            raise ValueError(f"batch_norm must be 'stored' or 'batch', not {batch_norm!r}")
        self.batch_norm, self.dropout, self.channelwise = batch_norm, dropout, channelwise
        self.observe, self.opset, self.affine = observe, opset, affine
        self.bits: np.random.PCG64 | None = None

    def keep_mask(self, shape: tuple, ratio: float, device) -> torch.Tensor:
        """Inverted-dropout multipliers (0 or 1 / (1 - r)). On the CPU from numpy's 16-bit draws
        (vsonnx.random_feeds, P(drop) = ceil(65536 r) / 65536, as the onnxruntime simulation): 2.6x faster per
        dropout, forward and backward, than torch.rand + compare + cast; the generator is seeded from torch's,
        so torch.manual_seed fixes the masks. Elsewhere torch.rand on the device."""
        if torch.device(device).type != "cpu":
            return (torch.rand(shape, device=device) >= ratio).to(torch.float32).mul_(1 / (1 - ratio))
        if self.bits is None:
            self.bits = np.random.PCG64(int(torch.randint(0, 2 ** 62, ())))
        return torch.from_numpy(scaled_keep_mask(self.bits, shape, ratio))


def _conv(node, name, args, state):
    x, w = args[0], args[1]
    nd = w.dim() - 2
    pads = attribute(node, "pads", [0] * 2 * nd)
    if pads[:nd] != pads[nd:]:
        x = F.pad(x, [p for i in reversed(range(nd)) for p in (pads[i], pads[nd + i])])
        pads = [0] * 2 * nd
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(x, w, args[2] if len(args) > 2 else None, stride=attribute(node, "strides", [1] * nd),
                padding=pads[:nd], dilation=attribute(node, "dilations", [1] * nd), groups=attribute(node, "group", 1))


def _batch_norm(node, name, args, state):
    x, scale, bias, mean, var = args[:5]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if name in state.affine:
        a, c = state.affine[name]
        return x * a.reshape(shape) + c.reshape(shape)
    eps = attribute(node, "epsilon", 1e-5)
    if state.batch_norm == "batch":
        y, mean, var = _BatchNormWithStatistics.apply(x, scale, bias, float(eps))
        if state.observe is not None:
            state.observe(name, mean, var)
        return y
    return (x - mean.reshape(shape)) * (scale / torch.sqrt(var + eps)).reshape(shape) + bias.reshape(shape)


class _BatchNormWithStatistics(torch.autograd.Function):
    """(y, mean, var) of a BN normalising with the batch: torch's fused kernel, forward and backward (half the
    time of the same maths in elementwise ops, which the synthesis spent ~40% of its time in), with the batch
    mean and biased variance as differentiable outputs. var = max(1 / invstd^2 - eps, 0) from the kernel's saved
    statistics. Backward: the kernel's gradient for y plus, with M values per channel,
        dL/dx += dL/dmean / M + dL/dvar * 2 (x - mean) / M."""

    @staticmethod
    def forward(ctx, x, scale, bias, eps: float):
        y, mean, invstd = torch.native_batch_norm(x, scale, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, scale, mean, invstd)
        ctx.eps = eps
        return y, mean, invstd.pow(-2).sub_(eps).clamp_min_(0.0)

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_var):  # unused outputs arrive as zeros (materialised grads)
        x, scale, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x, grad_scale, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_y.contiguous(memory_format=_memory_format(x)), x, scale, None, None, mean, invstd, True, ctx.eps,
            list(need[:3]))
        if need[0]:
            m, shape = x.numel() // x.shape[1], [1, -1] + [1] * (x.dim() - 2)
            per_x = (2.0 / m) * grad_var
            grad_x = grad_x.addcmul_(x, per_x.reshape(shape)).add_((grad_mean / m - per_x * mean).reshape(shape))
        return grad_x, grad_scale, grad_bias, None


def _memory_format(x: torch.Tensor):
    return torch.channels_last if _channels_last(x) else torch.contiguous_format


def _channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is a 4-D tensor stored channels-last (not one that is both, e.g. with C = 1)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _dropout(node, name, args, state):
    ratio = float(args[1]) if len(args) > 1 and args[1] is not None else attribute(node, "ratio", 0.5)
    if state.dropout and not 0 <= ratio < 1:
        raise VsonnxError(f"Dropout '{name}' has ratio {ratio:g}, outside [0, 1): its training cannot be simulated.",
                          SYNTHESIS_HINT)
    x = args[0]
    if not state.dropout or ratio <= 0:
        return x
    if name in state.channelwise and x.dim() > 2:
        return x * state.keep_mask((*x.shape[:2], *[1] * (x.dim() - 2)), ratio, x.device)
    if _channels_last(x):
        n, c, h, w = x.shape  # the mask in x's layout: drawn as [N, H, W, C]
        return x * state.keep_mask((n, h, w, c), ratio, x.device).permute(0, 3, 1, 2)
    return x * state.keep_mask(tuple(x.shape), ratio, x.device)


def _clip(node, name, args, state):
    low = args[1] if len(args) > 1 and args[1] is not None else attribute(node, "min")
    high = args[2] if len(args) > 2 and args[2] is not None else attribute(node, "max")
    return torch.clamp(args[0], None if low is None else float(low), None if high is None else float(high))


def _gemm(node, name, args, state):
    a, b = args[0], args[1]
    a = a.t() if attribute(node, "transA", 0) else a
    b = b.t() if attribute(node, "transB", 0) else b
    y = attribute(node, "alpha", 1.0) * (a @ b)
    return y if len(args) < 3 or args[2] is None else y + attribute(node, "beta", 1.0) * args[2]


def _pool(node, name, args, state):
    x = args[0]
    nd = x.dim() - 2
    kernel = attribute(node, "kernel_shape")
    strides = attribute(node, "strides", [1] * nd)
    pads = attribute(node, "pads", [0] * 2 * nd)
    ceil = bool(attribute(node, "ceil_mode", 0))
    if node.op_type == "MaxPool":
        if pads[:nd] != pads[nd:]:
            x = F.pad(x, [p for i in reversed(range(nd)) for p in (pads[i], pads[nd + i])], value=-torch.inf)
            pads = [0] * 2 * nd
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
        return pool(x, kernel, strides, pads[:nd], attribute(node, "dilations", [1] * nd), ceil)
    if pads[:nd] != pads[nd:]:
        raise VsonnxError(f"asymmetric AveragePool padding is not supported by the synthesis ('{name}').",
                          SYNTHESIS_HINT)
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    return pool(x, kernel, strides, pads[:nd], ceil, bool(attribute(node, "count_include_pad", 0)))


def _axes(node, args, position: int):
    if len(args) > position and args[position] is not None:
        return _ints(args[position])
    return attribute(node, "axes")


def _reshape(node, name, args, state):
    x, shape = args[0], _ints(args[1])
    if not attribute(node, "allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _squeeze(node, name, args, state):
    axes = _axes(node, args, 1)
    x = args[0]
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _unsqueeze(node, name, args, state):
    x = args[0]
    rank = x.dim() + len(_axes(node, args, 1))
    for a in sorted(a % rank for a in _axes(node, args, 1)):
        x = x.unsqueeze(a)
    return x


def _reduce_mean(node, name, args, state):
    axes = _axes(node, args, 1) if state.opset >= 18 else attribute(node, "axes")
    keep = bool(attribute(node, "keepdims", 1))
    return args[0].mean(dim=axes, keepdim=keep) if axes else args[0].mean(dim=list(range(args[0].dim())), keepdim=keep)


def _softmax(node, name, args, state, fn=F.softmax):
    axis = attribute(node, "axis", -1 if state.opset >= 13 else 1)
    if state.opset >= 13:
        return fn(args[0], dim=axis)
    flat = args[0].reshape(int(np.prod(args[0].shape[:axis])), -1)
    return fn(flat, dim=1).reshape(args[0].shape)


def _pad(node, name, args, state):
    if attribute(node, "mode", b"constant") not in (b"constant", "constant"):
        raise VsonnxError(f"only constant Pad is supported by the synthesis ('{name}').", SYNTHESIS_HINT)
    pads = _ints(args[1]) if len(args) > 1 else attribute(node, "pads")
    value = float(args[2]) if len(args) > 2 and args[2] is not None else attribute(node, "value", 0.0)
    nd = len(pads) // 2
    return F.pad(args[0], [p for i in reversed(range(nd)) for p in (pads[i], pads[nd + i])], value=value)


def _constant(node, name, args, state):
    return _tensor(constant_node_value(node))


def _gather(node, name, args, state):
    x, idx = args[0], args[1]
    axis = attribute(node, "axis", 0) % x.dim()
    picked = torch.index_select(x, axis, (idx % x.shape[axis]).reshape(-1))
    return picked.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))


def _constant_of_shape(node, name, args, state):
    filled = attribute(node, "value")
    value = _tensor(numpy_helper.to_array(filled)) if filled is not None else torch.zeros(1)
    return torch.full(_ints(args[0]), value.reshape(-1)[0].item(), dtype=value.dtype, device=args[0].device)


def _shape(node, name, args, state):
    """Shape, with opset 15's start/end (torch's default exporter writes Shape(weight, end=1))."""
    dims = list(args[0].shape)
    start, end = attribute(node, "start", 0), attribute(node, "end", None)
    return torch.tensor(dims[start:end], dtype=torch.int64, device=args[0].device)


def _expand(node, name, args, state):
    return args[0].expand(torch.broadcast_shapes(tuple(args[0].shape), tuple(_ints(args[1]))))


def _cast(node, name, args, state):
    return args[0].to(_DTYPES.get(attribute(node, "to"), torch.float32))


_OPS = {
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "Dropout": _dropout,
    "Clip": _clip,
    "LeakyRelu": lambda n, _, a, s: F.leaky_relu(a[0], attribute(n, "alpha", 0.01)),
    "HardSigmoid": lambda n, _, a, s: torch.clamp(attribute(n, "alpha", 0.2) * a[0] + attribute(n, "beta", 0.5), 0, 1),
    "Gemm": _gemm,
    "MatMul": lambda n, _, a, s: torch.matmul(a[0], a[1]),
    "Sum": lambda n, _, a, s: torch.stack(torch.broadcast_tensors(*a)).sum(0),
    "Concat": lambda n, _, a, s: torch.cat(a, dim=attribute(n, "axis")),
    "Flatten": lambda n, _, a, s: a[0].reshape(int(np.prod(a[0].shape[:attribute(n, "axis", 1)])), -1),
    "Reshape": _reshape,
    "Transpose": lambda n, _, a, s: a[0].permute(attribute(n, "perm", list(reversed(range(a[0].dim()))))),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Shape": _shape,
    "Gather": _gather,
    "Cast": _cast,
    "CastLike": lambda n, _, a, s: a[0].to(a[1].dtype),
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Constant": _constant,
    "GlobalAveragePool": lambda n, _, a, s: a[0].mean(dim=list(range(2, a[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda n, _, a, s: a[0].amax(dim=list(range(2, a[0].dim())), keepdim=True),
    "AveragePool": _pool,
    "MaxPool": _pool,
    "ReduceMean": _reduce_mean,
    "Softmax": _softmax,
    "LogSoftmax": lambda n, name, a, s: _softmax(n, name, a, s, F.log_softmax),
    "Pad": _pad,
}
