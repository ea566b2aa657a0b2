"""Model families. Each registers itself by name in `raygen.models.registry`."""
from raygen.models.base import DataInfo, Generator
from raygen.models.registry import Family, build_model, family_names, get_family, register_family

__all__ = ["DataInfo", "Family", "Generator", "build_model", "family_names", "get_family", "register_family"]
