"""What a model family can do, declared once and checked when a model is built.

A family lists its capabilities in its registry entry; `build_model` checks
that the built module really has the methods each capability promises (the
typed protocols below), so a missing method fails at build time, not in the
middle of a command. Commands and the server ask `require(model, ...)`; they
never probe with getattr/hasattr. Asking a model for what it lacks is a
one-line `CapabilityError` naming the model, the capability and the families
that have it.
"""
from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import torch

if TYPE_CHECKING:
    from raygen.models.conditions import Conditions
    from raygen.models.sampling import SamplingParams


class Capability(str, Enum):
    TRAIN = "train"              # training_step(batch) -> {"loss", ...}: fitted by gradient descent
    FIT = "fit"                  # fit_statistics(batch) / apply_fit(stats): fitted without gradients
    SAMPLE = "sample"            # sample(conditions, params, generators) -> images
    ENCODE = "encode"            # encode(images) -> latents, decode(latents) -> images (an autoencoder)
    RECONSTRUCT = "reconstruct"  # reconstruct(images) -> images
    RENDER = "render"            # render(conditions, params, generators, height, width) -> images at any size
    SCORE = "score"              # score(images, texts) -> image-text similarity

    def __str__(self) -> str:
        return self.value


#: what each capability lets a user do, for error messages ("cannot <verb>")
VERBS = {
    Capability.TRAIN: "train by gradient descent",
    Capability.FIT: "be fitted without gradients",
    Capability.SAMPLE: "sample images",
    Capability.ENCODE: "encode and decode images",
    Capability.RECONSTRUCT: "reconstruct images",
    Capability.RENDER: "render at a requested size",
    Capability.SCORE: "score image-text pairs",
}


@runtime_checkable
class Trainable(Protocol):
    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class Fittable(Protocol):
    """Fitted without gradients (a codebook, k-means): each worker computes
    additive statistics of its batch; the engine sums them over workers and
    hands the total to `apply_fit`, which updates the model's state."""
    def fit_statistics(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]: ...
    def apply_fit(self, stats: dict[str, torch.Tensor], step: int) -> dict[str, float]: ...


@runtime_checkable
class Sampler(Protocol):
    def sample(self, conditions: "Conditions", params: "SamplingParams",
               generators: Sequence[torch.Generator]) -> torch.Tensor: ...


@runtime_checkable
class Autoencoder(Protocol):
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Reconstructor(Protocol):
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Renderer(Protocol):
    def render(self, conditions: "Conditions", params: "SamplingParams", generators: Sequence[torch.Generator],
               height: int, width: int) -> torch.Tensor: ...


@runtime_checkable
class Scorer(Protocol):
    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor: ...


PROTOCOLS: dict[Capability, type] = {
    Capability.TRAIN: Trainable,
    Capability.FIT: Fittable,
    Capability.SAMPLE: Sampler,
    Capability.ENCODE: Autoencoder,
    Capability.RECONSTRUCT: Reconstructor,
    Capability.RENDER: Renderer,
    Capability.SCORE: Scorer,
}


class CapabilityError(TypeError):
    """A model was asked for something its family does not declare."""


def parse_capabilities(names) -> frozenset[Capability]:
    out = set()
    for name in names:
        try:
            out.add(Capability(name))
        except ValueError:
            raise ValueError(f"unknown capability {name!r}; choose from: "
                             f"{', '.join(c.value for c in Capability)}") from None
    return frozenset(out)


def check_implements(model: Any, family: str, capabilities: frozenset[Capability]) -> None:
    """Fail at build time when a declared capability's methods are missing."""
    for cap in sorted(capabilities, key=lambda c: c.value):
        protocol = PROTOCOLS[cap]
        missing = [name for name in _methods(protocol) if not callable(getattr(model, name, None))]
        if missing:
            raise CapabilityError(f"model family {family!r} declares capability '{cap}' but its model "
                                  f"{type(model).__name__} has no {', '.join(missing)}()")
    if not capabilities & {Capability.TRAIN, Capability.FIT}:
        raise CapabilityError(f"model family {family!r} must declare 'train' or 'fit': otherwise nothing can make it")


def _methods(protocol: type) -> list[str]:
    return [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]


def has(model: Any, capability: Capability | str) -> bool:
    return Capability(capability) in getattr(model, "capabilities", frozenset())


def require(model: Any, capability: Capability | str) -> None:
    """Raise a one-line CapabilityError unless `model` declares `capability`."""
    cap = Capability(capability)
    if has(model, cap):
        return
    from raygen.models.registry import families_with
    family = getattr(model, "family", None) or type(model).__name__
    others = families_with(cap)
    where = f"families that can: {', '.join(others)}" if others else "no registered family can"
    raise CapabilityError(f"model {getattr(model, 'model_name', None) or family!r} (family {family}) cannot "
                          f"{VERBS[cap]}: it lacks capability '{cap}'; {where}")
