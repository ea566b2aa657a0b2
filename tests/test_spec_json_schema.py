"""`raygen spec schema`: model is a union over the registered families keyed
by model.family, so an editor completes and checks every family's options."""
from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from raygen.jobs.cli import main
from raygen.models import family_names
from raygen.spec.json_schema import job_spec_json_schema


def test_every_shipped_spec_validates_and_family_options_are_checked(capfd):
    assert main(["spec", "schema"]) == 0
    schema = json.loads(capfd.readouterr().out)
    assert schema == job_spec_json_schema()
    variants = schema["$defs"]["ModelSpec"]["oneOf"]
    assert {v["properties"]["family"]["const"] for v in variants} == set(family_names())
    jsonschema.validate(yaml.safe_load(open("jobs/specs/quickstart.yaml")), schema)
    jsonschema.validate({"model": {"family": "clip", "options": {"embed_dim": 16}}}, schema)
    for bad in ({"model": {"family": "seqimg", "options": {"backbone": "nope"}}},          # not one of the enum
                {"model": {"family": "clip", "options": {"backbone": "gpt2"}}},           # another family's key
                {"model": {"family": "nosuch"}},
                {"model": {"family": "seqimg", "components": {"vae": "runs/x"}}}):        # seqimg takes none
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
