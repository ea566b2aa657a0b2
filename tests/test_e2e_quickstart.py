"""End to end: a few-step quickstart trains on Ray (DeepSpeed ZeRO-2, 2
workers), MLflow holds its metrics, FID, grid and registered model, and
Ray Serve answers generate requests from that model (and rejects bad ones)."""
from __future__ import annotations

import base64
import io
import re
import socket
from pathlib import Path

import httpx
import pytest
from PIL import Image

from raygen.jobs.cli import main
from raygen.tracking.store import client

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs the dataset-fashion-mnist Debian package (make dataset)")
def test_quickstart_train_track_serve(ray_session, workdir, capsys):
    from ray import serve

    from raygen.serving.app import APP_NAME, AppArgs, plan_app

    code = main(["train", str(REPO / "jobs/specs/quickstart.yaml"),
                 "--set", "data.count=2000", "--set", "train.steps=8", "--set", "train.eval_every=4",
                 "--set", "train.checkpoint_every=4", "--set", "train.val_batches=1",
                 "--set", "track.fid.samples=64", "--set", "track.fid.fit_steps=40", "--set", "track.fid.every=4",
                 "--set", "model.options.dim=32", "--set", "model.options.depth=1"])
    out = capsys.readouterr().out
    assert code == 0, out
    serve_line = next(line for line in out.splitlines() if "raygen serve --model" in line)
    model_uri = re.search(r"--model (models:/\S+)", serve_line).group(1)
    tracking_uri = re.search(r"--tracking-uri (\S+)", serve_line).group(1)
    assert model_uri == "models:/quickstart/1"
    grid = Path(re.search(r"samples:\s+(\S+)", out).group(1))
    assert Image.open(grid).size[0] >= 64

    c = client(tracking_uri)
    run = c.search_runs([c.get_experiment_by_name("quickstart").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "8" and run.data.params["scale.strategy"] == "deepspeed"
    steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "loss"))
    assert steps == list(range(1, 9))
    for key in ("val_loss", "images_per_s", "lr", "grad_norm", "fid", "kid"):
        assert key in run.data.metrics, key
    assert run.data.metrics["fid"] > 0
    fid_steps = [m.step for m in c.get_metric_history(run.info.run_id, "fid")]
    assert 4 in fid_steps and 8 in fid_steps  # during training (every 4 steps) and at the end
    assert run.data.tags["fid.extractor"].startswith("domain:") and run.data.tags["fid.samples"] == "64"
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"spec.yaml", "samples", "plots", "checkpoint"} <= artifacts
    assert any(a.path.endswith(".png") for a in c.list_artifacts(run.info.run_id, "samples"))
    # the model is an MLflow LoggedModel holding the raygen export (safetensors, no pickles)
    logged = c.search_logged_models([run.info.experiment_id])[0]
    model_files = {Path(a.path).name for a in c.list_logged_model_artifacts(logged.model_id, "artifacts/export")}
    assert "weights.safetensors" in model_files and "spec.yaml" in model_files
    assert not any(name.endswith((".pkl", ".pt", ".pth")) for name in model_files)  # no pickled code

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app, plan = plan_app(AppArgs(models=[model_uri], tracking_uri=tracking_uri,
                                     replica_cpus=0.2, ingress_cpus=0.1))
        serve.run(app, name=APP_NAME, route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            assert http.get("/healthz").status_code == 200
            r = http.post("/v1/generate", json={"n": 4, "label": 3, "seed": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["run_id"] == run.info.run_id  # the response names the run it came from
            assert len(body["images"]) == 4
            for item in body["images"]:
                image = Image.open(io.BytesIO(base64.b64decode(item["png_base64"])))
                assert image.size == (16, 16) and image.mode == "L"
            again = http.post("/v1/generate", json={"n": 4, "label": 3, "seed": 0}).json()
            assert [i["png_base64"] for i in again["images"]] == [i["png_base64"] for i in body["images"]]
            for bad in ({"n": 0}, {"n": 4, "label": 10}, {"n": 1, "colour": "red"}):
                r = http.post("/v1/generate", json=bad)
                assert 400 <= r.status_code < 500 and "error" in r.json(), (bad, r.text)
            r = http.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500 and "error" in r.json()
    finally:
        serve.shutdown()
