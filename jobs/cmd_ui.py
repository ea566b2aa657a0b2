"""`raygen ui`: the MLflow UI on 127.0.0.1 against the embedded store."""
from __future__ import annotations

import os
import subprocess
import sys


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


def run(args) -> int:
    from pathlib import Path

    from raygen.jobs.cli import UserError
    from raygen.tracking.store import _artifact_root, default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri(args.run_dir)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise UserError(f"no MLflow store at {uri}; train something first or pass --tracking-uri")
    cmd = ui_command(uri, args.host, args.port, _artifact_root(uri))
    print(f"MLflow UI on http://{args.host}:{args.port} (store {uri}); Ctrl-C stops it", flush=True)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0
