"""Errors about models that every layer may raise (no imports of its own)."""


class ModelLoadError(RuntimeError):
    """An export, run folder or model URI that cannot be loaded; the message says what to pass instead."""
