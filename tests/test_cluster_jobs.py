"""Ray Jobs and token auth against a real cluster (issue 16, items 2 and 5).

The fast tests use a stand-in Jobs client for what raygen prints; the slow
ones start the 2-node cluster with Ray token auth on (tests/ray_cluster.py)
and drive `raygen submit` and `raygen train --address` as a user would,
in fresh processes."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from raygen.jobs.cli import main
from test_cluster_placement import SPEC, raygen

TOKEN = "rgtest-" + "k3y" * 12  # long enough that a leak cannot be a coincidence


class FailedJobs:
    """Answers like the SDK for one failed job with a 30-line log."""
    def __init__(self, address):
        pass

    def get_job_info(self, job_id):
        return type("Info", (), {"status": "JobStatus.FAILED",
                                 "message": "Job entrypoint command failed with exit code 2, last available logs:\n..."})()

    def get_job_logs(self, job_id):
        return "".join(f"log line {i}\n" for i in range(30))

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus
        return JobStatus.FAILED

    def list_jobs(self):
        row = type("Job", (), {"submission_id": "raysubmit_b", "job_id": "02000000", "status": "JobStatus.RUNNING",
                               "start_time": 1_764_500_000_000, "entrypoint": "raygen train spec.yaml"})
        old = type("Job", (), {"submission_id": None, "job_id": "01000000", "status": "JobStatus.SUCCEEDED",
                               "start_time": 1_764_400_000_000, "entrypoint": "python driver.py"})
        return [row, old]


@pytest.fixture
def failed_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import ray.job_submission
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FailedJobs)


def test_a_failed_job_shows_its_reason_and_last_log_lines_and_exits_1(failed_jobs, capfd):
    rc = main(["submit", "status", "raysubmit_a", "--address", "head:8265"])
    out, err = capfd.readouterr()
    assert rc == 1
    assert "job raysubmit_a FAILED: Job entrypoint command failed with exit code 2" in err
    assert "log line 29" in err and "log line 10" in err and "log line 9\n" not in err  # the last 20 lines
    # following a failing job: the log streams, then the reason, and a non-zero exit
    rc = main(["submit", "logs", "raysubmit_a", "--follow", "--address", "head:8265"])
    out, err = capfd.readouterr()
    assert rc == 1 and "log line 0\n" in out and "job raysubmit_a FAILED" in err


def test_list_shows_every_job_oldest_first(failed_jobs, capfd):
    assert main(["submit", "list", "--address", "head:8265"]) == 0
    lines = capfd.readouterr().out.splitlines()
    assert lines[0].split() == ["JOB", "STATUS", "STARTED", "ENTRYPOINT"]
    assert lines[1].split()[:2] == ["01000000", "SUCCEEDED"] and lines[1].endswith("python driver.py")
    assert lines[2].split()[:2] == ["raysubmit_b", "RUNNING"]


def test_a_spec_outside_the_uploaded_folder_is_refused(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "elsewhere").mkdir()
    spec = tmp_path / "elsewhere" / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    here = tmp_path / "project"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["submit", "run", str(spec), "--address", "head:8265"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "is outside the current folder" in err


def test_a_missing_or_empty_token_file_is_one_line(tmp_path, capfd):
    (tmp_path / "empty").write_text("\n")
    for path, words in ((tmp_path / "nope", "No such file"), (tmp_path / "empty", "is empty")):
        rc = main(["submit", "status", "raysubmit_1", "--address", "head:8265", "--token-file", str(path)])
        err = capfd.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and words in err, err


# ---------------------------------------------------------------- against a real cluster
@pytest.fixture(scope="module")
def auth_cluster(tmp_path_factory):
    from ray_cluster import two_node_cluster
    tmp = tmp_path_factory.mktemp("auth-cluster")
    with two_node_cluster(tmp, auth_token=TOKEN) as cluster:
        yield cluster


@pytest.fixture
def project(tmp_path, auth_cluster):
    """A user's project folder: the spec, a token file, and things an upload must leave out."""
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "old-checkpoint.bin").write_bytes(b"\0" * (8 << 20))  # runs/ is never uploaded
    return tmp_path


def no_token_anywhere(*texts: str, folders: tuple[Path, ...] = ()) -> None:
    for text in texts:
        assert TOKEN not in text
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and path.name != "token" and path.stat().st_size < (4 << 20):
                assert TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_without_the_token_train_and_submit_are_refused_in_one_line(project, auth_cluster):
    for argv in (["submit", "list", "--address", auth_cluster.dashboard_url],
                 ["train", "spec.yaml", "--address", auth_cluster.address]):
        proc = raygen(argv, project, auth_cluster.env, timeout=180)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        (line,) = [x for x in proc.stderr.splitlines() if "error" in x.lower()]  # one line, no traceback
        assert line.startswith(f"raygen {argv[0]}: error: the Ray cluster at ") and "Traceback" not in proc.stderr
        assert "requires a Ray auth token" in line and "--token-file" in line and "RAY_AUTH_TOKEN" in line


@pytest.mark.slow
@pytest.mark.e2e  # Ray Jobs and training runs on the 2-node cluster: minutes
@pytest.mark.timeout(600)  # a hang guard on a loaded machine, not a speed check
def test_jobs_run_follow_list_status_stop_and_a_failure_with_the_token(project, auth_cluster):
    env = dict(auth_cluster.env, RAY_AUTH_TOKEN=TOKEN)  # the token from the environment here, a file below
    url = auth_cluster.dashboard_url
    started = time.monotonic()
    ok = raygen(["submit", "run", "spec.yaml", "--address", url, "--follow"], project, env, timeout=400)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    job = re.search(r"submitted (raysubmit_\w+)", ok.stdout).group(1)
    assert "Run finished" in ok.stdout and f"job {job} ended: SUCCEEDED" in ok.stdout
    # the upload: the project folder without runs/ (a working_dir package unpacked on the head)
    unpacked = [p for p in auth_cluster.root.glob("h/session_*/runtime_resources/working_dir_files/*") if p.is_dir()]
    assert unpacked and all((p / "spec.yaml").is_file() and not (p / "runs" / "old-checkpoint.bin").exists()
                            for p in unpacked)

    # a job that fails on the cluster: more workers than its CPUs (only the cluster knows that)
    bad = raygen(["submit", "run", "spec.yaml", "--address", url, "--set", "scale.workers=64",
                  "--token-file", "token"], project, auth_cluster.env, timeout=120)
    assert bad.returncode == 0, bad.stderr
    failed = re.search(r"submitted (raysubmit_\w+)", bad.stdout).group(1)
    for _ in range(90):
        state = raygen(["submit", "status", failed, "--token-file", "token"], project, auth_cluster.env, timeout=60)
        if state.returncode != 0 or "RUNNING" not in state.stdout and "PENDING" not in state.stdout:
            break
        time.sleep(2)
    assert state.returncode == 1, state.stdout + state.stderr
    assert f"job {failed} FAILED" in state.stderr and "last" in state.stderr
    assert "64 workers × 0.5 CPU exceed the cluster's 4 CPUs" in state.stderr  # the run's own error, in the last lines

    # a job stopped while it runs
    long = raygen(["submit", "run", "spec.yaml", "--address", url, "--set", "train.steps=100000"], project, env)
    stopped = re.search(r"submitted (raysubmit_\w+)", long.stdout).group(1)
    for _ in range(60):
        if "RUNNING" in raygen(["submit", "status", stopped], project, env, timeout=60).stdout:
            break
        time.sleep(2)
    halt = raygen(["submit", "stop", stopped], project, env)
    assert halt.returncode == 0 and f"stopping: {stopped}" in halt.stdout, halt.stdout + halt.stderr
    for _ in range(60):
        state = raygen(["submit", "status", stopped], project, env, timeout=60)
        if state.returncode != 0:
            break
        time.sleep(2)
    assert state.returncode == 1 and f"job {stopped} STOPPED" in state.stderr, state.stdout + state.stderr

    listed = raygen(["submit", "list", "--address", url, "--token-file", "token"], project, auth_cluster.env)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()[1:]}
    assert rows[job] == "SUCCEEDED" and rows[failed] == "FAILED" and rows[stopped] == "STOPPED"
    logs = raygen(["submit", "logs", job, "--token-file", "token"], project, auth_cluster.env)
    assert logs.returncode == 0 and "Run finished" in logs.stdout
    no_token_anywhere(ok.stdout, ok.stderr, bad.stdout, bad.stderr, long.stdout, halt.stdout, state.stdout,
                      state.stderr, listed.stdout, logs.stdout, folders=(project,))
    print(f"jobs round trip: {time.monotonic() - started:.0f}s")


@pytest.mark.slow
@pytest.mark.e2e  # Ray Jobs and training runs on the 2-node cluster: minutes
@pytest.mark.timeout(600)
def test_train_address_with_a_token_file_runs_and_never_shows_the_token(project, auth_cluster):
    proc = raygen(["train", "spec.yaml", "--address", auth_cluster.address, "--token-file", "token", "--verbose",
                   "--set", "scale.placement=spread"], project, auth_cluster.env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Run finished" in proc.stdout
    no_token_anywhere(proc.stdout, proc.stderr, folders=(project,))


def test_token_file_hands_ray_the_path_and_messages_never_carry_the_token(tmp_path, monkeypatch):
    from ray.exceptions import AuthenticationError

    from raygen.jobs.cmd_train import resume_command
    from raygen.train.cluster import is_auth_refusal, needs_token_message, redact, token_auth
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    file = tmp_path / "token"
    file.write_text(TOKEN + "\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "an-older-token-in-the-env")
    token_auth(str(file))
    import os
    assert (os.environ["RAY_AUTH_MODE"], os.environ["RAY_AUTH_TOKEN_PATH"]) == ("token", str(file))
    assert "RAY_AUTH_TOKEN" not in os.environ  # it would win over the file
    assert redact(f"Bearer {TOKEN} refused") == "Bearer <token> refused"
    # ray.init wraps the refusal in a ConnectionError; the message says what to set, never the token
    try:
        try:
            raise AuthenticationError("RPC error: InvalidAuthToken: Authentication token is missing or incorrect.")
        except AuthenticationError as inner:
            raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379") from inner
    except ConnectionError as err:
        assert is_auth_refusal(err)
        line = needs_token_message("the Ray cluster at '127.0.0.1:6379'", err)
    assert "refused the auth token given" in line and "--token-file" in line and TOKEN not in line
    assert not is_auth_refusal(ConnectionError("Connection refused"))
    args = type("A", (), {"spec": "s.yaml", "address": "h:6379", "tracking_uri": None, "ray_token_file": str(file)})
    assert resume_command(args, []).endswith(f"--address h:6379 --token-file {file}")


def test_a_token_in_the_environment_turns_token_mode_on_unless_a_mode_is_set(monkeypatch):
    import os

    from raygen.train.cluster import token_auth
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    token_auth(None)
    assert os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user's explicit choice stands
    token_auth(None)
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
