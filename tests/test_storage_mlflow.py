"""MLflow with its artifacts on S3: an `mlflow server` (sqlite backend,
artifact root on a local moto S3) as raygen's tracking server. A run's
spec and its logged, registered model land in the bucket, and
`models:/NAME/VERSION` loads the model back from there (what `raygen serve
--model models:/... --tracking-uri ...` does in each replica)."""
from __future__ import annotations

import pytest
import torch

from s3_server import SECRET, mlflow_server, s3_server  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # an mlflow server and moto: about 4 minutes on a loaded 2-core machine


def _export(folder):
    from raygen.exports import export_generator
    from raygen.models import build_model
    from raygen.models.base import DataInfo
    from raygen.spec import parse_spec
    spec = parse_spec({"name": "s3model", "data": {"resolution": 8, "channels": 1},
                       "model": {"family": "seqimg", "options": {"backbone": "gpt2", "dim": 16, "depth": 1,
                                                                "heads": 2}}})
    info = DataInfo(channels=1, resolution=8)
    torch.manual_seed(0)
    model = build_model("seqimg", spec.model.config, info)
    return export_generator(folder, model.state_dict(), spec, info), model


def test_models_are_logged_to_s3_and_load_back_through_the_server(s3_server, mlflow_server, tmp_path):  # noqa: F811
    from raygen.exports import load_generator
    from raygen.tracking.models import log_and_register
    from raygen.tracking.store import open_run

    export_dir, model = _export(tmp_path / "export")
    run = open_run(mlflow_server.uri, "s3-artifacts", "r1", spec=None)
    run.client.log_text(run.run_id, "a: 1\n", "spec.yaml")
    uri = log_and_register(mlflow_server.uri, run.run_id, export_dir, "s3model")
    run.finish()
    assert uri == "models:/s3model/1"

    assert run.client.get_run(run.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")  # the server proxies ...
    keys = s3_server.keys("mlflow/")
    # ... to the bucket: the run's files and the model's (MLmodel, weights) are objects there
    assert any(k.endswith(f"{run.run_id}/artifacts/spec.yaml") for k in keys), keys
    assert any(k.endswith("/MLmodel") for k in keys), keys
    assert any(k.endswith(".safetensors") for k in keys), keys

    loaded = load_generator(uri, tracking_uri=mlflow_server.uri)  # downloaded from S3 through the server
    assert loaded.source == uri
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    images = loaded.model.generate(2, seed=0)
    assert tuple(images.shape) == (2, 1, 8, 8) and bool(torch.isfinite(images).all())
    assert SECRET.encode() not in mlflow_server.log.read_bytes()
