"""One channel for warnings: the library warns, entry points collect into their reports, the CLI prints
one line each; user errors carry a hint."""
import warnings

from vsonnx.errors import VsonnxError, VsonnxWarning, collected_warnings, warn

from conftest import run



def test_collected_warnings_keep_vsonnx_ones_and_pass_others_on():
    with warnings.catch_warnings(record=True) as outer:
        warnings.simplefilter("always")
        with collected_warnings() as caught:
            warn("from vsonnx")
            warnings.warn("from elsewhere", DeprecationWarning)
    assert caught == ["from vsonnx"]
    assert [str(w.message) for w in outer] == ["from elsewhere"]
    assert issubclass(VsonnxWarning, UserWarning)


def test_user_error_message_and_hint():
    e = VsonnxError("the thing failed.", "do this.")
    assert e.exit_code == 3 and str(e) == "the thing failed. (hint: do this.)"


def test_cli_prints_fix_warnings_once_as_one_line_each(setup):
    tmp, model = setup
    r = run("fix", model, "--calib", tmp / "calib.npz", "--synthetic", "3", "--batch-size", 8)
    lines = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert lines == ["warning: --synthetic/--synthetic-steps are ignored without --data-free."]
