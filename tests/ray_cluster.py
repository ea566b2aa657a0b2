"""A real 2-node Ray cluster on this machine, for tests.

    from ray_cluster import two_node_cluster

    with two_node_cluster(tmp_path) as cluster:
        cluster.address        # "127.0.0.1:PORT": the GCS, for `raygen train --address`
        cluster.dashboard_url  # "http://127.0.0.1:PORT": for `raygen submit --address`
        cluster.env            # os.environ plus what a client of this cluster needs
                               # (RAY_AUTH_MODE, a private HOME, this venv first on PATH)
        cluster.raylet_pid("127.0.0.2")  # the second node's raylet, e.g. to kill it
        cluster.alive_nodes()  # node IPs Ray reports alive

A head (`ray start --head --node-ip-address 127.0.0.1`) and a second node
(`--node-ip-address 127.0.0.2`) with `cpus` CPUs each, free ports, the
dashboard on 127.0.0.1, and a short private temp dir per node under one
root (`nodes=1`: the head alone). The context returns once Ray lists the
nodes alive. On exit it stops
only its own processes, by pid (conftest.stop_own_ray_processes on that
root), never Ray's forced stop, which would end every Ray process on the machine.

Run tests that use it inside a loopback-only network namespace
(`unshare -n bash -c 'ip link set lo up; ...'`): 127.0.0.2 is on `lo` there,
and nothing Ray opens is reachable from outside. Clients that train on the
cluster are best run as subprocesses with `cluster.env`: the test process
may already hold the session Ray (conftest's `ray_session`).

`auth_token="..."` starts the cluster with Ray token auth
(`RAY_AUTH_MODE=token`, the token in `RAY_AUTH_TOKEN` for the cluster's own
processes); `cluster.env` then carries the mode but *not* the token, so a
test decides how (or whether) its client gets it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from conftest import stop_own_ray_processes

RAY = str(Path(sys.executable).with_name("ray"))
HEAD_IP, WORKER_IP = "127.0.0.1", "127.0.0.2"


@dataclass
class Cluster:
    address: str
    dashboard_url: str
    root: Path
    env: dict[str, str]
    auth_token: str | None = None
    log: Path = field(default=None)  # `ray start` output of both nodes

    def _get(self, path: str) -> dict:
        req = urllib.request.Request(self.dashboard_url + path)
        if self.auth_token:
            req.add_header("Authorization", f"Bearer {self.auth_token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def alive_nodes(self) -> list[str]:
        """IPs of the nodes Ray lists alive (the dashboard's state API)."""
        rows = self._get("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return sorted(row["node_ip"] for row in rows if row["state"] == "ALIVE")

    def raylet_pid(self, node_ip: str) -> int:
        """The pid of the raylet of the node at `node_ip` (of this cluster only)."""
        import psutil
        for proc in psutil.process_iter(["pid", "name", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if "raylet" in (proc.info["name"] or "") and str(self.root) in cmd and f"--node_ip_address={node_ip}" in cmd:
                return proc.pid
        raise LookupError(f"no raylet for {node_ip} under {self.root}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HEAD_IP, 0))
        return sock.getsockname()[1]


def _node_ports() -> list[str]:
    """Every port a node would otherwise take at a fixed default: two nodes
    on one machine (and the session Ray) must not fight over them."""
    return ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--node-manager-port", str(free_port()),
            "--object-manager-port", str(free_port())]


def _start(args: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "a") as out:
        proc = subprocess.run([RAY, "start", *args], env=env, stdout=out, stderr=subprocess.STDOUT, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args[:2])} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def two_node_cluster(tmp: Path, *, cpus: float = 2, object_store_mb: int = 150, auth_token: str | None = None,
                     timeout: float = 120.0, nodes: int = 2) -> Iterator[Cluster]:
    """Start the 2-node cluster; yield a `Cluster`; stop its processes (see the module docstring).
    `nodes=1`: the head alone, the same way (a one-node baseline for benchmarks)."""
    # Ray's socket paths must stay short: a private folder directly under /tmp, not under pytest's tmp_path
    root = Path(tempfile.mkdtemp(prefix="rgc-", dir="/tmp"))
    home = Path(tmp) / "home"  # no stray ~/.ray/auth_token, and `raygen submit` remembers jobs here
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token" if auth_token else "disabled",
           # the cluster runs `raygen` job entrypoints: this venv's, as a cluster's nodes have it installed
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    ray_env = dict(env, **({"RAY_AUTH_TOKEN": auth_token} if auth_token else {}))
    log = Path(tmp) / "ray_start.log"
    gcs_port, dash_port = free_port(), free_port()
    cluster = Cluster(address=f"{HEAD_IP}:{gcs_port}", dashboard_url=f"http://{HEAD_IP}:{dash_port}", root=root,
                      env=env, auth_token=auth_token, log=log)
    common = ["--num-cpus", str(cpus), "--num-gpus", "0", "--object-store-memory", str(object_store_mb * 1024**2),
              "--disable-usage-stats"]
    try:
        _start(["--head", "--node-ip-address", HEAD_IP, "--port", str(gcs_port), "--dashboard-host", HEAD_IP,
                "--dashboard-port", str(dash_port), "--ray-client-server-port", str(free_port()),
                "--temp-dir", str(root / "h"), *common, *_node_ports()], ray_env, log)
        for attempt in range(3 if nodes == 2 else 0):  # `ray start` gives a node 30 s to register: too short on a loaded machine
            try:
                _start(["--address", cluster.address, "--node-ip-address", WORKER_IP, "--temp-dir", str(root / "w"),
                        *common, *_node_ports()], ray_env, log)
                break
            except RuntimeError:
                stop_own_ray_processes(root / "w", timeout=5.0)
                if attempt == 2:
                    raise
        deadline = time.monotonic() + timeout
        while True:
            try:
                if cluster.alive_nodes() == [HEAD_IP, WORKER_IP][:nodes]:
                    break
            except (OSError, KeyError, ValueError):  # the dashboard is still starting
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the 2-node cluster did not come up in {timeout:.0f}s; see {log}")
            time.sleep(1)
        yield cluster
    finally:
        stop_own_ray_processes(root, timeout=5.0)  # raylet and GCS linger on SIGTERM; the rest is SIGKILL
        shutil.rmtree(root, ignore_errors=True)
