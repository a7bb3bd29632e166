#!/usr/bin/env python
"""Structural fuzzer: mutated copies of ONNX models through `vsonnx scan --json` and `vsonnx fix`
(population and relative), checking what a user may rely on whatever the input:

- exit code 0, 1 or 3 only, never a traceback (an unhandled exception), never a hang (per-run time limit);
- the input model file byte for byte as it was;
- a written model loads in onnxruntime, and every initializer vsonnx changed is finite (BN variances >= 0).

    python tools/fuzz_graphs.py --models models/preresnet20-a05.onnx,models/densenet40-a05.onnx \\
        --mutants 200 --seed 0                     # prints one line per failure and the counts

Mutations (``MUTATIONS``): nodes shuffled, a node name duplicated or blanked, graph outputs removed or moved
to an intermediate tensor, an input dropped, duplicated or renamed, a graph input's dtype or shape changed,
an initializer corrupted (truncated data, NaN, other dims), a Dropout's ratio or mode changed, a BN's
attributes changed, an op type changed, a node deleted, an attribute removed or given a wrong type.
tests/test_fuzz.py runs a seeded subset on a small in-memory network.
"""
from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _nodes(model, op=None):
    return [n for n in model.graph.node if op is None or n.op_type == op]


def _pick(rng, items):
    return items[int(rng.integers(len(items)))] if items else None


def shuffle_nodes(model, rng):
    nodes = list(model.graph.node)
    order = rng.permutation(len(nodes))
    del model.graph.node[:]
    model.graph.node.extend(nodes[i] for i in order)


def duplicate_name(model, rng):
    a, b = _pick(rng, _nodes(model)), _pick(rng, _nodes(model))
    b.name = a.name


def blank_name(model, rng):
    _pick(rng, _nodes(model)).name = ""


def remove_outputs(model, rng):
    del model.graph.output[:]


def move_output(model, rng):
    node = _pick(rng, [n for n in _nodes(model) if n.output])
    if model.graph.output:
        model.graph.output[0].name = node.output[0]


def drop_input(model, rng):
    node = _pick(rng, [n for n in _nodes(model) if n.input])
    del node.input[int(rng.integers(len(node.input)))]


def duplicate_input(model, rng):
    node = _pick(rng, [n for n in _nodes(model) if n.input])
    node.input.append(node.input[int(rng.integers(len(node.input)))])


def rename_input(model, rng):
    node = _pick(rng, [n for n in _nodes(model) if n.input])
    node.input[int(rng.integers(len(node.input)))] = "vsonnx_fuzz_missing"


def graph_input_dtype(model, rng):
    model.graph.input[0].type.tensor_type.elem_type = int(_pick(rng, [onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64,
                                                                      onnx.TensorProto.FLOAT16, onnx.TensorProto.STRING]))


def graph_input_shape(model, rng):
    shape = model.graph.input[0].type.tensor_type.shape
    if rng.random() < 0.5 and len(shape.dim) > 1:
        shape.dim[int(rng.integers(1, len(shape.dim)))].dim_value = int(rng.integers(1, 9))
    else:
        shape.dim.add().dim_value = 2


def corrupt_initializer(model, rng):
    tensor = _pick(rng, list(model.graph.initializer))
    array = numpy_helper.to_array(tensor)
    kind = rng.integers(3)
    if kind == 0 and tensor.raw_data:
        tensor.raw_data = tensor.raw_data[: len(tensor.raw_data) // 2]
    elif kind == 1 and array.dtype.kind == "f" and array.size:
        array = array.copy()
        array.reshape(-1)[int(rng.integers(array.size))] = _pick(rng, [np.nan, np.inf, -1e30, -1.0])
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    else:
        tensor.CopyFrom(numpy_helper.from_array(array.reshape(-1)[: max(array.size - 1, 0)], tensor.name))


def dropout_attributes(model, rng):
    node = _pick(rng, _nodes(model, "Dropout"))
    if node is None:
        return
    ratio = float(_pick(rng, [1.5, -0.1, np.nan, 1.0, 0.0]))
    if len(node.input) > 1 and rng.random() < 0.5:
        name = f"vsonnx_fuzz_ratio_{len(model.graph.initializer)}"
        model.graph.initializer.append(numpy_helper.from_array(np.array(ratio, np.float32), name))
        node.input[1] = name
    elif len(node.input) > 2:
        name = f"vsonnx_fuzz_mode_{len(model.graph.initializer)}"
        model.graph.initializer.append(numpy_helper.from_array(np.array(True), name))
        node.input[2] = name
    else:
        node.attribute.append(helper.make_attribute("ratio", ratio))


def bn_attributes(model, rng):
    node = _pick(rng, _nodes(model, "BatchNormalization"))
    if node is None:
        return
    del node.attribute[:]
    node.attribute.append(_pick(rng, [helper.make_attribute("epsilon", -1.0), helper.make_attribute("epsilon", 0.0),
                                      helper.make_attribute("epsilon", "abc"), helper.make_attribute("momentum", 7),
                                      helper.make_attribute("training_mode", 1),
                                      helper.make_attribute("spatial", 0)]))


def change_op(model, rng):
    node = _pick(rng, _nodes(model))
    node.op_type = _pick(rng, ["Relu", "Conv", "BatchNormalization", "Dropout", "Add", "Gemm", "Softmax", "NotAnOp",
                               "MaxPool", "Identity"])


def delete_node(model, rng):
    nodes = list(model.graph.node)
    del model.graph.node[int(rng.integers(len(nodes)))]


def attribute_type(model, rng):
    node = _pick(rng, [n for n in _nodes(model) if n.attribute])
    if node is None:
        return
    k = int(rng.integers(len(node.attribute)))
    if rng.random() < 0.5:
        del node.attribute[k]
    else:
        name = node.attribute[k].name
        del node.attribute[k]
        node.attribute.append(_pick(rng, [helper.make_attribute(name, "x"), helper.make_attribute(name, [1]),
                                          helper.make_attribute(name, 3.5)]))


MUTATIONS = {f.__name__: f for f in (
    shuffle_nodes, duplicate_name, blank_name, remove_outputs, move_output, drop_input, duplicate_input,
    rename_input, graph_input_dtype, graph_input_shape, corrupt_initializer, dropout_attributes, bn_attributes,
    change_op, delete_node, attribute_type)}


def mutate(model: onnx.ModelProto, seed: int) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with one to three mutations drawn by ``seed``; their names."""
    rng = np.random.default_rng(seed)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    names = [str(n) for n in rng.choice(sorted(MUTATIONS), size=int(rng.integers(1, 4)))]
    for name in names:
        MUTATIONS[name](copy, rng)
    return copy, names


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


COMMANDS = (("scan", "--json"), ("fix", "--method", "population"), ("fix", "--method", "relative"))


def check_one(path: Path, calib: Path, folder: Path, limit_s: int = 120, counts: Counter | None = None) -> list[str]:
    """Run every command of COMMANDS on ``path``; the problems found (empty: all well). ``counts`` gets the
    exit codes and the models written."""
    counts = Counter() if counts is None else counts
    import onnxruntime as ort
    from click.testing import CliRunner

    from vsonnx.cli import main

    problems = []
    before = path.read_bytes()
    for command in COMMANDS:
        out = folder / "out.onnx"
        out.unlink(missing_ok=True)
        args = [command[0], str(path), *command[1:]]
        if command[0] == "fix":
            args += ["--calib", str(calib), "--batch-size", "8", "-o", str(out)]
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(limit_s)
        started = time.time()
        try:
            result = CliRunner().invoke(main, args)
        except _Timeout:
            problems.append(f"{command}: no answer within {limit_s} s")
            continue
        finally:
            signal.alarm(0)
        what = " ".join(command)
        counts[f"{command[0]} exit {result.exit_code}"] += 1
        counts["written"] += out.exists()
        if result.exit_code not in (0, 1, 3):
            problems.append(f"{what}: exit {result.exit_code}")
        if result.exception is not None and not isinstance(result.exception, SystemExit) or "Traceback" in result.output:
            problems.append(f"{what}: {type(result.exception).__name__}: {str(result.exception)[:200]}")
        if path.read_bytes() != before:
            problems.append(f"{what}: the input model changed")
        if out.exists():
            problems += [f"{what}: {p}" for p in _written_problems(path, out, ort)]
        if time.time() - started > limit_s:
            problems.append(f"{what}: took {time.time() - started:.0f} s")
    return problems


def _written_problems(source: Path, out: Path, ort) -> list[str]:
    problems = []
    options = ort.SessionOptions()
    options.log_severity_level = 3  # a mutant's stale output shape is a loader warning, not a problem
    try:
        ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        problems.append(f"written model does not load in onnxruntime: {str(exc).splitlines()[0][:160]}")
    old = {t.name: t for t in onnx.load(str(source)).graph.initializer}
    written = onnx.load(str(out))
    variances = {n.input[4] for n in written.graph.node if n.op_type == "BatchNormalization" and len(n.input) > 4}
    for tensor in written.graph.initializer:
        if tensor.name in old and tensor.SerializeToString() == old[tensor.name].SerializeToString():
            continue
        values = numpy_helper.to_array(tensor)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            problems.append(f"wrote a non-finite initializer '{tensor.name}'")
        if tensor.name in variances and (values < 0).any():
            problems.append(f"wrote a negative variance '{tensor.name}'")
    return problems


def calibration_for(model: onnx.ModelProto, folder: Path, samples: int = 16) -> Path:
    """Seeded float inputs in the model's (first) input shape, batch ``samples``."""
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal((samples, *dims[1:])).astype(np.float32)
    path = folder / "calib.npy"
    np.save(path, x)
    return path


def fuzz(models: list[Path], mutants: int, seed: int, limit_s: int = 120, log=print) -> Counter:
    """``mutants`` mutated copies of each model; returns counts (runs, failures, per mutation)."""
    counts: Counter = Counter()
    with tempfile.TemporaryDirectory(prefix="vsonnx-fuzz-") as tmp:
        folder = Path(tmp)
        for model_path in models:
            model = onnx.load(str(model_path))
            calib = calibration_for(model, folder)
            for k in range(mutants):
                mutant, names = mutate(model, seed * 1_000_003 + k)
                path = folder / "mutant.onnx"
                path.write_bytes(mutant.SerializeToString())
                problems = check_one(path, calib, folder, limit_s, counts)
                counts["models"] += 1
                counts.update(names)
                if problems:
                    counts["failed"] += 1
                    log(f"FAIL {model_path.name} seed {seed} mutant {k} {names}: {'; '.join(problems)}")
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="models/preresnet20-a05.onnx,models/densenet40-a05.onnx,"
                                       "models/wrn16-4-b03.onnx")
    p.add_argument("--mutants", type=int, default=200, help="per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-s", type=int, default=120, help="time limit per command")
    args = p.parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")
    started = time.time()
    counts = fuzz([Path(m) for m in args.models.split(",")], args.mutants, args.seed, args.limit_s)
    print(f"{counts['models']} mutated models x {len(COMMANDS)} commands, {counts['failed']} with problems, "
          f"{time.time() - started:.0f} s; {counts['written']} models written; "
          + ", ".join(f"{k}: {counts[k]}" for k in sorted(counts) if "exit" in k)
          + "; mutations: " + ", ".join(f"{k} {counts[k]}" for k in sorted(MUTATIONS)))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
