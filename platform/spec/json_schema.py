"""The JSON schema of job specs for editors: `model` is a union over the
registered families, selected by `model.family`, so every family's options
are completed and validated in an editor (VS Code's YAML extension, ...)."""
from __future__ import annotations

from typing import Any

from raygen.models.registry import family_names, get_family
from raygen.spec.schema import JobSpec

DEFAULT_FAMILY = JobSpec.model_fields["model"].default_factory().family


def job_spec_json_schema() -> dict[str, Any]:
    schema = JobSpec.model_json_schema(ref_template="#/$defs/{model}")
    defs = schema.setdefault("$defs", {})
    variants = []
    for name in family_names():
        family = get_family(name)
        options = family.config_cls.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(options.pop("$defs", {}))  # nested configs (e.g. TextEncoderConfig), shared by name
        key = f"{name}_options"
        defs[key] = options
        components = {"type": "object", "additionalProperties": False,
                      "description": "frozen models trained by earlier runs (run folder, export folder or models:/ URI)",
                      "properties": {c: {"type": "string", "description": f"a model that can {cap.value}"}
                                     for c, cap in family.components.items()}}
        variants.append({
            "type": "object",
            "title": f"model family {name}",
            "description": family.description,
            "additionalProperties": False,
            "properties": {"family": {"const": name}, "options": {"$ref": f"#/$defs/{key}"},
                           "components": components},
            # the default family may be left out
            "required": [] if name == DEFAULT_FAMILY else ["family"],
        })
    defs["ModelSpec"] = {"title": "ModelSpec", "description": "the model family and its options",
                         "oneOf": variants}
    return schema
