"""`raygen submit status|logs|stop JOB` without --address: RAY_ADDRESS, else
the address `raygen submit run` used for that job (remembered in
~/.raygen/submit.json), else the last one; with none, one line that says
what to pass. The Jobs API client is a stand-in here: these tests are about
which address is used, and `test_cli_commands.py` covers a real refusal."""
from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from raygen.jobs import cmd_submit
from raygen.jobs.cli import main


class FakeJobs:
    """Records the dashboard each client was made for; answers like the SDK."""
    made: list[str] = []
    submitted = 0

    def __init__(self, address: str):
        FakeJobs.made.append(address)

    def submit_job(self, entrypoint, runtime_env):
        FakeJobs.submitted += 1
        return f"raysubmit_{FakeJobs.submitted}"

    def get_job_info(self, job_id):
        return type("Info", (), {"status": "RUNNING", "message": ""})()

    def get_job_logs(self, job_id):
        return f"logs of {job_id}\n"

    def stop_job(self, job_id):
        return True


@pytest.fixture
def jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    import ray.job_submission
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeJobs)
    FakeJobs.made = []
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: sub\ntrain: {steps: 2}\n")
    return spec


def run(capfd, *argv) -> tuple[int, str, str]:
    capfd.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return rc, out, err


def test_status_logs_stop_use_the_address_the_job_was_submitted_to(jobs, capfd):
    rc, out, _ = run(capfd, "submit", "run", jobs, "--address", "head-a:8265")
    assert rc == 0
    first = re.search(r"submitted (raysubmit_\d+)", out).group(1)
    assert f"raygen submit status {first}\n" in out and "--address" not in out.split("\n", 1)[1]
    run(capfd, "submit", "run", jobs, "--address", "http://head-b:8265")
    second = f"raysubmit_{FakeJobs.submitted}"
    FakeJobs.made = []
    for action in ("status", "logs", "stop"):
        assert run(capfd, "submit", action, first)[0] == 0
        assert run(capfd, "submit", action, second)[0] == 0
    assert FakeJobs.made == ["http://head-a:8265", "http://head-b:8265"] * 3
    # an unknown job goes to the last address; submit run without --address too
    FakeJobs.made = []
    assert run(capfd, "submit", "status", "raysubmit_elsewhere")[0] == 0
    assert run(capfd, "submit", "run", jobs)[0] == 0
    assert FakeJobs.made == ["http://head-b:8265"] * 2
    state = json.loads((Path.home() / ".raygen" / "submit.json").read_text())
    assert state["jobs"][first] == "head-a:8265" and state["last_address"] == "http://head-b:8265"


def test_address_flag_then_ray_address_win_over_what_is_remembered(jobs, capfd, monkeypatch):
    run(capfd, "submit", "run", jobs, "--address", "head-a:8265")
    job = f"raysubmit_{FakeJobs.submitted}"
    monkeypatch.setenv("RAY_ADDRESS", "http://from-env:8265")
    FakeJobs.made = []
    run(capfd, "submit", "status", job)
    run(capfd, "submit", "status", job, "--address", "flag:8265")
    assert FakeJobs.made == ["http://from-env:8265", "http://flag:8265"]


def test_ray_address_cannot_override_an_explicit_address(jobs, monkeypatch):
    """Ray's own client lets RAY_ADDRESS replace the address it is given."""
    import os

    seen = []
    monkeypatch.setattr(FakeJobs, "__init__", lambda self, address: seen.append((address, os.environ.get("RAY_ADDRESS"))))
    monkeypatch.setenv("RAY_ADDRESS", "http://from-env:8265")
    cmd_submit._client("flag:8265")
    assert seen == [("http://flag:8265", None)]
    assert os.environ["RAY_ADDRESS"] == "http://from-env:8265"  # restored afterwards


def test_no_address_anywhere_is_one_line_naming_the_fixes(jobs, capfd):
    for argv in (["submit", "status", "raysubmit_1"], ["submit", "run", jobs]):
        rc, _, err = run(capfd, *argv)
        assert rc == 2 and err.count("\n") == 1, err
        assert "--address http://HEAD:8265" in err and "RAY_ADDRESS" in err
    assert FakeJobs.made == []


def test_an_unreachable_address_from_ray_address_says_where_it_came_from(tmp_path, monkeypatch, capfd):
    """The real client, against a closed port: the one-line error names RAY_ADDRESS."""
    monkeypatch.setenv("HOME", str(tmp_path))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    rc, _, err = run(capfd, "submit", "status", "raysubmit_1")
    assert rc == 2 and err.count("\n") == 1, err
    assert f"cannot reach the Ray cluster at http://127.0.0.1:{port} (from RAY_ADDRESS)" in err
