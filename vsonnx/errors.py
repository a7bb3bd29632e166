"""User errors and warnings: one exception type carrying what failed and what to do about it, one channel
for warnings.

The CLI prints ``Error: <message>`` and ``Hint: <hint>`` and exits with code 3. Any other exception is a
bug in vsonnx and keeps its traceback.

Warnings: library code calls ``warn(message)`` (a ``VsonnxWarning``, Python's warnings machinery). An entry
point that returns a report collects the warnings raised during its call into ``report.warnings``
(``collected_warnings``); the CLI renders them, and any warning outside a report, as one line each.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager


class VsonnxError(Exception):
    """A problem with the user's input (file, model, data, options), not a bug in vsonnx."""

    exit_code = 3

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


# The hint of every refusal of the data-free synthesis (vsonnx.methods.synthesized, vsonnx.torch_graph).
SYNTHESIS_HINT = "use --synthetic 0 (closed-form correction of the sites only) or --calib DATA."


class VsonnxWarning(UserWarning):
    """Something the user should know that does not stop the work (an ignored option, a guess made)."""


def warn(message: str) -> None:
    warnings.warn(message, VsonnxWarning, stacklevel=2)


@contextmanager
def collected_warnings():
    """Collect the VsonnxWarnings raised in the block into the yielded list (filled when the block ends);
    other warnings are shown as usual."""
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", VsonnxWarning)
        yield messages
    for w in caught:
        if issubclass(w.category, VsonnxWarning):
            messages.append(str(w.message))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
