"""Tiny seeded ONNX graphs built in memory, shared by the tests."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class GraphBuilder:
    """Chainable helper: nodes, initializers from a seeded generator, one float input and output."""

    def __init__(self, seed: int = 0, opset: int = OPSET):
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def init(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str | None = None, outputs: list[str] | None = None,
             **attrs) -> str:
        self.count += 1
        name = name or f"{op.lower()}{self.count}"
        outputs = outputs or [f"{name}_out"]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def dropout(self, x: str, ratio: float = 0.5, name: str | None = None, form: str = "initializer") -> str:
        name = name or f"drop{self.count + 1}"
        if form == "attribute":  # opset < 12
            return self.node("Dropout", [x], name, ratio=ratio)
        if form == "default":
            return self.node("Dropout", [x], name)
        if form == "constant":
            r = self.node("Constant", [], f"{name}_ratio", value=numpy_helper.from_array(np.array(ratio, np.float32)))
            return self.node("Dropout", [x, r], name)
        if form == "dynamic":  # ratio computed from the input: not static
            r = self.node("ReduceMax", [x], f"{name}_r", keepdims=0)
            return self.node("Dropout", [x, r], name)
        r = self.init(f"{name}_ratio", np.array(ratio, np.float32))
        t = self.init(f"{name}_train", np.array(False))
        return self.node("Dropout", [x, r, t], name)

    def bn(self, x: str, channels: int, name: str | None = None, mean=None, var=None, **attrs) -> str:
        name = name or f"bn{self.count + 1}"
        rng = self.rng
        scale = self.init(f"{name}_scale", (1 + 0.1 * rng.standard_normal(channels)).astype(np.float32))
        bias = self.init(f"{name}_bias", (0.1 * rng.standard_normal(channels)).astype(np.float32))
        m = self.init(f"{name}_mean", np.asarray(mean if mean is not None else 0.1 * rng.standard_normal(channels), np.float32))
        v = self.init(f"{name}_var", np.asarray(var if var is not None else 1 + 0.2 * rng.random(channels), np.float32))
        return self.node("BatchNormalization", [x, scale, bias, m, v], name, **attrs)

    def conv(self, x: str, cin: int, cout: int, k: int = 3, name: str | None = None) -> str:
        name = name or f"conv{self.count + 1}"
        w = self.init(f"{name}_w", (self.rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32))
        return self.node("Conv", [x, w], name, pads=[k // 2] * 4)

    def gemm(self, x: str, cin: int, cout: int, name: str | None = None) -> str:
        name = name or f"gemm{self.count + 1}"
        w = self.init(f"{name}_w", (self.rng.standard_normal((cout, cin)) / np.sqrt(cin)).astype(np.float32))
        b = self.init(f"{name}_b", np.zeros(cout, np.float32))
        return self.node("Gemm", [x, w, b], name, transB=1)

    def build(self, output: str, input_shape=("N", 3, 8, 8), ir_version: int = 8) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "test", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=ir_version)
        inferred = onnx.shape_inference.infer_shapes(model).graph.output[0]
        if inferred.type.tensor_type.HasField("shape"):  # the checker wants a shaped graph output
            model.graph.output[0].CopyFrom(inferred)
        else:
            model.graph.output[0].type.tensor_type.shape.SetInParent()
        onnx.checker.check_model(model)
        return model


def pytest_collection_modifyitems(config, items):
    """Tests marked heavy run only when the -m expression names them (python -m pytest -m heavy)."""
    if "heavy" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="heavy: run with python -m pytest -m heavy")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def builder():
    return GraphBuilder()


def cnn_with_sites(seed: int = 0, channels: int = 4, classes: int = 5) -> onnx.ModelProto:
    """x -> conv -> [drop] -> BN(direct) -> relu -> [drop] -> conv -> BN(weight) -> relu -> GAP -> gemm."""
    g = GraphBuilder(seed)
    h = g.conv("x", 3, channels)
    h = g.dropout(h, 0.5, "drop_a")
    h = g.bn(h, channels, "bn_direct")
    h = g.node("Relu", [h])
    h = g.dropout(h, 0.3, "drop_b")
    h = g.conv(h, channels, channels)
    h = g.bn(h, channels, "bn_weight")
    h = g.node("Relu", [h])
    h = g.node("GlobalAveragePool", [h])
    h = g.node("Flatten", [h])
    out = g.gemm(h, channels, classes)
    return g.build(out)


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def run(*args):
    """The CLI in-process; never a traceback."""
    from vsonnx.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture
def setup(tmp_path):
    """(folder, model path): cnn_with_sites, calib.npz / val.npz (labelled, 32 each), nolabels.npy."""
    model_path = save(cnn_with_sites(), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 3, 8, 8)) + 0.3).astype(np.float32)
    y = rng.integers(0, 5, 64)
    np.savez(tmp_path / "calib.npz", x=x[:32], y=y[:32])
    np.savez(tmp_path / "val.npz", x=x[32:], y=y[32:])
    np.save(tmp_path / "nolabels.npy", x)
    return tmp_path, model_path
