"""Text rendering of reports: tables, refusals, candidates, what fix would do per BN."""
from vsonnx.measure import scan
from vsonnx.fix_report import FixReport
from vsonnx.report import render_fix, render_scan, table

from conftest import cnn_with_sites


def test_table_aligns_columns():
    text = table(["name", "n"], [["a", 1], ["long name", 22]], "lr")
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1 and lines[-1].endswith("22")


def test_fix_report_lists_refusals_candidates_and_what_was_written():
    report = FixReport("m.onnx", "relative", 32, "m.fixed.onnx", True, "re-estimated 1 BatchNormalization layer(s).",
                       batchnorms=[{"name": "bn", "site": "direct", "old_mean": [0.0], "old_var": [2.0],
                                    "new_mean": [0.0], "new_var": [1.0]}],
                       refused={"bn2": "2: BatchNormalization is in training mode"},
                       candidates=[{"name": "original", "val_top1": 50.0, "val_ensemble": None},
                                   {"name": "relative", "val_top1": 75.0, "val_ensemble": None}],
                       chosen="relative", seconds=1.25, criterion="top1")
    text = render_fix(report)
    assert "refused bn2: 2: BatchNormalization is in training mode" in text
    assert "chosen: relative" in text and "Wrote m.fixed.onnx (relative, 1.25 s)" in text
    assert "0.500" in text and "75.00" in text  # new/old variance, the winner's top-1
    report.criterion = "ensemble_disagreement"
    report.candidates = [{"name": "original", "val_top1": None, "val_ensemble": 0.0123},
                         {"name": "relative", "val_top1": None, "val_ensemble": 0.01}]
    text = render_fix(report)
    assert "disagreeing with the dropout ensemble's classes" in text and "0.01230" in text
    report.criterion = "ensemble_mse"
    assert "distance from the dropout ensemble" in render_fix(report)


def test_scan_shows_what_fix_would_do():
    text = render_scan(scan(cnn_with_sites()))
    assert "fix would" in text and text.count("recalibrate") == 2
