"""One registry of model families, keyed by name.

Families arrive through the `raygen.families` entry-point group, the
built-ins too (see pyproject.toml), so a third-party package adds a family
by declaring an entry point that names its `Family` object:

    [project.entry-points."raygen.families"]
    my_family = "my_package.family:FAMILY"

`train`, `tune`, `sample`, `eval` and `serve` all look families up here.
`register_family` also works directly (a notebook, a test, `--import FILE`).
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from importlib.metadata import entry_points
from typing import Callable, Mapping

from pydantic import BaseModel
from torch import nn

from raygen.models.base import DataInfo, Generator
from raygen.models.capabilities import Capability, CapabilityError, check_implements, parse_capabilities
from raygen.models.conditions import CONDITION_KINDS
from raygen.models.sampling import SamplingParams

ENTRY_POINT_GROUP = "raygen.families"

_FAMILIES: dict[str, "Family"] = {}
_FROM_ENTRY_POINTS: set[str] = set()
_entry_points_loaded = False


@dataclass(frozen=True, kw_only=True)
class Family:
    """A family's registry entry: everything the platform may know about it.

    build(config, data_info, components) returns the model; `components` maps
    the names in `components` below to frozen models trained by earlier runs
    (empty when the spec gives none)."""
    name: str
    config_cls: type[BaseModel]
    build: Callable[..., Generator]
    capabilities: frozenset[Capability]
    sampling_params: type[SamplingParams] = SamplingParams
    conditions: tuple[str, ...] = ("none",)
    components: Mapping[str, Capability] = field(default_factory=dict)
    description: str = ""
    #: tiny flavors for tests and smoke runs: name -> (config, DataInfo); the
    #: conformance suite (tests/families/) runs every one of them
    debug: Callable[[], dict[str, tuple[BaseModel, DataInfo]]] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "capabilities", parse_capabilities(self.capabilities))
        unknown = [c for c in self.conditions if c not in CONDITION_KINDS]
        if unknown:
            raise ValueError(f"family {self.name!r}: unknown condition kinds {unknown}; "
                             f"registered: {', '.join(sorted(CONDITION_KINDS))}")
        if not issubclass(self.sampling_params, SamplingParams):
            raise TypeError(f"family {self.name!r}: sampling_params must subclass raygen.models.SamplingParams")
        if Capability.SAMPLE not in self.capabilities and self.sampling_params.model_fields:
            raise ValueError(f"family {self.name!r} declares sampling parameters but not the 'sample' capability")


def register_family(family: Family) -> Family:
    existing = _FAMILIES.get(family.name)
    if existing is not None and existing is not family and existing.build is not family.build:
        raise ValueError(f"model family '{family.name}' is registered twice")
    _FAMILIES[family.name] = family
    return family


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as err:
            raise ImportError(f"model family plugin {ep.name!r} ({ep.value}) failed to load: "
                              f"{type(err).__name__}: {err}") from err
        _FROM_ENTRY_POINTS.add(ep.name)
        if isinstance(obj, Family):
            register_family(obj)
        elif ep.name not in _FAMILIES:  # a module whose import registers the family is fine too
            raise TypeError(f"entry point {ep.name!r} = {ep.value!r} in group {ENTRY_POINT_GROUP!r} must name a "
                            "raygen.models.Family (or a module that registers one under that name)")


def family_names() -> list[str]:
    _load_entry_points()
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    _load_entry_points()
    if name not in _FAMILIES:
        hint = "" if _FAMILIES else " (no family is registered at all: is raygen installed? pip install -e .)"
        raise KeyError(f"unknown model family '{name}'; registered: {', '.join(sorted(_FAMILIES))}{hint}")
    return _FAMILIES[name]


def families_with(capability: Capability | str) -> list[str]:
    cap = Capability(capability)
    return [n for n in family_names() if cap in _FAMILIES[n].capabilities]


def family_source(name: str) -> str | None:
    """The file of the module that registered `name`, when it came from no entry
    point (a notebook, a test, a local module): other processes (Ray workers)
    import it before they look the family up. None for installed families."""
    _load_entry_points()
    if name in _FROM_ENTRY_POINTS:
        return None
    module = sys.modules.get(getattr(get_family(name).build, "__module__", ""), None)
    return getattr(module, "__file__", None)


def import_family_sources(paths: list[str]) -> None:
    """Import modules (by file) that register families, once per process."""
    for path in paths:
        name = Path(path).stem
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import the model family module {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise


def build_model(family: str, config: BaseModel | dict, data_info: DataInfo,
                components: Mapping[str, Generator] | None = None) -> Generator:
    """Build a family's model and check it against what the family declares."""
    fam = get_family(family)
    if not isinstance(config, BaseModel):
        config = fam.config_cls.model_validate(config)
    components = dict(components or {})
    unknown = sorted(set(components) - set(fam.components))
    if unknown:
        accepted = f"it takes {', '.join(sorted(fam.components))}" if fam.components else "it takes none"
        raise ValueError(f"model.components: family {family!r} has no component {unknown[0]!r}; {accepted}")
    for name, component in components.items():
        needed = fam.components[name]
        if needed not in getattr(component, "capabilities", frozenset()):
            raise CapabilityError(f"model.components.{name}: a {getattr(component, 'family', '?')} model cannot "
                                  f"serve as {name!r}: family {family!r} needs capability '{needed}'")
    model = fam.build(config, data_info, components)
    model.family = fam.name
    model.capabilities = fam.capabilities
    model.sampling_params = fam.sampling_params
    if model.condition_kind not in fam.conditions:
        raise CapabilityError(f"family {family!r} built a model conditioned on {model.condition_kind!r}, which its "
                              f"registry entry does not declare (conditions: {', '.join(fam.conditions)})")
    check_implements(model, fam.name, fam.capabilities)
    attached = getattr(model, "components", None)
    if set(attached.keys() if isinstance(attached, nn.ModuleDict) else ()) != set(components):
        raise ValueError(f"family {family!r} was given components {sorted(components)} but did not attach them "
                         "(call self.attach_components(components) in the model's constructor)")
    return model
