"""tools/gpu_check.py: the cross-device comparison, run here between two CPU computation paths (one thread:
onnxruntime's training-mode BN; two: operators in the graph), and shown to fail where the statistics differ."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import cnn_with_sites, save

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import gpu_check  # noqa: E402


@pytest.fixture
def setup(tmp_path):
    model = save(cnn_with_sites(seed=3), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    for split, n in (("train", 192), ("test", 96)):
        (tmp_path / "data" / split).mkdir(parents=True)
        x = (rng.standard_normal((n, 3, 8, 8)) + 0.3).astype(np.float32)
        np.savez(tmp_path / "data" / split / "part.npz", x=x, y=rng.integers(0, 5, n))
    return tmp_path, model


def args_for(tmp, model, *extra):
    return ["--data", str(tmp / "data"), "--model", model, "--batch-size", "32", "--json", str(tmp / "r.json"),
            *extra]


def test_statistics_error_is_the_largest_norm_relative_difference():
    ref = {"a": (np.array([1.0, -2.0]), np.array([4.0, 1.0])), "b": (np.array([0.0, 0.5]), np.array([2.0, 2.0]))}
    ours = {"a": (np.array([1.0, -2.02]), np.array([4.0, 1.0])), "b": (np.array([0.001, 0.5]), np.array([2.0, 2.0]))}
    assert gpu_check.statistics_error(ours, ref) == pytest.approx(max(0.02 / 2.0, 0.001 / 0.5))
    assert gpu_check.statistics_error(ref, ref) == 0


def test_top1_must_match_the_reference_pair_on_every_device():
    top1 = {"original": {"cpu": 50.0, "cuda": 50.0}, "batch@cpu": {"cpu": 51.0, "cuda": 51.0},
            "batch@cuda": {"cpu": 51.0, "cuda": 51.0}}
    assert gpu_check.top1_agrees(top1, "cpu")
    for name, device in (("original", "cuda"), ("batch@cuda", "cpu"), ("batch@cpu", "cuda")):
        changed = {n: dict(by) for n, by in top1.items()}
        changed[name][device] += 0.01
        assert not gpu_check.top1_agrees(changed, "cpu"), (name, device)


def test_two_cpu_paths_agree(setup):
    tmp, model = setup
    assert gpu_check.main(args_for(tmp, model, "--devices", "cpu:1,cpu:2", "--calib-limit", "128")) == 0
    result = json.loads((tmp / "r.json").read_text())
    assert result["agree"] and [(r["method"], r["fixed_on"]) for r in result["fixes"]] == \
        [("batch", "cpu:1"), ("batch", "cpu:2"), ("population", "cpu:1"), ("population", "cpu:2")]
    assert all(r["stat_error"] < 1e-5 for r in result["fixes"])
    assert set(result["top1"]) == {"original", "batch@cpu:1", "batch@cpu:2", "population@cpu:1", "population@cpu:2"}


def test_statistics_beyond_rtol_fail(setup, monkeypatch):
    """A device whose fix writes variances 0.2% off is reported (exit 1), though top-1 may still agree."""
    import onnx

    from vsonnx.graph import GraphIndex
    from vsonnx.model import load_model
    from vsonnx.rewrite import with_statistics

    tmp, model = setup
    real = gpu_check.fix_calibrated

    def off_on_two_threads(model_path, calib, method, options):
        report = real(model_path, calib, method, options)
        if options.runtime.threads == 2:
            written = load_model(report.output)
            names = [n.name for n in written.graph.node if n.op_type == "BatchNormalization"]
            stats = GraphIndex(written).stored_statistics(names)
            for s in stats.values():
                s.var = s.var * 1.002
            onnx.save(with_statistics(written, stats), report.output)
        return report
    monkeypatch.setattr(gpu_check, "fix_calibrated", off_on_two_threads)
    assert gpu_check.main(args_for(tmp, model, "--devices", "cpu:1,cpu:2", "--methods", "batch")) == 1
    result = json.loads((tmp / "r.json").read_text())
    assert not result["statistics_agree"] and not result["agree"]
    assert result["fixes"][0]["stat_error"] == 0
    assert result["fixes"][1]["stat_error"] == pytest.approx(0.002, rel=0.01)


def test_missing_cuda_provider_is_a_user_error(setup, capsys):
    from vsonnx.runtime import cuda_works

    if cuda_works():
        pytest.skip("this machine runs the CUDA provider")
    tmp, model = setup
    assert gpu_check.main(args_for(tmp, model)) == 3
    assert "CUDA execution provider" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--methods", "distill"], ["--devices", "cpu,cpu"], ["--devices", "tpu"]])
def test_incomparable_requests_are_usage_errors(setup, extra):
    tmp, model = setup
    with pytest.raises(SystemExit) as e:
        gpu_check.main(args_for(tmp, model, *extra))
    assert e.value.code == 2
