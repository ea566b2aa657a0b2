"""`raygen ui`: the MLflow UI on 127.0.0.1 against the embedded store."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading


def register(sub) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI for the run store")
    p.add_argument("--tracking-uri", help="default: sqlite:///runs/mlflow.db")
    p.add_argument("--run-dir", default="runs")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=run)


def ui_command(tracking_uri: str, host: str, port: int, artifacts: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
           "--host", host, "--port", str(port), "--workers", "1"]
    if artifacts:
        cmd += ["--artifacts-destination", artifacts]
    return cmd


def _check_bindable(host: str, port: int) -> None:
    """Fail before starting MLflow when host:port cannot be bound: the MLflow
    server logs the bind error and still exits 0."""
    import socket

    from raygen.jobs.cli import UserError
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: must be between 1 and 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UserError(f"--host {host}: cannot resolve it ({err.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no obstacle
        try:
            sock.bind(addr)
        except OSError as err:
            hint = "; pick another --port" if err.errno == errno.EADDRINUSE else ""
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}){hint}") from None


def run(args) -> int:
    from pathlib import Path

    from raygen.jobs.cli import UserError
    from raygen.tracking.store import _artifact_root, default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri(args.run_dir)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise UserError(f"no MLflow store at {uri}; train something first or pass --tracking-uri")
    _check_bindable(args.host, args.port)
    cmd = ui_command(uri, args.host, args.port, _artifact_root(uri))
    print(f"MLflow UI on http://{args.host}:{args.port} (store {uri}); Ctrl-C stops it", flush=True)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    # MLflow's job runner (GenAI scoring jobs, a handful of extra processes) plays no part in
    # browsing runs; without it SIGTERM stops the server in seconds instead of ~25 s.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # SIGTERM (kill PID, a supervisor) must stop the server too, not orphan it
    # still listening: turn it into the same path as Ctrl-C.
    previous, proc = None, None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        proc = subprocess.Popen(cmd, env=env)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if proc is not None and proc.poll() is None:
            proc.terminate()  # the MLflow server stops its uvicorn and job-runner children on SIGTERM
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
