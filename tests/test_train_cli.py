"""`raygen train` around the run itself: the `--stop-after` hint and
`--resume` keep the user's `--set` overrides, and a run that fails before it
starts leaves no run folder behind."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raygen.jobs.cli import main
from raygen.train import runner

SPEC = {"name": "t", "run_dir": "runs",
        "data": {"dataset": "digits", "root": "data", "resolution": 8, "count": 64, "batch_size": 16},
        "model": {"family": "seqimg", "options": {"backbone": "gpt2", "dim": 16, "depth": 1, "heads": 2}},
        "train": {"steps": 4}, "scale": {"workers": 1, "strategy": "ddp"},
        "track": {"fid": {"enabled": False}, "register_model": False}}


@pytest.fixture
def spec_file(workdir) -> Path:
    path = workdir / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


@pytest.fixture
def fake_training(monkeypatch):
    """run_training replaced by one that records its spec and pauses with a checkpoint."""
    calls = []

    def fake(spec, **kwargs):
        calls.append((spec, kwargs))
        run_dir = Path(spec.run_dir) / spec.name
        return runner.RunResult(run_dir=run_dir, run_id="r1", tracking_uri="sqlite:///x.db",
                                checkpoint=run_dir / "checkpoints" / "step-00000002", model_uri=None)
    monkeypatch.setattr(runner, "run_training", fake)
    return calls


def test_the_pause_hint_is_the_whole_command(spec_file, fake_training, capsys):
    rc = main(["train", str(spec_file), "--set", "train.steps=7", "--set", "model.options.dim=24",
               "--set", "data.source=my photos", "--stop-after", "2", "--tracking-uri", "sqlite:///elsewhere.db"])
    assert rc == 0
    (spec, kwargs), = fake_training
    assert kwargs["overrides"] == ["train.steps=7", "model.options.dim=24", "data.source=my photos"]
    hint = next(line for line in capsys.readouterr().out.splitlines() if "continue with:" in line)
    assert hint.split("continue with: ")[1] == (
        f"raygen train {spec_file} --resume --set train.steps=7 --set model.options.dim=24 "
        "--set 'data.source=my photos' --tracking-uri sqlite:///elsewhere.db")


def test_resume_reapplies_the_runs_overrides_and_later_ones_win(spec_file, fake_training, capsys):
    run_dir = spec_file.parent / "runs" / "t"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"overrides": ["train.steps=7", "model.options.dim=24"]}))
    assert main(["train", str(spec_file), "--resume", "--set", "train.steps=9"]) == 0
    (spec, kwargs), = fake_training
    assert (spec.train.steps, spec.model.options["dim"]) == (9, 24)
    assert kwargs["overrides"] == ["train.steps=9", "model.options.dim=24"] and kwargs["resume"]
    assert "resuming" in capsys.readouterr().out


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(spec_file: Path, *args: str) -> subprocess.CompletedProcess:
    # a fresh process: this session's own Ray (other tests') would otherwise be joined
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.run([sys.executable, "-m", "raygen.jobs.cli", "train", str(spec_file), *args],
                          cwd=spec_file.parent, capture_output=True, text=True, env=env, timeout=240)


def test_a_run_that_fails_before_it_starts_leaves_no_folder(spec_file):
    address = f"127.0.0.1:{_closed_port()}"
    for _ in range(2):
        done = _train(spec_file, "--address", address)
        assert done.returncode == 2 and "cannot reach the Ray cluster" in done.stderr, done.stderr
        assert not (spec_file.parent / "runs").exists() or not any((spec_file.parent / "runs").iterdir())
    # a resumed run that cannot start keeps the folder it came to continue
    earlier = spec_file.parent / "runs" / "t"
    earlier.mkdir(parents=True)
    (earlier / "run.json").write_text(json.dumps({"overrides": []}))
    done = _train(spec_file, "--resume", "--address", address)
    assert done.returncode == 2 and (earlier / "run.json").is_file(), done.stderr
    assert sorted(p.name for p in (spec_file.parent / "runs").iterdir()) == ["t"]
