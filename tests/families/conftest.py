"""Conformance suite: every registered family, every debug flavor it ships.

A family is done only when it passes. Flavors come from each family's
registry entry (`Family.debug`), so a plugin family is checked too."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import engine_toys  # noqa: F401  (test-only families registered from local modules join the suite too)
import pipeline_toys  # noqa: F401
from raygen.models import DataInfo, family_names, get_family


@dataclass
class Flavor:
    family: Any
    name: str
    config: Any
    info: DataInfo
    components: dict = field(default_factory=dict)  # frozen models the flavor is built with

    def __iter__(self):  # fam, name, config, info = flavor
        return iter((self.family, self.name, self.config, self.info))


def flavors() -> list[tuple[str, str]]:
    out = []
    for name in family_names():
        fam = get_family(name)
        if fam.debug is None:
            out.append((name, "<none>"))
            continue
        out += [(name, flavor) for flavor in fam.debug()]
    return out


def synthetic_batch(info: DataInfo, n: int = 4, seed: int = 0) -> dict:
    """A batch shaped like the data pipeline's, for the flavor's DataInfo."""
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.rand(n, info.channels, info.height, info.width, generator=g)}
    if info.num_classes:
        batch["label"] = torch.randint(info.num_classes, (n,), generator=g)
    if info.has_captions:
        words = ["red", "blue", "circle", "square", "big", "small"]
        batch["caption"] = [" ".join(words[(i + k) % len(words)] for k in range(3)) for i in range(n)]
    for name, col in info.condition_columns.items():
        if col["kind"] == "sequence":
            batch[name] = torch.rand(n, col["max_len"], col["width"], generator=g)
            batch[f"{name}_mask"] = torch.arange(col["max_len"])[None, :] < torch.randint(1, col["max_len"] + 1, (n, 1), generator=g)
        elif col["kind"] == "vector":
            batch[name] = torch.rand(n, col["width"], generator=g)
    return batch


@pytest.fixture(params=flavors(), ids=lambda p: f"{p[0]}:{p[1]}")
def flavor(request):
    name, flavor_name = request.param
    fam = get_family(name)
    if fam.debug is None:
        pytest.fail(f"family {name!r} ships no debug flavor (Family.debug): the conformance suite cannot check it")
    config, info, *rest = fam.debug()[flavor_name]
    return Flavor(fam, flavor_name, config, info, rest[0] if rest else {})
