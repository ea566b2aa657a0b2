"""`raygen tune SPEC --resume` after the driver was killed mid-sweep:
finished trials are not rerun, the interrupted one continues from its last
checkpoint, the pending one runs; every trial ends at train.steps."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, stop_own_ray_processes
from raygen.tracking.store import client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

SPEC = {
    "name": "resume", "run_dir": "runs",
    "data": {"dataset": "digits", "root": "runs/data", "resolution": 8, "batch_size": 16},
    "model": {"family": "seqimg", "options": {"backbone": "gpt2", "dim": 16, "depth": 1, "heads": 2,
                                              "conditioning": "label"}},
    "train": {"steps": 8, "eval_every": 2, "checkpoint_every": 2, "keep_checkpoints": 10, "val_batches": 1,
              "grid_samples": 4},
    "scale": {"workers": 1, "strategy": "ddp"},
    "track": {"fid": {"enabled": False}, "register_model": False},
    "tune": {"space": {"train.optimizer.lr": {"loguniform": [1e-3, 1e-2]}}, "num_samples": 3,
             "scheduler": {"name": "fifo"}, "max_concurrent": 1},
}


def steps_done(trial: Path) -> int:
    done = [int(p.name.split("-")[1]) for p in (trial / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file()]
    return max(done, default=0)


def env_with(ray_tmp: str) -> dict:
    return {**os.environ, "RAY_TMPDIR": ray_tmp, "RAYGEN_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}


def reports(sweep: Path) -> list[dict]:
    out = []
    for f in sweep.glob("ray/*/*/result.json"):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, request):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    raygen = [sys.executable, "-m", "raygen.jobs.cli", "tune", "spec.yaml"]
    # each driver's Ray in its own short folder (socket paths), so its processes can be found and stopped
    first_ray, second_ray = tempfile.mkdtemp(prefix="rgt1-", dir="/tmp"), tempfile.mkdtemp(prefix="rgt2-", dir="/tmp")
    for folder in (first_ray, second_ray):
        request.addfinalizer(lambda folder=folder: shutil.rmtree(folder, ignore_errors=True))
    sweep = tmp_path / "runs" / "resume-tune"
    driver = subprocess.Popen(raygen, cwd=tmp_path, env=env_with(first_ray), stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "first.err", "w"))
    try:
        deadline = time.time() + 900
        while time.time() < deadline:  # one trial finished, the next one part-way
            trials = sorted((sweep / "trials").glob("*")) if (sweep / "trials").is_dir() else []
            counts = [steps_done(t) for t in trials]
            if counts.count(8) == 1 and any(0 < c < 8 for c in counts):
                break
            assert driver.poll() is None, (tmp_path / "first.err").read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail(f"the sweep did not get half-way in time: {counts}")
        driver.send_signal(signal.SIGKILL)  # the driver, by pid: no clean shutdown
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
        stop_own_ray_processes(Path(first_ray))  # its trials too: nothing trains on after the kill
    before = {t.name: steps_done(t) for t in (sweep / "trials").iterdir()}
    finished = next(name for name, c in before.items() if c == 8)
    interrupted = next(name for name, c in before.items() if 0 < c < 8)
    finished_stamp = (sweep / "trials" / finished / "run.json").stat().st_mtime_ns

    try:
        out = subprocess.run([*raygen, "--resume"], cwd=tmp_path, env=env_with(second_ray), capture_output=True,
                             text=True, timeout=1200)
    finally:
        stop_own_ray_processes(Path(second_ray))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "3 trial(s)" in out.stdout
    results = json.loads((sweep / "results.json").read_text())
    assert len(results["trials"]) == 3 and not any(t["error"] for t in results["trials"])
    assert all(t["metrics"]["step"] == 8 for t in results["trials"])
    trials = sorted(p.name for p in (sweep / "trials").iterdir())
    assert len(trials) == 3 and all(steps_done(sweep / "trials" / t) == 8 for t in trials)
    # the finished trial was not rerun: its run folder was not touched again
    assert (sweep / "trials" / finished / "run.json").stat().st_mtime_ns == finished_stamp
    # the interrupted one continued from its last checkpoint, the pending one started at step 0
    rows = reports(sweep)
    resumed = [r for r in rows if r.get("trial_run") == interrupted and "resumed_step" in r]
    assert resumed and resumed[0]["resumed_step"] == before[interrupted]
    # Tune keeps the reports since the restore: they go on right after the checkpoint
    steps = sorted({r["step"] for r in rows if r.get("trial_run") == interrupted})
    assert steps == [float(s) for s in range(before[interrupted] + 2, 10, 2)]
    # and the trial's own MLflow run (the same run, reopened) has every eval step: none lost
    state = json.loads((sweep / "trials" / interrupted / "run.json").read_text())
    history = client(state["tracking_uri"]).get_metric_history(state["mlflow_run_id"], "val_loss")
    assert sorted({m.step for m in history}) == [2, 4, 6, 8]
    pending = next(t for t in trials if t not in before)
    assert not any("resumed_step" in r for r in rows if r.get("trial_run") == pending)
