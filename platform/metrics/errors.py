"""One error type for metric set-up problems a user can fix (missing weights,
mismatched settings); the CLI prints its message as is."""
from __future__ import annotations


class MetricsError(ValueError):
    """A metrics problem; the message names the setting and the fix."""
