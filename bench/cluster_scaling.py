"""Images/s of one spec on a 1-node and on a 2-node Ray cluster, with the same
total number of workers: what crossing nodes costs (or gains).

    .venv/bin/python bench/cluster_scaling.py            # a few minutes on 2 cores
    .venv/bin/python bench/cluster_scaling.py --smoke    # tiny (CI): that it runs, not a figure

First the laptop way (no --address: raygen starts an embedded Ray), then
two real `ray start` clusters on this machine (tests/ray_cluster.py): a head alone (`scale.placement=pack`: both workers on it), and a head plus a
second node on 127.0.0.2 (`scale.placement=strict_spread`: one worker on
each). Each run is `raygen train SPEC --address HEAD:PORT` in a fresh
process: the same spec file, only `--address` and `scale.*` differ. The
figure is the median of the run's own `images_per_s` step metric (global,
all workers) after a warm-up, read from the run's MLflow store.

On one machine both "nodes" share the same cores, so this measures the
cost of crossing nodes (object transfer between raylets, gloo between
hosts), not the gain of more hardware. It needs a loopback-only network
namespace (Ray listens on every interface otherwise): it re-executes
itself under `unshare -n` (`unshare -rn` when not root).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SPEC = {"name": "scale", "run_dir": "runs",
        "data": {"dataset": "digits", "root": "data", "resolution": 8, "count": 1024, "batch_size": 32},
        "model": {"family": "seqimg", "options": {"backbone": "gpt2", "dim": 32, "depth": 2, "heads": 2}},
        "train": {"steps": 120, "log_every": 1, "eval_every": 10**6, "checkpoint_every": 10**6, "val_batches": 1,
                  "grid_samples": 4},
        "scale": {"workers": 2, "strategy": "ddp", "cpus_per_worker": 0.5},
        "track": {"fid": {"enabled": False}, "register_model": False}}
# (label, nodes, scale.placement); 0 nodes: no --address, the embedded Ray a laptop run starts
LAYOUTS = (("laptop", 0, "pack"), ("1 node", 1, "pack"), ("2 nodes", 2, "strict_spread"))


def loopback_only() -> bool:
    """Only `lo` in this network namespace (if_nameindex asks the kernel; /sys/class/net may be the host's)."""
    import socket
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def reexec_isolated(argv: list[str]) -> int:
    """Run this script again in a fresh network namespace with only `lo` up."""
    if os.environ.get("RAYGEN_BENCH_ISOLATED"):  # never re-execute twice
        print("cluster_scaling: needs a loopback-only network namespace, and `unshare -n` did not give one",
              file=sys.stderr)
        return 2
    cmd = " ".join(["ip link set lo up && exec", sys.executable, str(Path(__file__).resolve()), *argv])
    flags = "-n" if os.geteuid() == 0 else "-rn"  # not root: a user namespace as well
    return subprocess.call(["unshare", flags, "bash", "-c", cmd], env={**os.environ, "RAYGEN_BENCH_ISOLATED": "1"})


def run_once(folder: Path, nodes: int, placement: str, steps: int, warmup: int) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from ray_cluster import two_node_cluster
    from mlflow.tracking import MlflowClient

    spec = folder / "spec.yaml"
    if not spec.exists():
        spec.write_text(yaml.safe_dump(SPEC))
    name = f"scale-{nodes}n"
    argv = [sys.executable, "-m", "raygen.jobs.cli", "train", str(spec), "--set", f"name={name}",
            "--set", f"train.steps={steps}", "--set", f"scale.placement={placement}"]
    with two_node_cluster(folder, nodes=nodes) if nodes else contextlib.nullcontext() as cluster:
        env = cluster.env if cluster else {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
        started = time.monotonic()
        proc = subprocess.run(argv + (["--address", cluster.address] if cluster else []),
                              cwd=folder, env=env, capture_output=True, text=True, timeout=1800)
        wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    run_dir = folder / "runs" / name
    state = json.loads((run_dir / "run.json").read_text())
    history = MlflowClient(state["tracking_uri"]).get_metric_history(state["mlflow_run_id"], "images_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step) if m.step > warmup]
    nodes_used = sorted({json.loads(line)["node_ip"] for line in (run_dir / "workers.jsonl").read_text().splitlines()})
    return {"nodes": nodes, "placement": placement, "worker_nodes": nodes_used, "steps": steps,
            "images_per_s_median": statistics.median(rates), "images_per_s_mean": statistics.fmean(rates),
            "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny run: that it works, not a figure")
    p.add_argument("--steps", type=int, default=120)
    args = p.parse_args(argv)
    if not loopback_only():
        return reexec_isolated(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    steps, warmup = (6, 2) if args.smoke else (args.steps, 20)
    base = os.environ.get("RAY_TMPDIR")
    folder = Path(tempfile.mkdtemp(prefix="rg-cscale-", dir=base or None))
    rows = []
    try:
        for label, nodes, placement in LAYOUTS:
            row = run_once(folder, nodes, placement, steps, warmup)
            rows.append(row)
            print(f"{label:8s} ({placement:13s}, workers on {', '.join(row['worker_nodes'])}): "
                  f"{row['images_per_s_median']:.0f} img/s median over steps {warmup + 1}-{steps}, "
                  f"run {row['wall_s']:.0f}s", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ratio = rows[2]["images_per_s_median"] / rows[1]["images_per_s_median"]
    print(f"2 nodes / 1 node images/s, same 2 workers: {ratio:.2f} (the same spec file each time: "
          "only --address and scale.placement differ)")
    if not args.smoke:
        out = REPO / "bench" / "results" / f"cluster_scaling_cpu_{datetime.date.today()}.json"
        out.write_text(json.dumps({"spec": SPEC, "rows": rows, "ratio_2n_over_1n": ratio,
                                   "machine": f"{os.cpu_count()} cores, both nodes on it",
                                   "load_average_at_end": os.getloadavg()}, indent=2))
        print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
