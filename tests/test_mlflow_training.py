"""A real (tiny) training run on Ray leaves the whole story in MLflow: its
datasets as inputs, system metrics, and its model as an MLflow Model (a
LoggedModel with its eval metrics, registered) that MLflow's pyfunc and
raygen load alike."""
from __future__ import annotations

import io

import mlflow.pyfunc
import numpy as np
import pytest
from PIL import Image

from raygen.data import read_manifest
from raygen.exports import load_generator
from raygen.images import to_uint8
from raygen.spec import parse_spec
from raygen.tracking.lineage import manifest_sha256
from raygen.tracking.models import using_store
from raygen.tracking.store import client
from raygen.train.runner import run_training

pytestmark = pytest.mark.slow


def test_a_training_run_logs_datasets_system_metrics_and_an_mlflow_model(ray_session, tmp_path):
    spec = parse_spec({
        "name": "tiny", "run_dir": str(tmp_path / "runs"),
        "data": {"dataset": "digits", "root": str(tmp_path / "data"), "resolution": 8, "batch_size": 16},
        "model": {"family": "seqimg", "options": {"backbone": "gpt2", "dim": 16, "depth": 1, "heads": 2,
                                                  "conditioning": "label"}},
        "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 4, "val_batches": 1, "grid_samples": 4},
        "scale": {"workers": 1, "strategy": "ddp"},
        "track": {"fid": {"samples": 32, "fit_steps": 20}, "system_metrics_every_s": 0.5},
    })
    result = run_training(spec, progress=False)
    assert result.model_uri == "models:/tiny/1"
    c = client(result.tracking_uri)
    run = c.get_run(result.run_id)

    # lineage: both splits of the prepared folder, with the manifest's digest
    manifest = read_manifest(run.data.params["data.prepared_dir"])
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
              for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    assert {d.digest for d in inputs.values()} == {manifest_sha256(manifest)[:32]}
    assert inputs["training"].name == f"{manifest.name}/train"

    # system metrics from the (one) node's local rank 0
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert not any(k.startswith("system/node_") for k in run.data.metrics)

    # the model: one LoggedModel of this run, with its eval metrics, and the registered version's source
    models = c.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [(m.name, m.source_run_id) for m in models] == [("model", run.info.run_id)]
    linked = {m.key for m in models[0].metrics}
    assert {"val_loss", "fid", "kid"} <= linked, linked
    assert c.get_model_version("tiny", "1").source == f"models:/{models[0].model_id}"
    assert "model" not in {a.path for a in c.list_artifacts(run.info.run_id)}

    # MLflow's pyfunc and raygen's loader give the same images from the same registered model
    with using_store(result.tracking_uri):
        out = mlflow.pyfunc.load_model(result.model_uri).predict({"n": 2, "label": 3, "seed": 0})
    own = load_generator(result.model_uri, result.tracking_uri).model
    images = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in out["png"]])
    np.testing.assert_array_equal(images, to_uint8(own.generate(2, condition=3, seed=0))[..., 0])
