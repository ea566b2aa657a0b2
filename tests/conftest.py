"""Shared test set-up: a quiet, private environment and one Ray per session.

Tests that start Ray or a server are marked `slow`; the suite is meant to run
inside a loopback-only network namespace (see Makefile `test`), so every
socket Ray opens is on 127.0.0.1.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYGEN_NO_PROGRESS", "1")
# Ray's socket paths must stay short: a private temp folder directly under /tmp.
_TMP = Path(tempfile.mkdtemp(prefix="rg-"))
os.environ.setdefault("RAY_TMPDIR", str(_TMP))


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole session (2 CPUs, small object store)."""
    import ray

    if not ray.is_initialized():
        # the dashboard's state API lets Ray Train clean up after stopped Tune trials
        ray.init(address="local", num_cpus=2, object_store_memory=400 * 1024**2,
                 include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False, _temp_dir=str(_TMP),
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()
    stop_own_ray_processes(_TMP)


def stop_own_ray_processes(temp_dir: Path, timeout: float = 15.0) -> list[int]:
    """Stop what is left of this session's Ray cluster, by pid: the processes
    whose command line names its unique temp folder, and their children.
    Never the forced `ray stop`: that kills every Ray process on the machine,
    a concurrent run's or test session's too."""
    import psutil

    me = os.getpid()
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != me and str(temp_dir) in " ".join(proc.info["cmdline"] or []):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found.setdefault(child.pid, child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found.pop(me, None)
    for proc in found.values():
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(found.values()), timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return sorted(found)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run a test in its own folder so `runs/` and friends land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
