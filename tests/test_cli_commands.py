"""`raygen sample|eval|ui|submit` through the real CLI entry point.

One tiny, untrained but real seqimg model (label-conditioned, 8x8 grayscale)
is exported with a spec whose data section points at a digits dataset
prepared in a temp folder; `sample` and `eval` run on it in-process. `ui`
starts a real MLflow server (slow); `submit` talks to a closed port.

Every bad input must exit 2 with one line on stderr and no traceback.
"""
from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raygen.jobs.cli import main

SEQ_OPTIONS = {"backbone": "gpt2", "dim": 32, "depth": 1, "conditioning": "label"}


# ------------------------------------------------------------------ helpers
def run_cli(capfd, *argv) -> tuple[int, str, str]:
    capfd.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return rc, out, err


def assert_user_error(capfd, argv, *needles) -> str:
    """Exit 2, exactly one line on stderr (fd level, so stray library logs count), naming `needles`."""
    rc, _, err = run_cli(capfd, *argv)
    assert rc == 2, (argv, err)
    assert err.count("\n") == 1 and err.endswith("\n"), f"expected one line on stderr, got:\n{err}"
    assert err.startswith(f"raygen {argv[0]}: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listeners(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(addr)
    return found


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """(model folder, data root): a tiny label-conditioned seqimg exported with
    a spec whose data section names a digits dataset prepared under the root."""
    import torch

    from raygen.data import prepare_dataset
    from raygen.exports import export_generator
    from raygen.models.registry import build_model
    from raygen.spec import parse_spec

    root = tmp_path_factory.mktemp("cli")
    data_dir = root / "digits"
    manifest = prepare_dataset("digits", data_dir, resolution=8, count=200)
    spec = parse_spec({
        "name": "seq",
        "run_dir": str(root / "runs"),
        "data": {"dataset": str(data_dir), "root": str(root), "resolution": 8, "channels": 1, "batch_size": 32},
        "model": {"family": "seqimg", "options": SEQ_OPTIONS},
        "track": {"fid": {"fit_steps": 20, "samples": 16}},
    })
    info = manifest.data_info(spec.data)
    assert (info.num_classes, info.resolution, info.channels) == (10, 8, 1)
    torch.manual_seed(0)
    model = build_model("seqimg", SEQ_OPTIONS, info)
    path = export_generator(root / "model", model.state_dict(), spec, info, meta={"run_id": "seq-run", "step": 0})
    return path, root


# ------------------------------------------------------------------ sample
def test_sample_writes_a_deterministic_grid(digits_model, tmp_path, capfd):
    model, _ = digits_model
    grid = tmp_path / "grid.png"
    rc, out, err = run_cli(capfd, "sample", model, "-n", 6, "--label", 1, "--seed", 3, "--out", grid)
    assert rc == 0, err
    assert f"wrote 6 image(s) to {grid}" in out
    image = Image.open(grid)
    # 6 images -> 3 columns x 2 rows of 8px cells enlarged 128 // 8 = 16x, with 2px borders (raygen.images.grid)
    assert (image.format, image.mode, image.size) == ("PNG", "L", (3 * 128 + 4 * 2, 2 * 128 + 3 * 2))
    pixels = np.asarray(image)
    cells = [pixels[2 + 130 * r: 130 * (r + 1), 2 + 130 * c: 130 * (c + 1)] for r in range(2) for c in range(3)]
    assert len({cell.tobytes() for cell in cells}) == 6  # six different samples, not one repeated

    def sample(name, *extra):
        path = tmp_path / name
        rc, _, err = run_cli(capfd, "sample", model, "-n", 6, "--out", path, *extra)
        assert rc == 0, err
        return path.read_bytes()

    first = grid.read_bytes()
    assert sample("again.png", "--label", 1, "--seed", 3) == first
    assert sample("seed4.png", "--label", 1, "--seed", 4) != first
    assert sample("label2.png", "--label", 2, "--seed", 3) != first  # the label conditions the model
    # class names match in any case, as in the HTTP API (digits are named "0".."9": the index and the name agree)
    assert sample("name.png", "--label", "1", "--seed", 3) == first

    cooler = sample("t05.png", "--label", 1, "--seed", 3, "--set", "temperature=0.5")
    assert cooler != first and Image.open(tmp_path / "t05.png").size == image.size
    # temperature 0 takes the most likely level: the seed no longer matters
    assert sample("g3.png", "--label", 1, "--seed", 3, "--set", "temperature=0") == \
        sample("g4.png", "--label", 1, "--seed", 4, "--set", "temperature=0")


def test_sample_bad_inputs_are_one_line_exit_2(digits_model, tmp_path, capfd):
    model, _ = digits_model
    out = tmp_path / "never.png"
    base = ["sample", model, "-n", 2, "--seed", 3, "--out", out]
    assert_user_error(capfd, base + ["--label", 99], "--label", "99")
    assert_user_error(capfd, base + ["--label", -1], "--label")
    assert_user_error(capfd, base + ["--label", "nosuchclass"], "--label", "nosuchclass")
    assert_user_error(capfd, base + ["--set", "nosuch=1"], "nosuch", "temperature")
    assert_user_error(capfd, base + ["--set", "temperature"], "--set", "OPTION=VALUE")
    assert_user_error(capfd, base + ["--set", "temperature=hot"], "temperature", "float")
    assert_user_error(capfd, base + ["--set", "temperature=-1"], "temperature")
    assert_user_error(capfd, base + ["--set", "top_k=2.5"], "top_k", "int")
    assert_user_error(capfd, base + ["--best-of", 3], "--best-of", "--scorer")
    assert_user_error(capfd, base + ["--best-of", 0], "--best-of")
    assert_user_error(capfd, base + ["--best-of", 2, "--caption", "a digit", "--scorer", tmp_path / "no-clip"],
                      "--scorer", "not found")
    assert_user_error(capfd, base + ["--best-of", 2, "--caption", "a digit", "--scorer", model],
                      "--scorer", "cannot score image-text pairs", "families that can: clip")
    assert_user_error(capfd, ["sample", model, "-n", 0, "--out", out], "-n")
    assert_user_error(capfd, ["sample", tmp_path / "nowhere", "--out", out], "model not found")
    assert_user_error(capfd, ["sample", tmp_path, "--out", out], "holds no raygen model")
    assert not out.exists()


# ------------------------------------------------------------------ eval
def test_eval_reports_finite_metrics(digits_model, capfd):
    model, root = digits_model
    start = time.monotonic()
    rc, out, err = run_cli(capfd, "eval", model, "--samples", 32, "--no-log")
    assert rc == 0, err
    assert time.monotonic() - start < 60
    found = dict(re.findall(r"^\s*(\w+): (\S+)$", out, flags=re.M))
    for key in ("fid", "kid", "val_loss"):
        assert key in found, out
        assert math.isfinite(float(found[key])), (key, found[key])
    assert float(found["fid"]) >= 0 and float(found["val_loss"]) > 0
    # 32 asked for, but the 200-image digits set holds only 22 val images to compare against
    assert int(float(found["fid_samples"])) == 22
    assert re.fullmatch(r"domain:\S+", found["fid_extractor"]), found["fid_extractor"]
    assert "logged to MLflow" not in out
    assert list((root / "fid-cache").iterdir())  # the domain extractor was fit once and cached


def test_eval_bad_inputs_are_one_line_exit_2(digits_model, tmp_path, capfd):
    model, _ = digits_model
    assert_user_error(capfd, ["eval", tmp_path / "nowhere", "--no-log"], "model not found")
    assert_user_error(capfd, ["eval", model, "--no-log", "--samples", 32, "--extractor",
                              f"inception:{tmp_path / 'no-weights'}"], "Inception weights not found")
    assert_user_error(capfd, ["eval", model, "--no-log", "--samples", 1], "--samples")


# ------------------------------------------------------------------ ui
@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("x", artifact_location=str(root / "mlartifacts"))
    return uri


def test_ui_refuses_a_missing_store_and_a_busy_port(tmp_path, mlflow_store, capfd):
    missing = f"sqlite:///{tmp_path / 'nothing' / 'mlflow.db'}"
    assert_user_error(capfd, ["ui", "--tracking-uri", missing, "--port", free_port()], "no MLflow store", missing)
    assert not (tmp_path / "nothing").exists()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_user_error(capfd, ["ui", "--tracking-uri", mlflow_store, "--port", port], "cannot listen", str(port))
    assert_user_error(capfd, ["ui", "--tracking-uri", mlflow_store, "--port", 70000], "--port")


@pytest.mark.slow
def test_ui_serves_on_loopback_and_stops_on_sigterm(tmp_path, mlflow_store):
    import httpx

    port = free_port()
    log = tmp_path / "ui.log"
    cmd = [sys.executable, "-c", "import sys; from raygen.jobs.cli import main; sys.exit(main(sys.argv[1:]))",
           "ui", "--tracking-uri", mlflow_store, "--port", str(port)]
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"raygen ui exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                break
            time.sleep(0.5)
        assert status == 200, log.read_text()[-3000:]
        assert f"MLflow UI on http://127.0.0.1:{port}" in log.read_text()
        found = httpx.post(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                           json={"max_results": 10}, timeout=10)
        assert found.status_code == 200 and "x" in [e["name"] for e in found.json()["experiments"]]
        # only loopback: every listening socket on the port is 127.0.0.1 (0100007F), none on 0.0.0.0 or ::
        assert listeners(port) == {"0100007F"}, listeners(port)

        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("raygen ui did not stop within 30 s of SIGTERM")
        assert rc == 0, log.read_text()[-3000:]
        # the MLflow server went with it: nothing listens on the port any more
        deadline = time.monotonic() + 10
        while listeners(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not listeners(port), "the MLflow server outlived `raygen ui`"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# ------------------------------------------------------------------ submit
@pytest.mark.parametrize("action", ["status", "logs", "stop"])
def test_submit_to_a_closed_port_fails_fast(action, capfd):
    port = free_port()  # bound then released: nothing listens there
    for address in (f"http://127.0.0.1:{port}", f"127.0.0.1:{port}"):
        start = time.monotonic()
        err = assert_user_error(capfd, ["submit", action, "raysubmit_123", "--address", address],
                                "cannot reach the Ray cluster", f"http://127.0.0.1:{port}")
        assert time.monotonic() - start < 20, (address, err)


def test_submit_run_checks_the_spec_before_the_cluster(tmp_path, capfd):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\ntrain: {steps: 0}\n")
    assert_user_error(capfd, ["submit", "run", spec, "--address", f"http://127.0.0.1:{free_port()}"], "steps")
