"""`raygen serve` and Serve's own `serve run` as a user runs them: subprocesses
with their own embedded Ray, bound to 127.0.0.1 on a free port, stopped by pid."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import test_serving_family as toy

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log, timeout: float = 150.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"raygen serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            # the banner is printed once serve.run returns, which can be a moment after the first 200
            if httpx.get(url + "/healthz", timeout=2).status_code == 200 and "Press Ctrl-C" in log.read_text():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"raygen serve did not become healthy in {timeout} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def serve_cli(tmp_path: Path, *args: str):
    """`raygen serve ARGS` as a user runs it: a subprocess with its own embedded Ray (no RAY_ADDRESS),
    its output in tmp_path/serve.log; killed by pid if the test leaves it running. Yields (process, log)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "raygen.jobs.cli", "serve", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def stop_with_sigterm(proc: subprocess.Popen, url: str, log) -> None:
    """SIGTERM to the server we started: it shuts down cleanly (exit 0) and the port stops answering."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0, log.read_text()[-4000:]
    assert "SIGTERM received, shutting down" in log.read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/healthz", timeout=2)


# one model: its replica holds the front door (ModelServer); two: an ingress routes to generator replicas
@pytest.mark.timeout(600)  # the replicas start on a loaded 2-core machine
@pytest.mark.parametrize("models", [1, pytest.param(2, marks=pytest.mark.e2e)], ids=["one-model", "two-models"])
def test_cli_serves_and_stops_on_sigterm(tmp_path, models):
    model = toy.export_toy(tmp_path / "model", name="cli-toy", resolution=8, channels=1, num_classes=2,
                           class_names=["on", "off"], conditioning="label", run_id="cli-run")
    second = toy.export_toy(tmp_path / "second", name="second", resolution=8, channels=1)
    given = ["--model", str(model)] + (["--model", str(second)] if models == 2 else [])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # no --replica-cpus: on a 2-core machine two models at 1 CPU each never fit; they get shares
    with serve_cli(tmp_path, *given, "--port", str(port), "--import", toy.FILE, "--set", "serve.max_n=4",
                   # a tiny queue and a short timeout, so overload and slowness can be shown
                   "--set", "serve.max_batch_size=1", "--set", "serve.max_queued_requests=1",
                   "--set", "serve.request_timeout_s=2") as (proc, log):
        wait_healthy(proc, url, log, timeout=300.0)
        printed = log.read_text()
        assert f"at {url}" in printed and "cli-toy: servetoy, 8x8x1, 2 classes, run cli-run" in printed
        assert f"{models} model(s)" in printed
        share = float(printed.split("replica(s) per model at ")[1].split()[0])
        assert 0 < share <= 1
        if models == 2:
            assert "second: servetoy, 8x8x1, unconditional" in printed
            other = httpx.post(url + "/v1/generate", json={"model": "second", "n": 3, "seed": 4}, timeout=60)
            assert other.status_code == 200 and [i["seed"] for i in other.json()["images"]] == [4, 5, 6]

        r = httpx.post(url + "/v1/generate", json={"n": 2, "label": "off", "seed": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert (r.json()["model"], r.json()["run_id"], len(r.json()["images"])) == ("cli-toy", "cli-run", 2)
        # the --set override reached the app, and a server started without --scorer refuses best_of
        assert httpx.post(url + "/v1/generate", json={"n": 5}).json()["field"] == "n"
        no_scorer = httpx.post(url + "/v1/generate", json={"best_of": 2, "label": 0})
        assert (no_scorer.status_code, no_scorer.json()["field"]) == (400, "best_of")
        assert "--scorer" in no_scorer.json()["error"]

        # overload: one model replica holds 2 requests and queues 1 more; the rest are refused at once
        with ThreadPoolExecutor(max_workers=8) as pool:
            slow = list(pool.map(lambda i: httpx.post(url + "/v1/generate", json={"seed": i, "delay_s": 0.25},
                                                      timeout=30), range(8)))
        codes = sorted(r.status_code for r in slow)
        # how many fit depends on timing (a loaded CI machine admits fewer): some pass, the overflow is refused
        assert codes.count(200) >= 1 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
        busy = next(r for r in slow if r.status_code == 503)
        assert "max_queued_requests" in busy.json()["error"] and busy.headers["retry-after"] == "1"
        # slowness: a generation longer than serve.request_timeout_s is a JSON 504, not a hang
        started = time.monotonic()
        late = httpx.post(url + "/v1/generate", json={"delay_s": 4.0}, timeout=30)
        assert late.status_code == 504 and "request_timeout_s" in late.json()["error"]
        assert time.monotonic() - started < 4.0  # cut off before the 4 s generation could finish

        stop_with_sigterm(proc, url, log)


def test_cli_reports_a_bad_model_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "raygen.jobs.cli", "serve", "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("raygen serve: error: model not found") and "Traceback" not in done.stderr


def test_cli_refuses_a_model_that_cannot_sample(tmp_path):
    from raygen.exports import export_generator
    from raygen.models import build_model, get_family
    from raygen.spec import parse_spec

    config, info = next(iter(get_family("clip").debug().values()))
    spec = parse_spec({"name": "scorer", "model": {"family": "clip", "options": config.model_dump(mode="json")}})
    path = export_generator(tmp_path / "clip", build_model("clip", config, info).state_dict(), spec, info)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "raygen.jobs.cli", "serve", "--model", str(path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot sample images" in lines[0] and "lacks capability 'sample'" in lines[0]


def test_cli_refuses_replicas_that_cannot_fit_at_once(tmp_path):
    model = toy.export_toy(tmp_path / "model", name="big", resolution=8, channels=1)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "raygen.jobs.cli", "serve", "--model", str(model),
                           "--import", toy.FILE, "--replica-cpus", "4096", "--port", str(free_port())],
                          capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    line = next(ln for ln in done.stderr.splitlines() if ln.startswith("raygen serve: error:"))
    # one model: no separate ingress, so the replica's 4096 CPUs are all it needs
    assert "needs 4096 CPUs" in line and "the Ray cluster has" in line and "free)" in line, line


# ---------------------------------------------------------------- Serve's own CLI: `serve run`
def _serve_run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`serve run ...` in a private Ray temp folder (short: Ray's socket paths); whatever Ray
    processes it leaves behind are found by that folder and stopped by pid."""
    private = tempfile.mkdtemp(prefix="rg-sr-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=private, TMPDIR=private, HOME=private)
    serve_cli = str(Path(sys.executable).with_name("serve"))
    try:
        return subprocess.run([serve_cli, "run", *args], capture_output=True, text=True, env=env, cwd=cwd,
                              timeout=timeout)
    finally:
        left = subprocess.run(["pgrep", "-f", private], capture_output=True, text=True).stdout.split()
        for pid in left:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(private, ignore_errors=True)


def test_serve_run_with_a_bad_model_exits_with_the_load_error(tmp_path):
    done = _serve_run(["raygen.serving.app:build_app", f"model={tmp_path / 'missing'}"], tmp_path, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("raygen.serving: error: model not found") and "Traceback" not in done.stderr


def test_serve_run_of_a_config_with_a_bad_model_exits(tmp_path):
    # Serve builds a config file's app in a Ray task and `serve run` would otherwise sleep forever
    config = tmp_path / "bad.yaml"
    config.write_text(f"""
proxy_location: HeadOnly
http_options: {{host: 127.0.0.1, port: {free_port()}}}
applications:
  - name: raygen
    route_prefix: /
    import_path: raygen.serving.app:build_app
    args:
      models: [{tmp_path / 'missing'}]
""")
    done = _serve_run([str(config)], tmp_path, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    lines = [ln for ln in output.splitlines() if "raygen.serving: error:" in ln]
    assert lines and lines[0].split("raygen.serving: error: ", 1)[1].startswith(f"model not found: {tmp_path}")


# ---------------------------------------------------------------- `raygen serve --config FILE`
@pytest.mark.timeout(600)
def test_cli_serves_from_the_example_config_and_stops_on_sigterm(tmp_path):
    """serving/config.yaml, with its model path and port swapped for a test's: `raygen serve --config` comes up
    with the file's deployment settings, answers (a plain and a streamed request), and stops on SIGTERM."""
    import yaml

    model = toy.export_toy(tmp_path / "model", name="cfg-toy", resolution=8, channels=1, run_id="cfg-run")
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "serving" / "config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"].update(models=[f"cfg={model}"], imports=[toy.FILE])
    assert app["deployments"][0]["name"] == "model-quickstart"
    app["deployments"][0]["name"] = "model-cfg"  # the file's settings, for this model's deployment
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{port}"
    with serve_cli(tmp_path, "--config", str(path)) as (proc, log):
        wait_healthy(proc, url, log, timeout=300.0)
        printed = log.read_text()
        assert f"1 model(s) at {url}" in printed and "cfg: servetoy, 8x8x1, unconditional, run cfg-run" in printed
        assert "max_n 16, batch 8, queue 64, timeout 120 s" in printed  # the file's serve settings
        r = httpx.post(url + "/v1/generate", json={"n": 2, "seed": 1}, timeout=60)
        assert r.status_code == 200 and (r.json()["run_id"], len(r.json()["images"])) == ("cfg-run", 2), r.text
        streamed = httpx.post(url + "/v1/generate", json={"n": 2, "seed": 1, "stream": True}, timeout=60)
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert streamed.text.startswith("event: result\n") and r.json()["images"][0]["png_base64"] in streamed.text
        stop_with_sigterm(proc, url, log)


def test_cli_serves_in_process_without_ray_and_stops_on_sigterm(tmp_path):
    """`--in-process`: the same API from one process, no Ray started (the low-overhead path)."""
    model = toy.export_toy(tmp_path / "model", name="inproc", resolution=8, channels=1, num_classes=2,
                           class_names=["on", "off"], conditioning="label", run_id="inproc-run")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serve_cli(tmp_path, "--in-process", "--model", str(model), "--port", str(port), "--import", toy.FILE) as (proc, log):
        wait_healthy(proc, url, log, timeout=120.0)
        assert "in process (no Ray)" in log.read_text()
        r = httpx.post(url + "/v1/generate", json={"n": 2, "label": "off", "seed": 3}, timeout=60)
        assert r.status_code == 200, r.text
        assert (r.json()["run_id"], [i["seed"] for i in r.json()["images"]]) == ("inproc-run", [3, 4])
        bad = httpx.post(url + "/v1/generate", json={"n": 2, "label": "nope"}, timeout=30)
        assert bad.status_code in (400, 422) and bad.json()["field"] == "label"
        # no Ray: nothing of this server shows up as a Ray process
        import psutil
        assert not [p for p in psutil.Process(proc.pid).children(recursive=True) if "ray" in " ".join(p.cmdline())]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-4000:]
        assert "raygen serve: SIGTERM received, stopped" in log.read_text()
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/healthz", timeout=2)


def test_in_process_refuses_an_address(tmp_path):
    done = subprocess.run([sys.executable, "-m", "raygen.jobs.cli", "serve", "--in-process", "--model", "x",
                           "--address", "127.0.0.1:1"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode != 0 and "--in-process runs without Ray: leave out --address" in done.stderr
