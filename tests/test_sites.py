import json

import numpy as np
import pytest

from vsonnx import theory
from vsonnx.sites import find_sites

from conftest import GraphBuilder


def by_name(report):
    return {b.name: b for b in report.batchnorms}


@pytest.mark.parametrize("form,opset,expected", [
    ("attribute", 11, 0.3), ("initializer", 17, 0.3), ("constant", 17, 0.3), ("default", 17, 0.5),
])
def test_dropout_forms_resolve_their_ratio(form, opset, expected):
    g = GraphBuilder(opset=opset)
    h = g.dropout("x", 0.3, "d", form=form)
    out = g.bn(h, 3, "bn")
    report = find_sites(g.build(out))
    bn = by_name(report)["bn"]
    assert bn.site and bn.path == "direct"
    assert bn.dropouts[0].ratio == pytest.approx(expected)


def test_dynamic_ratio_is_reported_not_guessed():
    g = GraphBuilder()
    h = g.dropout("x", form="dynamic", name="d")
    out = g.bn(h, 3, "bn")
    report = find_sites(g.build(out))
    bn = by_name(report)["bn"]
    assert bn.dropouts[0].ratio is None and bn.predicted_var_ratio is None
    assert any("computed at run time" in w for w in report.warnings)


def test_direct_through_shape_ops_and_bn1d():
    g = GraphBuilder()
    h = g.node("Flatten", ["x"])
    h = g.gemm(h, 3 * 8 * 8, 6, "fc")
    h = g.dropout(h, 0.5, "d")
    h = g.node("Identity", [h])
    out = g.bn(h, 6, "bn1d")
    bn = by_name(find_sites(g.build(out)))["bn1d"]
    assert bn.site and bn.path == "direct" and bn.channels == 6


def test_weight_path_records_fan_in_and_cos2():
    g = GraphBuilder()
    h = g.dropout("x", 0.5, "d")
    h = g.conv(h, 3, 4, k=3, name="conv")
    out = g.bn(h, 4, "bn")
    model = g.build(out)
    bn = by_name(find_sites(model))["bn"]
    assert bn.path == "weight" and bn.weight.op == "Conv" and bn.weight.fan_in == 27
    w = next(t for t in model.graph.initializer if t.name == "conv_w")
    from onnx import numpy_helper
    rows = numpy_helper.to_array(w).reshape(4, -1).astype(np.float64)
    expected = np.mean(rows.sum(1) ** 2 / (27 * (rows ** 2).sum(1)))
    assert bn.weight.cos2 == pytest.approx(expected, rel=1e-5)


def test_bn1d_after_gemm_weight_path():
    g = GraphBuilder()
    h = g.node("Flatten", ["x"])
    h = g.dropout(h, 0.5, "d")
    h = g.gemm(h, 3 * 8 * 8, 6, "fc")
    out = g.bn(h, 6, "bn1d")
    bn = by_name(find_sites(g.build(out)))["bn1d"]
    assert bn.path == "weight" and bn.weight.op == "Gemm" and bn.weight.fan_in == 192


def test_matmul_with_bias_is_weight_path():
    g = GraphBuilder()
    h = g.node("Flatten", ["x"])
    h = g.dropout(h, 0.5, "d")
    w = g.init("w", np.ones((192, 6), np.float32))
    h = g.node("MatMul", [h, w], "mm")
    h = g.node("Add", [h, g.init("b", np.zeros(6, np.float32))])
    out = g.bn(h, 6, "bn")
    bn = by_name(find_sites(g.build(out)))["bn"]
    assert bn.path == "weight" and bn.weight.op == "MatMul" and bn.weight.fan_in == 192
    assert bn.weight.cos2 == pytest.approx(1.0)


@pytest.mark.parametrize("op", ["Add", "Concat"])
def test_merge_path(op):
    g = GraphBuilder()
    h = g.dropout("x", 0.5, "d")
    kwargs = {"axis": 1} if op == "Concat" else {}
    h = g.node(op, [h, "x"], **kwargs)
    out = g.bn(h, 6 if op == "Concat" else 3, "bn")
    assert by_name(find_sites(g.build(out)))["bn"].path == "merge"


def test_other_path_through_activation():
    g = GraphBuilder()
    h = g.dropout("x", 0.5, "d")
    h = g.node("Relu", [h])
    out = g.bn(h, 3, "bn")
    bn = by_name(find_sites(g.build(out)))["bn"]
    assert bn.site and bn.path == "other"


def test_two_dropouts_reach_one_bn_and_downstream_is_marked():
    g = GraphBuilder()
    a = g.dropout("x", 0.5, "d1")
    b = g.dropout("x", 0.2, "d2")
    h = g.node("Add", [a, b])
    h = g.bn(h, 3, "bn_site")
    h = g.node("Relu", [h])
    out = g.bn(h, 3, "bn_after")
    report = find_sites(g.build(out))
    site, after = by_name(report)["bn_site"], by_name(report)["bn_after"]
    assert {d.name for d in site.dropouts} == {"d1", "d2"} and site.path == "merge"
    assert not after.site and after.downstream_of_site


def test_normalisation_stops_the_search():
    g = GraphBuilder()
    h = g.dropout("x", 0.5, "d")
    h = g.bn(h, 3, "bn1")
    out = g.bn(h, 3, "bn2")
    report = by_name(find_sites(g.build(out)))
    assert report["bn1"].site and not report["bn2"].site and report["bn2"].downstream_of_site


def test_predicted_ratio_inverts_eq8():
    p, c, v = 0.5, np.array([0.0, 1.0, -2.0]), np.array([1.0, 0.5, 2.0])
    train_var = theory.train_var_direct(c, v, p)
    g = GraphBuilder()
    h = g.dropout("x", 1 - p, "d")
    out = g.bn(h, 3, "bn", mean=c, var=train_var)
    bn = by_name(find_sites(g.build(out)))["bn"]
    assert bn.predicted_var_ratio == pytest.approx(float(np.mean(v / train_var)), rel=1e-5)


def test_no_dropout_warning_only_with_evidence_of_folding():
    g = GraphBuilder()
    out = g.bn(g.conv("x", 3, 4), 4)  # conv -> BN: nothing was folded, a network without dropout
    assert find_sites(g.build(out)).warnings == []
    g = GraphBuilder()
    out = g.bn(g.conv(g.node("Relu", [g.conv("x", 3, 4, name="c1")]), 4, 4), 4)  # c1 -> Relu: BN folded into c1
    report = find_sites(g.build(out))
    assert any("no Dropout" in w and "'c1'" in w and "vsonnx.export" in w for w in report.warnings)
    g = GraphBuilder()
    model = g.build(g.bn(g.conv("x", 3, 4, name="c1"), 4))
    meta = model.graph.node[0].metadata_props.add()
    meta.key, meta.value = "pkg.onnxscript.rewriter.rule_name", "FuseBatchNormIntoConv"
    assert any("exporter folded 1 BatchNormalization" in w for w in find_sites(model).warnings)  # its metadata says so
    g = GraphBuilder()
    report = find_sites(g.build(g.node("Relu", ["x"])))
    assert report.batchnorms == [] and report.warnings == []


def test_warning_folded_bn_and_not_for_classifier():
    g = GraphBuilder()
    h = g.dropout("x", 0.5, "d")
    h = g.conv(h, 3, 4, name="conv")
    out = g.node("Relu", [h])
    assert any("folded" in w for w in find_sites(g.build(out)).warnings)
    g = GraphBuilder()
    h = g.node("Flatten", ["x"])
    h = g.dropout(h, 0.5, "d")
    out = g.gemm(h, 192, 10)
    assert not any("folded" in w for w in find_sites(g.build(out)).warnings)


def test_warning_bn_training_mode():
    g = GraphBuilder()
    h = g.dropout("x", 0.5, "d")
    out = g.bn(h, 3, "bn", training_mode=1)
    report = find_sites(g.build(out))
    assert by_name(report)["bn"].training_mode
    assert any("training mode" in w for w in report.warnings)


def test_dropout_training_mode_true_warns():
    g = GraphBuilder()
    r = g.init("r", np.array(0.5, np.float32))
    t = g.init("t", np.array(True))
    h = g.node("Dropout", ["x", r, t], "d")
    out = g.bn(h, 3, "bn")
    assert any("training_mode is true" in w for w in find_sites(g.build(out)).warnings)


def test_report_json_schema():
    g = GraphBuilder()
    h = g.dropout("x", 0.5, "d")
    out = g.bn(g.conv(h, 3, 4), 4, "bn")
    d = json.loads(json.dumps(find_sites(g.build(out), "m.onnx").to_dict()))
    assert d["model"] == "m.onnx" and isinstance(d["warnings"], list)
    bn = d["batchnorms"][0]
    for key in ("name", "input", "channels", "site", "downstream_of_site", "dropouts", "path", "weight",
                "predicted_var_ratio"):
        assert key in bn
    assert bn["dropouts"] == [{"name": "d", "ratio": 0.5, "channelwise": False}]
    assert set(bn["weight"]) >= {"op", "fan_in", "cos2"}


def test_scan_says_which_sites_data_free_can_correct():
    from vsonnx.measure import scan

    g = GraphBuilder()
    a = g.bn(g.dropout("x", 0.5, "d1"), 3, "direct")
    h = g.node("Concat", [g.dropout(a, 0.5, "d2"), "x"], axis=1)
    out = g.bn(h, 6, "concat")
    report = {b.name: b for b in scan(g.build(out)).batchnorms}
    assert report["direct"].data_free.startswith("direct")
    assert report["concat"].data_free.startswith("not corrected")
    assert "data_free" in report["direct"].to_dict()


def test_ratio_zero_dropout_is_not_a_site():
    g = GraphBuilder()
    out = g.bn(g.dropout("x", 0.0, "d"), 3, "bn")
    bn = by_name(find_sites(g.build(out)))["bn"]
    assert not bn.site and bn.dropouts == []


def test_softmax_and_max_pooling_are_no_folding_evidence():
    """A Gemm ending in Softmax (a classifier) and a Conv followed by MaxPool are what networks without BN
    look like: no 'look folded' warning (classic Model Zoo models got one)."""
    g = GraphBuilder()
    h = g.node("MaxPool", [g.conv("x", 3, 4)], "pool", kernel_shape=[2, 2])
    h = g.node("Flatten", [g.node("GlobalAveragePool", [h])], "flat")
    model = g.build(g.node("Softmax", [g.gemm(h, 4, 5)], "softmax"))
    assert not [w for w in find_sites(model).warnings if "look folded" in w]


def test_a_network_without_bn_gets_one_line_at_most():
    """conv -> ReLU three times, a Dropout before the last: BNs may never have been there, so one line (not a
    warning per layer or per Dropout)."""
    g = GraphBuilder()
    h = g.node("Relu", [g.conv("x", 3, 4)])
    h = g.node("Relu", [g.conv(h, 4, 4)])
    h = g.node("Relu", [g.conv(g.dropout(h, 0.5, "d"), 4, 4)])
    warnings = find_sites(g.build(h)).warnings
    assert len(warnings) == 1 and "no BatchNormalization, and 3 layer(s)" in warnings[0]
