"""Exports that erased the evidence: Dropout removed (named by the user), BN folded into a Conv."""
import contextlib
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import vsonnx
from vsonnx.cli import main
from vsonnx.errors import VsonnxError
from vsonnx.model import load_model
from vsonnx.simulate import insert_dropouts
from vsonnx.folding import inside_folded
from vsonnx.site_names import parse_dropout_specs, resolve_sites

from conftest import GraphBuilder, save


class TwoConvNet(nn.Module):
    """conv - BN - ReLU - Dropout - conv - BN - ReLU - pool - fc (placement "b": the second BN is a weight
    site), or conv - Dropout - BN - ReLU - conv - BN - ReLU - pool - fc (placement "a", convs without bias).
    A stock export folds both BNs into the convs, in placement a the one that followed the dropout too."""

    def __init__(self, placement: str = "b"):
        super().__init__()
        self.placement = placement
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=placement == "b")
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=placement == "b")
        self.bn2 = nn.BatchNorm2d(6)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        if self.placement == "a":
            x = self.relu1(self.bn1(self.drop(self.conv1(x))))
            x = self.relu2(self.bn2(self.conv2(x)))
        else:
            x = self.relu1(self.bn1(self.conv1(x)))
            x = self.relu2(self.bn2(self.conv2(self.drop(x))))
        return self.fc(self.flatten(self.pool(x)))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stripped")
    export_both_ways(TwoConvNet, tmp)
    return tmp


def export_both_ways(net_class, folder, default_exporter: bool = False) -> np.ndarray:
    """Seeded net whose BN statistics are training-time moments, exported as kept.onnx (vsonnx.export) and
    stock.onnx (torch.onnx.export: Dropout removed, BN folded; the TorchScript exporter, or with
    ``default_exporter`` the default dynamo one, which records module names in node metadata), with its data
    as x.npy; returns the data."""
    torch.manual_seed(0)
    net = net_class()
    x = torch.randn(256, 3, 8, 8) + 0.5
    net.train()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # running stats = average over the draws below: training-time moments
    with torch.no_grad():
        for _ in range(30):
            net(x)
    net.eval()
    torch.save(net.state_dict(), folder / "net.pt")
    vsonnx.export(net, x[:2], folder / "kept.onnx", exporter="torchscript")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if default_exporter:
            torch.onnx.export(net, (x[:2],), str(folder / "stock.onnx"), input_names=["input"],
                              dynamic_shapes=({0: torch.export.Dim("n")},))
        else:
            torch.onnx.export(net, (x[:2],), str(folder / "stock.onnx"), dynamo=False, input_names=["input"],
                              dynamic_axes={"input": {0: "n"}})
    np.save(folder / "x.npy", x.numpy())
    return x.numpy()


def logits(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_stock_export_is_folded_and_scan_says_so(exports):
    model = load_model(exports / "stock.onnx")
    assert not any(n.op_type in ("Dropout", "BatchNormalization") for n in model.graph.node)
    r = CliRunner().invoke(main, ["scan", str(exports / "stock.onnx")])
    assert r.exit_code == 0 and "0 BatchNormalization, 0 Dropout, 0 variance-shift site(s)" in r.output
    # both convs (each followed by a ReLU with no BN between) look folded; the classifier Gemm does not
    assert "2 layer(s) such as '/conv1/Conv' look folded" in r.output and "--dropout NAME=RATIO" in r.output


def test_folded_fix_matches_unfolded_fix(exports):
    vsonnx.fix(exports / "kept.onnx", exports / "x.npy", output=exports / "kept.fixed.onnx",
                      method="population")
    conv2 = next(n.name for n in load_model(exports / "stock.onnx").graph.node if n.op_type == "Conv" and "conv2" in n.name)
    folded = vsonnx.fix(exports / "stock.onnx", exports / "x.npy", output=exports / "stock.fixed.onnx",
                        dropout_sites={conv2: 0.5})
    assert folded.written and len(folded.notes) == 1  # conv2 carried the folded BN and was corrected
    assert folded.folded == [conv2] and folded.to_dict()["folded"] == [conv2]
    said = next(w for w in folded.warnings if "folded into the weights" in w)
    assert "corrected relative to them" in said and "dynamo=True, optimize=False" in said
    x = np.load(exports / "x.npy")
    a, b = logits(exports / "kept.fixed.onnx", x), logits(exports / "stock.fixed.onnx", x)
    before = logits(exports / "stock.onnx", x)
    # both fixes make the BN output match its training-time moments; they differ only by the Monte-Carlo
    # error of the simulated training statistics (30 torch draws vs one ORT draw per sample)
    assert np.abs(a - b).max() < 0.25 * np.abs(a - before).max()
    assert folded.samples == 256


def pytorch_re_estimation(net, x) -> np.ndarray:
    """PyTorch's own re-estimation with dropout off (eval mode): each BN in turn gets the mean and biased
    variance of its input over x; the logits after."""
    x = torch.from_numpy(x)
    for bn in [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]:
        seen = {}

        def hook(module, inputs, output):
            seen["x"] = inputs[0].double()

        handle = bn.register_forward_hook(hook)
        with torch.no_grad():
            net(x)
        handle.remove()
        bn.running_mean.copy_(seen["x"].mean((0, 2, 3)))
        bn.running_var.copy_(seen["x"].var((0, 2, 3), unbiased=False))
    with torch.no_grad():
        return net(x).numpy()


def test_folded_fix_matches_pytorchs_re_estimation(exports):
    """The stock export folded bn2 (after the removed dropout) into conv2: the correction in conv2's weights
    lands where PyTorch's re-estimation of the same weights does, within 5% of the change that
    re-estimation makes (measured 1.8%: the stored statistics averaged 30 torch dropout draws, the fix
    simulates one draw per sample; 0.8% with 8)."""
    net = TwoConvNet()
    net.load_state_dict(torch.load(exports / "net.pt"))
    net.eval()
    x = np.load(exports / "x.npy")
    before = logits(exports / "stock.onnx", x)
    reference = pytorch_re_estimation(net, x)
    conv2 = next(n.name for n in load_model(exports / "stock.onnx").graph.node if n.op_type == "Conv" and "conv2" in n.name)
    vsonnx.fix(exports / "stock.onnx", exports / "x.npy", output=exports / "stock.pt-ref.onnx", dropout_sites={conv2: 0.5})
    fixed = logits(exports / "stock.pt-ref.onnx", x)
    assert np.abs(fixed - reference).max() < 0.05 * np.abs(reference - before).max()


def test_removed_dropout_with_bn_kept_equals_real_dropout(tmp_path):
    def graph(with_dropout: bool):
        g = GraphBuilder(seed=3)
        h = g.conv("x", 3, 4, name="conv")
        if with_dropout:
            h = g.dropout(h, 0.5, "d")
        h = g.node("Add", [h, g.conv("x", 3, 4, name="side")], "add")
        return g.build(g.bn(h, 4, "bn"))
    x = np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    real = vsonnx.fix(save(graph(True), tmp_path / "real.onnx"), tmp_path / "x.npy", method="population")
    named = vsonnx.fix(save(graph(False), tmp_path / "named.onnx"), tmp_path / "x.npy", dropout_sites={"conv_out": 0.5})
    assert [b["name"] for b in named.batchnorms] == ["bn"]
    np.testing.assert_allclose(named.batchnorms[0]["new_var"], real.batchnorms[0]["new_var"], rtol=1e-6)


def test_names_that_do_not_exist_are_user_errors(exports):
    model = load_model(exports / "stock.onnx")
    with pytest.raises(VsonnxError, match="neither a tensor, a node nor a PyTorch module") as info:
        resolve_sites(model, {"/conv9/Conv": 0.5})
    assert "closest: /conv2/Conv, /conv1/Conv" in info.value.hint
    with pytest.raises(VsonnxError, match="NAME=RATIO"):
        parse_dropout_specs(["conv2"])
    with pytest.raises(VsonnxError, match="outside"):
        parse_dropout_specs(["conv2=1.5"])
    r = CliRunner().invoke(main, ["fix", str(exports / "stock.onnx"), "--calib", str(exports / "x.npy"),
                                  "--dropout", "missing_tensor=0.5"])
    assert r.exit_code == 3 and "Hint:" in r.output and "Traceback" not in r.output


def test_sites_file(tmp_path):
    (tmp_path / "s.json").write_text('{"dropout": {"a": 0.5, "b": 0.1}}')
    assert parse_dropout_specs(["c=0.2"], tmp_path / "s.json") == {"a": 0.5, "b": 0.1, "c": 0.2}


def test_scan_with_named_sites(exports):
    conv2 = next(n.name for n in load_model(exports / "stock.onnx").graph.node if n.op_type == "Conv" and "conv2" in n.name)
    r = CliRunner().invoke(main, ["scan", str(exports / "stock.onnx"), "--dropout", f"{conv2}=0.5"])
    assert r.exit_code == 0 and "Traceback" not in r.output
    assert "named site" in r.output and "would correct 1 folded weight layer" in r.output


def test_folded_placement_a_matches_unfolded_fix(tmp_path):
    """Dropout between a conv and the BN folded into it: named by the conv's output tensor, simulated
    before the folded bias; the fixed stock export agrees with the fixed vsonnx export."""
    xs = export_both_ways(lambda: TwoConvNet("a"), tmp_path)
    stock = load_model(tmp_path / "stock.onnx")
    assert not any(n.op_type == "BatchNormalization" for n in stock.graph.node)
    conv1 = next(n for n in stock.graph.node if n.op_type == "Conv")
    vsonnx.fix(tmp_path / "kept.onnx", tmp_path / "x.npy", output=tmp_path / "kept.fixed.onnx", method="population")
    folded = vsonnx.fix(tmp_path / "stock.onnx", tmp_path / "x.npy", output=tmp_path / "stock.fixed.onnx",
                        dropout_sites={conv1.output[0]: 0.5})
    assert folded.written and len(folded.notes) == 2  # conv1 (dropout inside its fold) and conv2 (downstream)
    a, b = logits(tmp_path / "kept.fixed.onnx", xs), logits(tmp_path / "stock.fixed.onnx", xs)
    before = logits(tmp_path / "stock.onnx", xs)
    assert np.abs(a - b).max() < 0.25 * np.abs(a - before).max()
    simulated = insert_dropouts(stock, {conv1.output[0]: 0.5}, training=True, before_bias=inside_folded(
        stock, {conv1.output[0]: 0.5}))
    assert [n.op_type for n in simulated.graph.node[:3]] == ["Conv", "Dropout", "Add"]
    assert len(simulated.graph.node[0].input) == 2  # the folded bias is added after the dropout


@pytest.mark.parametrize("placement", ["a", "b"])
def test_default_exporter_module_names_name_the_sites(tmp_path, placement):
    """torch's default export folds every BN and records the BN's module on the conv it went into: scan lists
    them, and `--dropout MODULE=RATIO` (the BN for placement a, the conv for placement b, shell patterns
    allowed) fixes the export as well as naming the tensor would."""
    pytest.importorskip("onnxscript")
    xs = export_both_ways(lambda: TwoConvNet(placement), tmp_path, default_exporter=True)
    stock = load_model(tmp_path / "stock.onnx")
    report = vsonnx.scan(stock)
    assert [(f["batchnorm"], f["layer_module"]) for f in report.folded_batchnorms] == [("bn1", "conv1"),
                                                                                      ("bn2", "conv2")]
    convs = [n for n in stock.graph.node if n.op_type == "Conv"]
    if placement == "a":  # dropout between conv1 and bn1: inside the fold
        assert resolve_sites(stock, {"bn1": 0.5}) == {convs[0].output[0]: 0.5}
        assert resolve_sites(stock, {"bn*": 0.5}) == {convs[0].output[0]: 0.5, convs[1].output[0]: 0.5}
        spec = "b?1=0.5"
    else:  # dropout before conv2
        assert resolve_sites(stock, {"conv2": 0.5}) == {convs[1].input[0]: 0.5}
        spec = "conv2=0.5"
    r = CliRunner().invoke(main, ["fix", str(tmp_path / "stock.onnx"), "--calib", str(tmp_path / "x.npy"),
                                  "--dropout", spec, "-o", str(tmp_path / "named.onnx")])
    assert r.exit_code == 0, r.output
    site = convs[0].output[0] if placement == "a" else convs[1].input[0]
    vsonnx.fix(tmp_path / "stock.onnx", tmp_path / "x.npy", output=tmp_path / "tensor.onnx", dropout_sites={site: 0.5})
    np.testing.assert_array_equal(logits(tmp_path / "named.onnx", xs), logits(tmp_path / "tensor.onnx", xs))
    assert not np.allclose(logits(tmp_path / "named.onnx", xs), logits(tmp_path / "stock.onnx", xs))


def test_torchscript_node_names_give_module_names(exports):
    stock = load_model(exports / "stock.onnx")
    conv2 = next(n for n in stock.graph.node if n.name == "/conv2/Conv")
    assert resolve_sites(stock, {"conv2": 0.5}) == {conv2.input[0]: 0.5}
    assert resolve_sites(stock, {conv2.input[0]: 0.3}) == {conv2.input[0]: 0.3}  # a tensor name wins


def test_distill_with_named_sites_fits_folded_layers_towards_the_real_ensemble(tmp_path):
    """`--dropout ... --method distill` on a stock export (placement a: the dropout inside conv1's fold): the
    fixed model is closer to the dropout ensemble of the vsonnx export of the same weights, whose Dropout
    nodes are the real ones (an independent teacher), than the stock export was."""
    from vsonnx.ensemble import DropoutEnsemble, divergence, scores_tensor

    xs = export_both_ways(lambda: TwoConvNet("a"), tmp_path)
    conv1 = next(n for n in load_model(tmp_path / "stock.onnx").graph.node if n.op_type == "Conv")
    report = vsonnx.fix(tmp_path / "stock.onnx", tmp_path / "x.npy", output=tmp_path / "stock.distilled.onnx",
                        method="distill", dropout_sites={conv1.output[0]: 0.5},
                        method_options={"distill": {"steps": 100, "lr": 0.05}})
    assert report.written and report.method == "distill (named dropout sites)" and len(report.notes) == 2
    kept = load_model(tmp_path / "kept.onnx")
    target = DropoutEnsemble(kept, scores_tensor(kept), seed=7, device="cpu").target({"input": xs}, masks=200)
    before = divergence(target, logits(tmp_path / "stock.onnx", xs), "kl").mean()
    after = divergence(target, logits(tmp_path / "stock.distilled.onnx", xs), "kl").mean()
    assert after < 0.7 * before, (before, after)


def test_sites_removed_by_a_tool_are_restored_from_the_metadata(tmp_path):
    """A vsonnx export (its vsonnx.dropouts metadata names each Dropout's module and what it fed) after a tool
    that removes Dropout and folds the BN after it, keeping the metadata (as onnxslim does; here the default
    exporter's stock export with the kept export's metadata copied over): `fix` with no --dropout restores
    the sites, says so, and corrects exactly as naming them would."""
    from vsonnx.model import get_metadata, set_metadata
    from vsonnx.site_names import restored_sites

    export_both_ways(lambda: TwoConvNet("a"), tmp_path, default_exporter=True)
    kept, stock = load_model(tmp_path / "kept.onnx"), load_model(tmp_path / "stock.onnx")
    records = __import__("json").loads(get_metadata(kept)["vsonnx.dropouts"])
    assert records[0]["feeds"] == [{"module": "bn1", "op": "BatchNormalization"}]
    set_metadata(stock, {"vsonnx.dropouts": get_metadata(kept)["vsonnx.dropouts"]})
    path = save(stock, tmp_path / "slim.onnx")
    sites, missing = restored_sites(stock)
    conv1 = next(n for n in stock.graph.node if n.op_type == "Conv")
    assert sites == {conv1.output[0]: 0.5} and missing == []  # inside the fold: the conv's output
    scanned = CliRunner().invoke(main, ["scan", path])
    said = "metadata lists 1 Dropout(s) a tool removed after vsonnx.export; {} 1 site(s) from it."
    assert said.format("`fix --calib DATA` restores") in scanned.output
    r = CliRunner().invoke(main, ["fix", path, "--calib", str(tmp_path / "x.npy"), "--method", "population", "-o",
                                  str(tmp_path / "restored.onnx")])
    assert r.exit_code == 0 and said.format("restored") in r.output  # scan and fix word it alike
    named = CliRunner().invoke(main, ["fix", path, "--calib", str(tmp_path / "x.npy"), "--dropout", "bn1=0.5", "-o",
                                      str(tmp_path / "named.onnx")])
    assert named.exit_code == 0, named.output
    x = np.load(tmp_path / "x.npy")
    np.testing.assert_array_equal(logits(tmp_path / "restored.onnx", x), logits(tmp_path / "named.onnx", x))
    r = CliRunner().invoke(main, ["fix", path, "--calib", str(tmp_path / "x.npy"), "--dropout", "drop=0.5", "-o",
                                  str(tmp_path / "by_dropout.onnx")])
    assert r.exit_code == 0, r.output  # the removed Dropout module's own name: where its noise acted
    np.testing.assert_array_equal(logits(tmp_path / "by_dropout.onnx", x), logits(tmp_path / "named.onnx", x))


def test_a_removed_dropout_without_its_feeds_is_said_not_guessed(tmp_path):
    from vsonnx.model import get_metadata, set_metadata

    export_both_ways(lambda: TwoConvNet("a"), tmp_path, default_exporter=True)
    kept, stock = load_model(tmp_path / "kept.onnx"), load_model(tmp_path / "stock.onnx")
    records = __import__("json").loads(get_metadata(kept)["vsonnx.dropouts"])
    set_metadata(stock, {"vsonnx.dropouts": __import__("json").dumps([{k: v for k, v in r.items() if k != "feeds"}
                                                                      for r in records])})
    path = save(stock, tmp_path / "old.onnx")
    r = CliRunner().invoke(main, ["fix", path, "--calib", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 0 and "fed is not recorded" in r.output and not (tmp_path / "o.onnx").exists()
    assert "fed is not recorded" in CliRunner().invoke(main, ["scan", path]).output
    r = CliRunner().invoke(main, ["fix", path, "--calib", str(tmp_path / "x.npy"), "--dropout", "drop=0.5"])
    assert r.exit_code == 3 and "does not say which module it fed" in r.output


def test_scan_lists_the_names_fix_accepts_after_a_tool_folded_the_bn(tmp_path):
    """A BN folded by a tool that keeps tensor names (onnxslim names the fused conv's output after the BN):
    scan lists 'bn1' as acting inside the fold, and `--dropout bn1=0.5` puts the site on that output."""
    g = GraphBuilder()
    h = g.conv("x", 3, 4, name="/drop/Dropout_output_0")  # the fused node, named after a removed tensor
    g.nodes[-1].output[0] = "/bn1/BatchNormalization_output_0"
    h = "/bn1/BatchNormalization_output_0"
    h = g.node("Relu", [h], "/relu1/Relu", outputs=["/relu1/Relu_output_0"])
    model = g.build(g.bn(g.conv(h, 4, 4, name="/conv2/Conv"), 4, "/bn2/BatchNormalization"))
    r = CliRunner().invoke(main, ["scan", save(model, tmp_path / "m.onnx"), "--json"])
    names = __import__("json").loads(r.output)["names"]
    assert names["bn1"].startswith("inside the BN folded into Conv '/drop/Dropout_output_0'")
    assert "drop" not in names  # the fused node's name does not make it the dropout module
    assert resolve_sites(model, {"bn1": 0.5}) == {"/bn1/BatchNormalization_output_0": 0.5}
    assert resolve_sites(model, {"bn2": 0.5}) == {"/conv2/Conv_out": 0.5}


def test_torchscript_scopes_of_nested_containers_name_the_module():
    from vsonnx.graph import scope_module

    assert scope_module("/stages/stages.1/blocks/blocks.0/norm1/BatchNormalization") == "stages.1.blocks.0.norm1"
    assert scope_module("/features/features.1/conv/conv.0/conv.0.0/Conv") == "features.1.conv.0.0"
    assert scope_module("/layer1/layer1.0/bn1/BatchNormalization_output_0") == "layer1.0.bn1"
    assert scope_module("conv.weight") is None and scope_module("/Conv") is None


def keras_like_model():
    """The graph tf2onnx 1.17 writes for a Keras 3 (TF 2.21) CNN conv1 -> Dropout drop1 -> BatchNormalization
    bn1 -> ReLU -> conv2 -> bn2 -> ReLU -> pool -> Dense fc (names as written; checked by hand): the input
    is NHWC, each BN is folded into the Conv before it, which takes the BN's name, the Dropout is gone."""
    g = GraphBuilder()
    t = g.node("Transpose", ["x"], "functional_1/bn1_1/batchnorm/mul_1__6", outputs=["t:0"], perm=[0, 3, 1, 2])
    w1 = g.init("functional_1/conv1_1/convolution/merged_input:0", g.rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    h = g.node("Conv", [t, w1], "functional_1/bn1_1/batchnorm/mul_1", outputs=["functional_1/bn1_1/batchnorm/mul_1:0"],
               pads=[1, 1, 1, 1])
    h = g.node("Relu", [h], "functional_1/relu1_1/Relu", outputs=["functional_1/relu1_1/Relu:0"])
    w2 = g.init("functional_1/conv2_1/convolution/merged_input:0", g.rng.standard_normal((4, 4, 3, 3)).astype(np.float32))
    h = g.node("Conv", [h, w2], "functional_1/bn2_1/batchnorm/mul_1", outputs=["functional_1/bn2_1/batchnorm/mul_1:0"],
               pads=[1, 1, 1, 1])
    h = g.node("Relu", [h], "functional_1/relu2_1/Relu", outputs=["functional_1/relu2_1/Relu:0"])
    h = g.node("Flatten", [g.node("GlobalAveragePool", [h], "functional_1/pool_1/Mean")], "flat")
    return g.build(g.gemm(h, 4, 5, name="functional_1/fc_1/MatMul"), input_shape=("N", 8, 8, 3))


def test_keras_bn_folded_into_a_renamed_conv_is_found_by_its_bias():
    """With non-zero BN statistics tf2onnx renames the fused conv 'Conv__14' and gives it the BN's folded bias
    'functional_1/bn1_1/batchnorm/sub:0' (checked by hand, same versions)."""
    model = keras_like_model()
    conv = next(n for n in model.graph.node if n.name == "functional_1/bn1_1/batchnorm/mul_1")
    conv.name = "Conv__14"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(4, np.float32),
                                                                "functional_1/bn1_1/batchnorm/sub:0"))
    conv.input.append("functional_1/bn1_1/batchnorm/sub:0")
    assert resolve_sites(model, {"bn1": 0.5}) == {"functional_1/bn1_1/batchnorm/mul_1:0": 0.5}


def test_keras_layer_names_through_tf2onnx(tmp_path):
    model = keras_like_model()
    assert resolve_sites(model, {"bn1": 0.5}) == {"functional_1/bn1_1/batchnorm/mul_1:0": 0.5}  # inside the fold
    assert resolve_sites(model, {"bn1_1": 0.5}) == resolve_sites(model, {"bn1": 0.5})
    assert resolve_sites(model, {"conv2": 0.5}) == {"functional_1/relu1_1/Relu:0": 0.5}  # the conv's input
    with pytest.raises(VsonnxError, match="Keras layer") as info:
        resolve_sites(model, {"drop1": 0.5})
    assert "name the layer it fed" in info.value.hint
    path = save(model, tmp_path / "k.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((64, 8, 8, 3)).astype(np.float32))
    r = CliRunner().invoke(main, ["fix", path, "--calib", str(tmp_path / "x.npy"), "--dropout", "bn1=0.5", "-o",
                                  str(tmp_path / "f.onnx"), "--json"])
    report = __import__("json").loads(r.output[r.output.index("{"):])
    assert r.exit_code == 0 and report["folded"] == ["functional_1/bn1_1/batchnorm/mul_1",
                                                     "functional_1/bn2_1/batchnorm/mul_1"]


@pytest.fixture(scope="module")
def drop_path_export(tmp_path_factory):
    """PreResNet-8 with stochastic depth (a 'drop_path' module per block, the identity in eval mode, so a
    stock TorchScript export erases it; BN kept with do_constant_folding=False)."""
    from vsonnx.nets import DropoutConfig, build

    folder = tmp_path_factory.mktemp("drop_path")
    torch.manual_seed(0)
    net = build("preresnet", 8, 10, DropoutConfig("depth", 0.2)).eval()
    x = torch.randn(16, 3, 8, 8)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x[:2],), str(folder / "stock.onnx"), dynamo=False, input_names=["input"],
                          dynamic_axes={"input": {0: "n"}}, do_constant_folding=False)
    np.save(folder / "x.npy", x.numpy())
    return folder


def test_a_drop_path_module_names_its_blocks_residual_branch(drop_path_export):
    model = load_model(drop_path_export / "stock.onnx")
    assert not [n for n in model.graph.node if n.op_type == "Dropout"]
    sites = resolve_sites(model, {"blocks.*.drop_path": 0.2})
    adds = {n.name: n for n in model.graph.node if n.op_type == "Add"}
    branch = {adds[f"/blocks/blocks.{k}/Add"].input[0] for k in range(3)}  # conv2's output, not the shortcut
    assert set(sites) == branch and sites.per_sample == frozenset(branch) and set(sites.values()) == {0.2}
    with pytest.raises(VsonnxError, match="neither a tensor"):
        resolve_sites(model, {"blocks.*.drop_a": 0.2})  # an element-wise dropout name is not a drop path


def test_a_drop_path_site_drops_whole_samples(drop_path_export):
    """In training mode the inserted noise scales each sample's branch by 0 or 1/(1-p), the form
    vsonnx.export writes for stochastic depth (so the site finder sees the BNs after it as sites)."""
    from vsonnx.runtime import make_session
    from vsonnx.sites import find_sites

    model = load_model(drop_path_export / "stock.onnx")
    sites = resolve_sites(model, {"blocks.0.drop_path": 0.5})
    (branch,) = sites
    simulated = insert_dropouts(model, sites, training=True)
    probe = onnx.ModelProto()
    probe.CopyFrom(simulated)
    probe.graph.output.extend([onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                               for t in (branch, f"{branch}__vsonnx_drop_path")])
    x = np.load(drop_path_export / "x.npy")
    got, scaled = make_session(probe, device="cpu", optimize=False).run([branch, f"{branch}__vsonnx_drop_path"],
                                                                         {"input": x})
    factor = (scaled.reshape(16, -1) / got.reshape(16, -1))
    assert np.allclose(factor, factor[:, :1]) and set(np.round(factor[:, 0], 4)) <= {0.0, 2.0}
    assert 0 < (factor[:, 0] == 0).sum() < 16  # some samples dropped, not all
    report = find_sites(insert_dropouts(model, sites, training=False))
    assert [d.per_sample for d in report.dropouts] == [True] and report.sites
