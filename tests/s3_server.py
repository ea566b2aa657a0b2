"""A local S3 endpoint (moto_server) and an MLflow tracking server whose
artifact root is on it, for the object-storage tests.

Both are subprocesses on 127.0.0.1 and a free port, stopped by the pid this
module started. The S3 fixture sets the standard AWS variables (the only
place raygen, boto3 and MLflow take the endpoint and keys from) for the test.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
BUCKET = "raygen-test"
#: a recognisable fake secret: tests grep outputs and logs for it
SECRET = "raygen-s3-secret-do-not-log-7f3a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url}: server not up after {timeout:.0f} s: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server this module started (by its pid) and its children."""
    import psutil
    try:
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=10)


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    env: dict[str, str]
    pid: int

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def start_s3(log_dir: Path) -> tuple[S3Server, subprocess.Popen]:
    port = free_port()
    log = log_dir / "moto_server.log"
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_http(endpoint + "/moto-api/", proc, log, 60)
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "raygen-test-key",
               "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
        server = S3Server(endpoint=endpoint, bucket=BUCKET, env=env, pid=proc.pid)
        server.client().create_bucket(Bucket=BUCKET)
    except BaseException:
        stop(proc)
        raise
    return server, proc


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A moto S3 endpoint with one bucket; the AWS variables point at it for
    the module's tests (and for the Ray workers they start)."""
    server, proc = start_s3(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop(proc)


@dataclass
class MlflowServer:
    uri: str
    artifact_root: str
    pid: int
    log: Path


def start_mlflow(s3: S3Server, work: Path) -> tuple[MlflowServer, subprocess.Popen]:
    """`mlflow server`: sqlite backend in `work`, artifacts proxied to S3."""
    port = free_port()
    log = work / "mlflow_server.log"
    root = s3.uri("mlflow")
    env = {**os.environ, **s3.env, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                             "--artifacts-destination", root, "--workers", "1"],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, cwd=work)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(uri + "/health", proc, log, 120)
    except BaseException:
        stop(proc)
        raise
    return MlflowServer(uri=uri, artifact_root=root, pid=proc.pid, log=log), proc


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):
    """An `mlflow server` (sqlite backend, artifact root on the S3 fixture)."""
    server, proc = start_mlflow(s3_server, tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        stop(proc)
