"""User errors: one exception type carrying what failed and what to do about it.

The CLI prints ``Error: <message>`` and ``Hint: <hint>`` and exits with code 3. Any other exception is a
bug in vsonnx and keeps its traceback.
"""
from __future__ import annotations


class VsonnxError(Exception):
    """A problem with the user's input (file, model, data, options), not a bug in vsonnx."""

    exit_code = 3

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"
