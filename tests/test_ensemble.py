"""The dropout ensemble (vsonnx.ensemble): what is compared, the loss against numpy, the ensemble against
PyTorch's own Dropout."""
import numpy as np
import pytest
import torch

import vsonnx
from vsonnx.data import ArraySource
from vsonnx.ensemble import DropoutEnsemble, divergence, ensemble_top1, scores_tensor, softmax
from vsonnx.errors import VsonnxError
from vsonnx.model import load_model

from conftest import GraphBuilder, cnn_with_sites
from nets_small import trained_like


def test_scores_are_the_logits_before_a_final_softmax():
    g = GraphBuilder()
    h = g.node("Flatten", [g.node("GlobalAveragePool", [g.bn("x", 3, "bn")])])
    logits = g.gemm(h, 3, 4, "fc")
    model = g.build(g.node("Softmax", [logits], axis=1))
    assert scores_tensor(model).tensor == "fc_out" and scores_tensor(model).loss == "kl"
    assert scores_tensor(cnn_with_sites()).tensor == cnn_with_sites().graph.output[0].name


def test_outputs_that_are_not_class_scores_need_output_and_loss():
    g = GraphBuilder()
    model = g.build(g.conv(g.bn(g.dropout("x", 0.5, "d"), 3, "bn"), 3, 2, name="seg"))  # [N, 2, 8, 8]
    with pytest.raises(VsonnxError, match="not class scores"):
        scores_tensor(model)
    with pytest.raises(VsonnxError, match="not an output"):
        scores_tensor(model, output="nope", loss="kl")
    with pytest.raises(VsonnxError, match="unknown loss"):
        scores_tensor(model, output="seg_out", loss="l1")
    assert scores_tensor(model, output="seg_out", loss="mse") == scores_tensor(model, "seg_out", "mse")


def test_divergence_equals_numpy_kl_mse_and_disagreement():
    rng = np.random.default_rng(0)
    p = softmax(rng.standard_normal((6, 5)))
    s = rng.standard_normal((6, 5))
    q = np.exp(s) / np.exp(s).sum(1, keepdims=True)
    np.testing.assert_allclose(divergence(p, s, "kl"), (p * np.log(p / q)).sum(1), rtol=1e-12)
    assert (divergence(p, np.log(p), "kl") < 1e-12).all()  # zero against itself
    np.testing.assert_allclose(divergence(p, s, "mse"), ((p - s) ** 2).mean(1))
    seg_p, seg_s = softmax(rng.standard_normal((2, 3, 4, 4))), rng.standard_normal((2, 3, 4, 4))
    per_pixel = [divergence(seg_p[:, :, i, j], seg_s[:, :, i, j], "kl") for i in range(4) for j in range(4)]
    np.testing.assert_allclose(divergence(seg_p, seg_s, "kl"), np.mean(per_pixel, axis=0), rtol=1e-12)
    differs = [[float(np.argmax(p[n]) != np.argmax(s[n]))] for n in range(6)]  # one loop per sample
    np.testing.assert_array_equal(divergence(p, s, "disagree"), np.ravel(differs))
    assert divergence(p, np.log(p), "disagree").sum() == 0
    pixels = [[np.argmax(seg_p[n, :, i, j]) != np.argmax(seg_s[n, :, i, j]) for i in range(4) for j in range(4)]
              for n in range(2)]
    np.testing.assert_allclose(divergence(seg_p, seg_s, "disagree"), np.mean(pixels, axis=1))


def test_ensemble_average_matches_pytorch_dropout_ensemble(tmp_path):
    """Averaged over many masks, onnxruntime's simulated ensemble (element- and channel-wise dropouts) and
    PyTorch's (Dropout modules in train mode, BN in eval) give the same mean probabilities, and the ensemble's
    top-1 counts PyTorch's ensemble classes as hits."""
    net = trained_like(seed=2)
    path = tmp_path / "net.onnx"
    vsonnx.export(net, torch.randn(2, 3, 8, 8), path, exporter="torchscript")
    model = load_model(path)
    x = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    ensemble_channelwise = frozenset(n.name for n in model.graph.node if n.op_type == "Dropout" and "drop_c" in n.name)
    ensemble = DropoutEnsemble(model, scores_tensor(model), channelwise=ensemble_channelwise, seed=3, device="cpu")
    ours = ensemble.target({"input": x}, masks=3000)
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d):
            m.train()
    torch.manual_seed(0)
    with torch.no_grad():
        theirs = np.mean([torch.softmax(net(torch.from_numpy(x)), 1).numpy() for _ in range(3000)], axis=0)
    np.testing.assert_allclose(ours, theirs, atol=0.01)  # Monte-Carlo error of 3,000 masks: ~0.003
    assert not np.allclose(ensemble.target({"input": x}), ensemble.target({"input": x}))  # fresh masks
    # ensemble_top1 scores PyTorch's ensemble classes as hits where PyTorch's top class leads by > 0.03
    # (the Monte-Carlo error of 2,000 masks is ~0.005)
    top2 = np.sort(theirs, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.03
    labels = theirs.argmax(1)[clear]
    assert clear.sum() >= 4
    for y, expected in ((labels, 100.0), ((labels + 1) % theirs.shape[1], 0.0)):
        source = ArraySource.from_arrays(model, x[clear], y, shuffle=False)
        assert ensemble_top1(model, source, 2000, channelwise=ensemble_channelwise, seed=3, batch_size=3) == expected
