"""A real Ray Tune sweep (ASHA over lr, a grid over backbones) and the MLflow
lineage it leaves: a parent run, a nested run per trial with the flattened
spec, artifacts and FID, and the best trial registered for serving."""
from __future__ import annotations

import pytest

from raygen.exports import load_generator
from raygen.spec import parse_spec
from raygen.tracking.store import client
from raygen.tune import run_tune

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # a real sweep: several minutes on 2 cores


def test_tune_sweep_with_nested_mlflow_runs(ray_session, tmp_path):
    spec = parse_spec({
        "name": "sweep", "run_dir": str(tmp_path / "runs"),
        "data": {"dataset": "digits", "root": str(tmp_path / "data"), "resolution": 8, "batch_size": 16},
        "model": {"family": "seqimg", "options": {"backbone": "gpt2", "dim": 16, "depth": 1, "heads": 2,
                                                  "conditioning": "label"}},
        "train": {"steps": 6, "eval_every": 2, "checkpoint_every": 6, "val_batches": 1, "grid_samples": 4},
        "scale": {"workers": 1, "strategy": "ddp"},
        "track": {"fid": {"samples": 32, "fit_steps": 20}},
        "tune": {"space": {"train.optimizer.lr": {"loguniform": [1e-3, 1e-2]},
                           "model.options.backbone": {"grid": ["gpt2", "lstm"]}},
                 "num_samples": 1, "scheduler": {"name": "asha", "grace_period": 1}},
    })
    result = run_tune(spec, progress=False)
    assert len(result.trials) == 2 and not any(t["error"] for t in result.trials)
    assert {t["overrides"]["model.options.backbone"] for t in result.trials} == {"gpt2", "lstm"}
    for t in result.trials:  # every trial is a real run that reported val loss to the scheduler
        assert 1e-3 <= t["overrides"]["train.optimizer.lr"] <= 1e-2
        assert t["metrics"]["val_loss"] > 0
    finished = [t for t in result.trials if "fid" in t["metrics"]]  # ASHA may stop the worse one early
    assert finished and all(t["metrics"]["fid"] > 0 for t in finished)
    assert result.best_metrics["val_loss"] == min(t["metrics"]["val_loss"] for t in result.trials)

    c = client(result.tracking_uri)
    parent = c.get_run(result.parent_run_id)
    assert parent.data.tags["raygen.kind"] == "tune-sweep" and parent.info.status == "FINISHED"
    assert "best_val_loss" in parent.data.metrics
    assert parent.data.params["best.model.options.backbone"] in ("gpt2", "lstm")
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    finished_runs = {t["metrics"]["mlflow_run_id"] for t in finished}
    for child in children:
        params = child.data.params
        assert params["model.family"] == "seqimg" and params["train.steps"] == "6"
        assert params["model.options.backbone"] in ("gpt2", "lstm")
        assert {"val_loss", "loss", "lr"} <= set(child.data.metrics)
        if child.info.run_id not in finished_runs:
            continue
        assert float(params["train.optimizer.lr"]) == pytest.approx(
            next(t["overrides"]["train.optimizer.lr"] for t in finished if t["metrics"]["mlflow_run_id"] == child.info.run_id))
        assert {"fid", "kid"} <= set(child.data.metrics)
        assert child.data.tags["fid.extractor"].startswith("domain:")
        artifacts = {a.path for a in c.list_artifacts(child.info.run_id)}
        assert {"spec.yaml", "samples", "plots", "checkpoint"} <= artifacts

    # the sweep registered its best trial; serving loads it by models:/ URI and names the run
    assert result.model_uri == "models:/sweep/1"
    loaded = load_generator(result.model_uri, result.tracking_uri)
    assert loaded.meta["run_id"] == parent.data.tags["raygen.best_run_id"]
    images = loaded.model.generate(2)
    assert images.shape == (2, 1, 8, 8) and 0 <= float(images.min()) and float(images.max()) <= 1
