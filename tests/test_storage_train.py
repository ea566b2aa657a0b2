"""Ray Train's storage on S3 (`scale.storage: s3://...`, a local moto S3):
checkpoints are uploaded there by Ray Train, a resume whose run folder lost
its checkpoints continues from the S3 one, the run folder's outputs are
copied beside them, and the secret key appears in no output or log."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from s3_server import SECRET, s3_server  # noqa: F401  (fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]  # two training runs, each with its own Ray

SPEC = {"name": "t", "run_dir": "runs",
        "data": {"dataset": "digits", "root": "data", "resolution": 8, "count": 64, "batch_size": 16},
        "model": {"family": "seqimg", "options": {"backbone": "gpt2", "dim": 16, "depth": 1, "heads": 2}},
        "train": {"steps": 4, "checkpoint_every": 2, "log_every": 1},
        "scale": {"workers": 1, "strategy": "ddp", "cpus_per_worker": 0.5},
        "track": {"fid": {"enabled": False}, "register_model": False}}


def train(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    # a fresh process and Ray: its workers inherit the AWS variables the fixture set
    env = {**os.environ, "RAY_ADDRESS": "", "RAYGEN_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "raygen.jobs.cli", "train", "spec.yaml", *args], cwd=workdir,
                          capture_output=True, text=True, env=env, timeout=540)


def secret_in_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def test_checkpoints_go_to_s3_and_a_resume_restores_from_there(s3_server, tmp_path):  # noqa: F811
    storage_uri = s3_server.uri("train")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({**SPEC, "scale": {**SPEC["scale"], "storage": storage_uri}}))
    first = train(tmp_path, "--stop-after", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "t"
    state = json.loads((run_dir / "run.json").read_text())
    assert state["storage"] == storage_uri
    ray_keys = s3_server.keys(f"train/ray/{state['ray_run_name']}/")
    step2 = [k for k in ray_keys if k.endswith("/COMPLETE")]
    assert len(step2) == 1, ray_keys
    assert json.loads(s3_server.client().get_object(Bucket=s3_server.bucket, Key=step2[0])["Body"].read()) == {"step": 2}
    assert "train/runs/t/run.json" in s3_server.keys("train/runs/t/")

    # the run folder loses its checkpoints (another machine, a lost disk): the resume fetches step 2 from S3
    shutil.rmtree(run_dir / "checkpoints")
    second = train(tmp_path, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step-00000002" / "COMPLETE").is_file()  # fetched back from S3
    done = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert done[-1] == "step-00000004", done
    ray_keys = s3_server.keys(f"train/ray/{state['ray_run_name']}/")
    steps_on_s3 = sorted(json.loads(s3_server.client().get_object(Bucket=s3_server.bucket, Key=k)["Body"].read())["step"]
                         for k in ray_keys if k.endswith("/COMPLETE"))
    assert steps_on_s3 == [2, 4]  # keep_checkpoints=2 (CheckpointConfig.num_to_keep)
    # the resumed half continued at step 3: every step logged once, none twice, no gap
    from mlflow.tracking import MlflowClient
    history = MlflowClient(tracking_uri=state["tracking_uri"]).get_metric_history(state["mlflow_run_id"], "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]

    # never the secret: not in what the commands printed, not in any file of the run
    for out in (first, second):
        assert SECRET not in out.stdout + out.stderr
    assert secret_in_files(tmp_path) == []
