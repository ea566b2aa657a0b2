"""One registry of model families, keyed by name."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel

from raygen.models.base import DataInfo, Generator

# Built-in families are imported on first use, so the registry stays cheap to import.
_BUILTIN_MODULES = ("raygen.models.seqimg", "raygen.models.clip")
_FAMILIES: dict[str, "Family"] = {}
_loaded = False


@dataclass(frozen=True, kw_only=True)
class Family:
    name: str
    config_cls: type[BaseModel]
    build: Callable[[BaseModel, DataInfo], Generator]
    description: str = ""


def register_family(family: Family) -> Family:
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"model family '{family.name}' is registered twice")
    _FAMILIES[family.name] = family
    return family


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:
                if err.name != module:  # a real missing dependency, not an unbuilt family
                    raise


def family_names() -> list[str]:
    _load_builtins()
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    _load_builtins()
    if name not in _FAMILIES:
        raise KeyError(f"unknown model family '{name}'; registered: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def build_model(family: str, config: BaseModel | dict, data_info: DataInfo) -> Generator:
    fam = get_family(family)
    if not isinstance(config, BaseModel):
        config = fam.config_cls.model_validate(config)
    return fam.build(config, data_info)
