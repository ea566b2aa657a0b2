"""The object-storage layout of docs/cluster.md ("Object storage"), end to
end: shards, Ray Train storage and checkpoints on a local S3 (moto), an
`mlflow server` (sqlite backend, S3 artifact root) as tracking server, a
2-node Ray cluster on loopback. Prepare to S3, train with a pause, lose the
run folder's checkpoints, resume from the S3 checkpoint, serve the
registered model from S3 artifacts and get an image; the secret key is in
no output or log."""
from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from ray_cluster import two_node_cluster
from s3_server import SECRET, free_port, mlflow_server, s3_server  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]


def spec(s3) -> dict:
    return {"name": "e2e", "run_dir": "runs",
            "data": {"dataset": s3.uri("datasets", "digits"), "root": "data", "resolution": 8, "batch_size": 16},
            "model": {"family": "seqimg", "options": {"backbone": "gpt2", "dim": 16, "depth": 1, "heads": 2}},
            "train": {"steps": 4, "checkpoint_every": 2, "log_every": 1, "grid_samples": 4},
            "scale": {"workers": 2, "strategy": "ddp", "cpus_per_worker": 0.5, "storage": s3.uri("train")},
            "track": {"fid": {"enabled": False}, "register_model": True, "experiment": "e2e"}}


def raygen(env: dict, cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "raygen.jobs.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert SECRET not in done.stdout + done.stderr
    return done


def test_train_resume_and_serve_with_everything_on_s3(s3_server, mlflow_server, tmp_path):  # noqa: F811
    work = tmp_path / "work"
    work.mkdir()
    (work / "spec.yaml").write_text(yaml.safe_dump(spec(s3_server)))
    with two_node_cluster(tmp_path, cpus=1) as cluster:  # started with the AWS variables the fixture set
        env = {**cluster.env, "RAYGEN_NO_PROGRESS": "1"}
        done = raygen(env, work, "data", "prepare", "digits", "--out", s3_server.uri("datasets", "digits"),
                      "--count", "64", "--resolution", "8")
        assert done.returncode == 0, done.stderr

        train = ["train", "spec.yaml", "--address", cluster.address, "--tracking-uri", mlflow_server.uri]
        first = raygen(env, work, *train, "--stop-after", "2")
        assert first.returncode == 0, first.stderr[-3000:]
        run_dir = work / "runs" / "e2e"
        state = json.loads((run_dir / "run.json").read_text())
        complete = [k for k in s3_server.keys(f"train/ray/{state['ray_run_name']}/") if k.endswith("/COMPLETE")]
        assert len(complete) == 1

        shutil.rmtree(run_dir / "checkpoints")  # what a new machine or a lost disk would see
        second = raygen(env, work, *train, "--resume")
        assert second.returncode == 0, second.stderr[-3000:]
        # step 2 came back from S3 and the run went on from it: steps 1-2 logged once, by the first half
        assert (run_dir / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
        assert (run_dir / "checkpoints" / "step-00000004" / "COMPLETE").is_file()
        from mlflow.tracking import MlflowClient
        history = MlflowClient(tracking_uri=mlflow_server.uri).get_metric_history(state["mlflow_run_id"], "loss")
        assert sorted(m.step for m in history) == [1, 2, 3, 4]
        assert any(k.endswith("/MLmodel") for k in s3_server.keys("mlflow/"))
        assert "train/runs/e2e/run.json" in s3_server.keys("train/runs/e2e/")

        # serve the registered model: the replica downloads it from S3 through the tracking server
        port = free_port()
        log = tmp_path / "serve.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "raygen.jobs.cli", "serve", "--model", "models:/e2e/1",
                                     "--tracking-uri", mlflow_server.uri, "--address", cluster.address,
                                     "--port", str(port), "--replica-cpus", "0.5"],
                                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 400
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
            r = httpx.post(url + "/v1/generate", json={"n": 1, "seed": 3}, timeout=120)
            assert r.status_code == 200, r.text
            image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["png_base64"])))
            assert image.size == (8, 8)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        assert SECRET not in log.read_text()
        leaks = [p for folder in (work, cluster.root, mlflow_server.log.parent)
                 for p in folder.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
        assert leaks == []
