"""Multi-node training on one machine (issue 16, item 1): `scale.placement`
reaches Ray Train's placement group, and the workers' own report of their
node (workers.jsonl in the run folder) shows where they ran."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raygen.spec import load_spec
from raygen.spec.errors import SpecError
from raygen.train.cluster import describe_placement, placement_strategy, worker_nodes

SPEC = {"name": "spread", "run_dir": "runs",
        "data": {"dataset": "digits", "root": "data", "resolution": 8, "count": 64, "batch_size": 16},
        "model": {"family": "seqimg", "options": {"backbone": "gpt2", "dim": 16, "depth": 1, "heads": 2}},
        "train": {"steps": 4, "log_every": 2, "eval_every": 4, "checkpoint_every": 4, "val_batches": 1,
                  "grid_samples": 4},
        "scale": {"workers": 2, "strategy": "ddp", "cpus_per_worker": 0.5},
        "track": {"fid": {"enabled": False}, "register_model": False}}


def write_spec(folder: Path, spec: dict = SPEC) -> Path:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def raygen(args: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI in a fresh process: the test process may hold the session Ray."""
    return subprocess.run([sys.executable, "-m", "raygen.jobs.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_placement_defaults_to_pack_and_maps_to_rays_strategy_names(tmp_path):
    spec = load_spec(write_spec(tmp_path), [])
    assert spec.scale.placement == "pack"  # Ray Train's own default: today's behaviour
    for name, ray_name in (("spread", "SPREAD"), ("strict_spread", "STRICT_SPREAD"), ("pack", "PACK")):
        assert placement_strategy(load_spec(write_spec(tmp_path), [f"scale.placement={name}"]).scale.placement) == ray_name


def test_a_bad_placement_names_the_field_and_the_choices(tmp_path):
    with pytest.raises(SpecError) as err:
        load_spec(write_spec(tmp_path), ["scale.placement=scatter"])
    text = str(err.value)
    assert "scale.placement" in text and "strict_spread" in text and "scatter" in text


def test_placement_is_read_from_each_ranks_last_start(tmp_path):
    lines = [{"rank": 0, "node_ip": "10.0.0.1"}, {"rank": 1, "node_ip": "10.0.0.2"},
             {"rank": 1, "node_ip": "10.0.0.1"}]  # rank 1 restarted on the first node
    (tmp_path / "workers.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert worker_nodes(tmp_path) == lines
    assert describe_placement(worker_nodes(tmp_path)) == "10.0.0.1: ranks 0, 1"
    assert describe_placement(lines[:2]) == "10.0.0.1: rank 0; 10.0.0.2: rank 1"
    assert worker_nodes(tmp_path / "nowhere") == []


@pytest.mark.slow
def test_the_two_node_cluster_comes_up_and_leaves_no_process_behind(tmp_path):
    """The fixture itself (tests/ray_cluster.py): two alive nodes on two IPs, and
    on exit none of its processes left, stopped by pid."""
    import psutil
    from ray_cluster import HEAD_IP, WORKER_IP, two_node_cluster

    with two_node_cluster(tmp_path, cpus=1) as cluster:
        assert cluster.alive_nodes() == [HEAD_IP, WORKER_IP]
        assert psutil.Process(cluster.raylet_pid(WORKER_IP)).is_running()
        root = str(cluster.root)
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if root in " ".join(p.info["cmdline"] or [])]
    assert left == []


@pytest.mark.slow
@pytest.mark.e2e  # a multi-node training run: minutes on a loaded 2-core machine
@pytest.mark.timeout(600)  # a hang guard on a loaded machine, not a speed check
def test_strict_spread_puts_one_worker_on_each_node_of_a_two_node_cluster(workdir):
    from ray_cluster import HEAD_IP, WORKER_IP, two_node_cluster

    spec = write_spec(workdir)
    with two_node_cluster(workdir) as cluster:
        started = time.monotonic()
        proc = raygen(["train", str(spec), "--address", cluster.address, "--set", "scale.placement=strict_spread"],
                      workdir, cluster.env)
        took = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = worker_nodes(workdir / "runs" / "spread")
    assert sorted(r["rank"] for r in records) == [0, 1]
    assert sorted(r["node_ip"] for r in records) == [HEAD_IP, WORKER_IP]
    assert len({r["node_id"] for r in records}) == 2
    assert f"workers on: {HEAD_IP}: rank" in proc.stdout and f"{WORKER_IP}: rank" in proc.stdout
    print(f"2-node strict_spread run: {took:.0f}s")
