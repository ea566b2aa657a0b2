"""Model families and the protocol they share (see docs/families.md)."""
from raygen.models.base import DataInfo, Generator
from raygen.models.capabilities import Capability, CapabilityError, has, require
from raygen.models.conditions import ConditionError, ConditionKind, Conditions, register_condition_kind
from raygen.models.registry import Family, build_model, families_with, family_names, get_family, register_family
from raygen.models.sampling import SamplingParams, SamplingParamsError, make_generators, parse_params

__all__ = [
    "Capability", "CapabilityError", "ConditionError", "ConditionKind", "Conditions", "DataInfo", "Family",
    "Generator", "SamplingParams", "SamplingParamsError", "build_model", "families_with", "family_names",
    "get_family", "has", "make_generators", "parse_params", "register_condition_kind", "register_family", "require",
]
