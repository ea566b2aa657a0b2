"""Pipeline specs (named stages, `${stages.X.model}`) and frozen components:
validation up front, stages run in order through Ray, finished stages
skipped, the first unfinished one resumed, MLflow parent and child runs, the
component frozen, kept out of the optimizer and exported beside the model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import pipeline_toys  # noqa: F401  (registers toy_ae and toy_refiner from this local module)
from raygen.spec.errors import SpecError
from raygen.spec.pipeline import load_pipeline, validate_pipeline

STAGE = {
    "data": {"dataset": "digits", "resolution": 8, "batch_size": 16},
    "train": {"steps": 6, "eval_every": 3, "checkpoint_every": 3, "val_batches": 1, "grid_samples": 4,
              "log_every": 1, "optimizer": {"lr": 3e-3}, "ema": {"enabled": False}},
    "scale": {"workers": 2, "strategy": "ddp"},
    "track": {"fid": {"enabled": False}, "register_model": False},
}


def write_pipeline(folder: Path, data_root: Path, refiner_steps: int = 6) -> Path:
    stage = json.loads(json.dumps(STAGE))
    stage["data"]["root"] = str(data_root)
    (folder / "ae.yaml").write_text(yaml.safe_dump({**stage, "model": {"family": "toy_ae"}}))
    pipeline = {
        "name": "pipe", "run_dir": str(folder / "runs"),
        "stages": {
            "ae": {"spec": "ae.yaml"},  # a file beside the pipeline
            "refiner": {"spec": {**stage, "model": {"family": "toy_refiner",
                                                    "components": {"base": "${stages.ae.model}"}}},
                        "set": {"train": {"steps": refiner_steps}}},
        },
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path


def test_references_must_point_to_earlier_stages(tmp_path):
    path = write_pipeline(tmp_path, tmp_path / "data")
    pipeline, base = load_pipeline(path)
    specs = validate_pipeline(pipeline, base)
    assert specs["refiner"].model.components == {"base": "<model of stage ae>"}
    assert specs["refiner"].train.steps == 6 and specs["ae"].name == "pipe-ae"
    raw = yaml.safe_load(path.read_text())
    raw["stages"] = {"refiner": raw["stages"]["refiner"], "ae": raw["stages"]["ae"]}  # wrong order
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    pipeline, base = load_pipeline(path)
    with pytest.raises(SpecError, match=r"stages.refiner: \$\{stages.ae.model\} refers to a stage .*only earlier"):
        validate_pipeline(pipeline, base)
    raw["stages"]["ae"]["set"] = {"train.stepz": 3}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match="stages.ae: .*train.stepz: unknown key"):
        validate_pipeline(*load_pipeline(path))


def test_spec_validate_checks_every_stage(tmp_path, capfd):
    from raygen.jobs.cli import main
    path = write_pipeline(tmp_path, tmp_path / "data")
    assert main(["spec", "validate", str(path)]) == 0
    assert "pipeline of 2 stage(s): ae (toy_ae), refiner (toy_refiner)" in capfd.readouterr().out
    assert main(["spec", "validate", str(path), "--set", "stages.ae.set.train.steps=0"]) == 2
    err = capfd.readouterr().err
    assert "stages.ae" in err and "train.steps" in err and err.count("\n") == 1


def test_a_component_of_the_wrong_kind_is_refused():
    from raygen.models import CapabilityError, DataInfo, build_model
    from raygen.models.seqimg import SeqImgConfig
    info = DataInfo(channels=1, resolution=8)
    seq = build_model("seqimg", SeqImgConfig.debug(), info)
    with pytest.raises(CapabilityError, match="components.base: a seqimg model cannot serve as 'base'.*reconstruct"):
        build_model("toy_refiner", {}, info, {"base": seq})
    with pytest.raises(ValueError, match="has no component 'vae'; it takes base"):
        build_model("toy_refiner", {}, info, {"vae": seq})


@pytest.mark.slow
@pytest.mark.e2e  # several minutes on 2 cores: `make test-e2e`
def test_pipeline_runs_skips_and_resumes(ray_session, tmp_path):
    from raygen.tracking.store import client
    from raygen.train.pipeline import run_pipeline

    data_root = tmp_path / "data"
    path = write_pipeline(tmp_path, data_root)
    first = run_pipeline(*load_pipeline(path), progress=False, log=lambda *_: None)
    assert first.ran == ["ae", "refiner"] and first.skipped == []
    ae_model, refiner_model = Path(first.models["ae"]), Path(first.models["refiner"])

    # the component is frozen: the refiner's export carries the autoencoder's exact weights
    index = json.loads((refiner_model / "raygen-model.json").read_text())
    assert index["components"]["base"]["path"] == "components/base"
    ae_weights = load_file(str(ae_model / "weights.safetensors"))
    copied = load_file(str(refiner_model / "components" / "base" / "weights.safetensors"))
    assert ae_weights.keys() == copied.keys() and all(torch.equal(ae_weights[k], copied[k]) for k in ae_weights)
    own = load_file(str(refiner_model / "weights.safetensors"))
    assert own and not any(k.startswith("components.") for k in own)
    # ... and out of the optimizer: the training checkpoint's weights still hold the untouched component
    ckpt = load_file(str(refiner_model.parent / "model.safetensors"))
    assert all(torch.equal(ckpt[f"components.base.{k}"], v) for k, v in ae_weights.items())

    # MLflow: one parent run, a child per stage
    c = client(first.tracking_uri)
    children = [r for r in c.search_runs([c.get_run(first.parent_run_id).info.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == first.parent_run_id]
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == ["ae", "refiner"]

    # a rerun skips what is finished
    again = run_pipeline(*load_pipeline(path), progress=False, log=lambda *_: None)
    assert again.ran == [] and again.skipped == ["ae", "refiner"]

    # an unfinished stage resumes from its newest checkpoint: ask the refiner for more steps
    state_file = first.folder / "pipeline.json"
    state = json.loads(state_file.read_text())
    state["stages"]["refiner"]["status"] = "unfinished"
    state_file.write_text(json.dumps(state))
    path = write_pipeline(tmp_path, data_root, refiner_steps=9)
    third = run_pipeline(*load_pipeline(path), progress=False, log=lambda *_: None)
    assert third.skipped == ["ae"] and third.ran == ["refiner"]
    final = Path(third.models["refiner"]).parent
    assert json.loads((final / "state.json").read_text())["train_state"]["step"] == 9
    run_id = json.loads(state_file.read_text())["stages"]["refiner"]["run_id"]
    resumed = [m.value for m in c.get_metric_history(run_id, "resumed_from_step")]
    assert resumed == [6.0]
