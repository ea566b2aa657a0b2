"""The one error type for data problems a user can cause or fix."""
from __future__ import annotations


class DataError(ValueError):
    """A data problem stated in one line: what is wrong, where, and the fix.

    The CLI prints it as `raygen data: error: <message>` and exits 2; the
    trainer stops on it before any worker starts.
    """

    def __init__(self, message: str):
        # One line: a multi-line message would break the CLI's one-line contract.
        super().__init__(" ".join(str(message).split()))
