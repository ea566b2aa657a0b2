"""Job spec: typed sections, YAML paths in errors, dotted overrides, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raygen.jobs.cli import main
from raygen.spec import SpecError, apply_overrides, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]
import engine_toys  # noqa: E402,F401  (registers the 'toy' family)


def errors_of(raw) -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    return err.value.problems


def test_defaults_and_sections():
    spec = parse_spec({})
    assert spec.scale.strategy == "deepspeed" and spec.scale.zero_stage == 2 and spec.scale.workers == 2
    assert spec.serve.host == "127.0.0.1"
    assert spec.model.family == "seqimg"


def test_unknown_key_names_its_path():
    assert errors_of({"train": {"optimizer": {"lrr": 0.1}}}) == [
        "train.optimizer.lrr: unknown key 'lrr'; remove it or check the spelling"]


def test_bad_value_names_path_value_and_accepted():
    (line,) = errors_of({"scale": {"strategy": "horovod"}})
    assert line.startswith("scale.strategy: ") and "'ddp'" in line and "'deepspeed'" in line and "'horovod'" in line


def test_wrong_type_and_range():
    lines = errors_of({"train": {"steps": "many", "optimizer": {"lr": -1}}})
    assert any(l.startswith("train.steps:") and "'many'" in l for l in lines)
    assert any(l.startswith("train.optimizer.lr:") and "greater than 0" in l for l in lines)


def test_unknown_family_lists_registered():
    (line,) = errors_of({"model": {"family": "gan"}})
    assert line.startswith("model.family: unknown model family 'gan'") and "seqimg" in line


def test_family_options_are_validated_with_their_path():
    (line,) = errors_of({"model": {"family": "toy", "options": {"hiden": 3}}})
    assert line == "model.options.hiden: unknown key 'hiden'; remove it or check the spelling"


def test_cross_field_rule():
    (line,) = errors_of({"scale": {"strategy": "deepspeed", "zero_stage": 2, "offload_params": True}})
    assert line.startswith("scale: offload_params needs zero_stage 3")


def test_tune_space_checked():
    (line,) = errors_of({"tune": {"space": {"train.optimizer.lr": {"loguniform": [0, 1]}}}})
    assert "positive low bound" in line
    (line,) = errors_of({"tune": {"space": {"lr": {"choice": [1]}}}})
    assert "dotted spec path" in line


def test_overrides_parse_yaml_scalars():
    raw = apply_overrides({}, ["train.optimizer.lr=1e-3", "scale.workers=1", "train.ema.enabled=false",
                               "model.options.hidden=4", "model.family=toy"])
    spec = parse_spec(raw)
    assert spec.train.optimizer.lr == 1e-3 and spec.scale.workers == 1 and spec.train.ema.enabled is False
    assert spec.model.config.hidden == 4
    with pytest.raises(SpecError, match="key.path=value"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(SpecError, match="is a value, not a section"):
        apply_overrides({"train": {"steps": 3}}, ["train.steps.x=1"])


def test_example_specs_validate():
    specs = sorted((REPO / "jobs" / "specs").glob("*.yaml"))
    assert specs
    from raygen.spec.loader import read_spec_file
    from raygen.spec.pipeline import is_pipeline, load_pipeline, validate_pipeline
    for path in specs:
        if is_pipeline(read_spec_file(path)):  # a pipeline: every stage validates as a job spec
            validate_pipeline(*load_pipeline(path))
        else:
            load_spec(path)


def test_cli_validate_show_schema(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"name": "x", "train": {"steps": 5}}))
    assert main(["spec", "validate", str(good)]) == 0
    assert main(["spec", "show", str(good), "--set", "train.steps=7"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out.split("\n", 1)[1])["train"]["steps"] == 7
    assert main(["spec", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"data", "model", "train", "scale", "track", "tune", "serve"} <= set(schema["properties"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    assert main(["spec", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.stepz: unknown key 'stepz'" in err and len(err.strip().splitlines()) == 1
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1,\n")
    assert main(["spec", "validate", str(broken)]) == 2
    assert "not valid YAML at line" in capsys.readouterr().err


def test_stdlib_platform_is_not_shadowed():
    out = subprocess.run([sys.executable, "-c", "import platform, raygen.jobs, raygen.serving; print(platform.__file__)"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert not out.startswith(str(REPO)) and out.endswith("platform.py")
    assert not (REPO / "platform" / "__init__.py").exists()


def test_spec_reference_doc_is_current():
    out = subprocess.run([sys.executable, str(REPO / "docs" / "gen_spec.py")], capture_output=True, text=True, check=True).stdout
    assert out == (REPO / "docs" / "spec.md").read_text(), "docs/spec.md is stale: python docs/gen_spec.py > docs/spec.md"
