"""Frozen components of a model (`model.components`), resolved on the driver.

A component is a model trained by an earlier run (a VAE for latent diffusion,
an autoencoder for a cascade). The driver turns each URI (run folder, export
folder, `models:/NAME/VERSION`, `models:/NAME@ALIAS`) into a local export
folder once, before anything starts, so a bad URI fails in a second and every
worker loads the same files. The model holds them frozen: out of the
optimizer, and exported in their own folders beside its weights.
"""
from __future__ import annotations

from raygen.exports import load_exported, locate_export
from raygen.models import Generator
from raygen.models.errors import ModelLoadError
from raygen.spec.errors import SpecError
from raygen.spec.schema import JobSpec


def resolve_components(spec: JobSpec, tracking_uri: str | None) -> JobSpec:
    """The spec with each component URI replaced by its local export folder."""
    if not spec.model.components:
        return spec
    resolved = {}
    for name, uri in spec.model.components.items():
        try:
            resolved[name] = str(locate_export(uri, tracking_uri).resolve())
        except ModelLoadError as err:
            raise SpecError([f"model.components.{name}: {err}"]) from None
    model = spec.model.model_copy(update={"components": resolved})
    model._config = spec.model.config
    return spec.model_copy(update={"model": model})


def load_components(spec: JobSpec) -> dict[str, Generator]:
    """Each resolved component, loaded once per process."""
    return {name: load_exported(path).model for name, path in spec.model.components.items()}
