"""`mlflow models serve -m models:/NAME/VERSION --env-manager local` answers
/invocations with the images raygen itself samples (one server, started and
stopped by its pid, on 127.0.0.1; the suite runs in a loopback namespace)."""
from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from raygen.exports import export_generator, load_exported
from raygen.images import to_uint8
from raygen.models import build_model, get_family
from raygen.spec import parse_spec
from raygen.tracking.models import log_and_register
from raygen.tracking.store import open_run

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _registered(tmp_path: Path) -> tuple[str, Path]:
    config, info = get_family("seqimg").debug()["lstm-label"][:2]
    torch.manual_seed(0)
    model = build_model("seqimg", config, info)
    spec = parse_spec({"name": "served", "model": {"family": "seqimg", "options": config.model_dump(mode="json")}})
    export = export_generator(tmp_path / "run" / "export", model.state_dict(), spec, info, {"step": 1})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = open_run(uri, "served", "served", spec=spec)
    assert log_and_register(uri, run.run_id, export, "served", step=1) == "models:/served/1"
    run.finish()
    return uri, export


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this test started (the server and its uvicorn worker), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _wait_until_up(http: httpx.Client, proc: subprocess.Popen, log: Path, limit_s: float = 240) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"mlflow models serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        try:
            if http.get("/ping").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer /ping:\n{log.read_text()[-3000:]}")


def test_mlflow_models_serve_answers_invocations_with_raygens_images(tmp_path):
    uri, export = _registered(tmp_path)
    port = free_port()
    bin_dir = Path(sys.executable).parent  # the venv's: mlflow starts `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "HOME": str(tmp_path),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow_cli = bin_dir / "mlflow"
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", "models:/served/1", "--env-manager",
                                 "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            _wait_until_up(http, proc, log)
            r = http.post("/invocations", json={"dataframe_records": [{"n": 3, "label": 2, "seed": 5}],
                                                "params": {"temperature": 0.7}})
            assert r.status_code == 200, r.text
            rows = r.json()["predictions"]
            assert [(row["request"], row["index"], row["seed"]) for row in rows] == [(0, 0, 5), (0, 1, 6), (0, 2, 7)]
            images = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(row["png"])))) for row in rows])
            own = load_exported(export).model
            np.testing.assert_array_equal(images, to_uint8(own.generate(3, condition=2, seed=5, temperature=0.7))[..., 0])
            # the "inputs" form of one request, as the signature's columns
            r = http.post("/invocations", json={"inputs": {"n": 1, "label": "cross", "seed": 0}})
            assert r.status_code == 200, r.text
            assert len(r.json()["predictions"]) == 1
            r = http.post("/invocations", json={"dataframe_records": [{"n": 1, "label": 9}]})
            assert r.status_code == 400 and "label 9 is out of range" in r.json()["message"], r.text
    finally:
        _stop(proc)
    assert proc.poll() is not None
