"""Images per second of the serving app under concurrent HTTP clients, batching on vs off, same run.

The model is the quickstart's (jobs/specs/quickstart.yaml: seqimg, gpt2, dim 96,
depth 3, rowwise patches, categorical head, label-conditional, 16x16 grayscale
with 10 classes), built untrained and exported to a temp folder: speed does not
depend on training. One embedded Ray and one Serve instance host the same app
twice, one after the other, with the same settings but one:

    on   concurrent requests with equal sampling params are merged into ONE
         `model.sample` call (one torch.Generator per image) and split back
    off  the same `@serve.batch` collects them, but each request is sampled in
         a call of its own (`BatchSampler(merge=False)`)

Each client (asyncio, one keep-alive connection each) sends n=1 requests with
its own seeds and labels back to back; images/s is images over wall time
after a warm-up. The printed ratio is on/off.

Overhead: sequential n=1 requests over HTTP (JSON body, base64 PNG answer;
proxy -> the model's replica, which holds the front door when one model is
served) alternate with direct `model.sample`
calls of one image in this process (one thread, like a replica, whose CPU
share sets one sampling thread), so both see the same load on a shared
machine; the overhead is the median of the paired differences.
`--batch-wait-s` is the app's `serve.batch_wait_timeout_s`; at 0 a lone
request waits for nothing, and a busy replica batches the requests that
queued while its previous batch ran.

Run it in a loopback-only network namespace (Ray otherwise listens on the
machine's address):

    unshare -n bash -c 'ip link set lo up; .venv/bin/python bench/serve_batching.py'
    .venv/bin/python bench/serve_batching.py --smoke      # tiny model, few requests: seconds of work
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 3.0
TARGET_OVERHEAD_MS = 5.0
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def export_model(folder: Path, smoke: bool) -> Path:
    """The quickstart's model (or a tiny one for --smoke), untrained, exported like training does."""
    import torch
    import yaml

    from raygen.exports import export_generator
    from raygen.models import DataInfo, build_model
    from raygen.spec import parse_spec

    raw = yaml.safe_load((REPO / "jobs/specs/quickstart.yaml").read_text())
    raw["name"] = "bench-serve"
    if smoke:
        raw["data"]["resolution"] = 8
        raw["model"]["options"].update(dim=16, depth=1, heads=2)
    spec = parse_spec(raw)
    info = DataInfo(channels=spec.data.channels, resolution=raw["data"]["resolution"], num_classes=len(CLASSES),
                    class_names=CLASSES)
    torch.manual_seed(0)
    model = build_model(spec.model.family, spec.model.config, info)
    return export_generator(folder / "model", model.state_dict(), spec, info, meta={"run_id": "bench"})


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            out[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)
    return out


def serve_processes(scratch: Path) -> dict[str, int]:
    """The pids of this run's Serve proxy and model replica (children of its own raylet)."""
    procs = _processes()
    raylets = {pid for pid, (_, cmd) in procs.items() if "raylet" in cmd.split(" ")[0] and str(scratch) in cmd}
    found = {}
    for pid, (ppid, cmd) in procs.items():
        if ppid in raylets:
            for role, title in (("proxy", "ProxyActor"), ("replica", ":model-")):
                if title in cmd.split(" ")[0]:
                    found[role] = pid
    return found


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) a process has used, in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1e3 / os.sysconf("SC_CLK_TCK")


def direct_sampler(path: Path):
    """A function sampling one image directly (this process, one thread); returns (wall ms, CPU ms)."""
    import torch

    from raygen.exports import load_generator
    from raygen.models import Conditions
    from raygen.models.sampling import make_generators

    torch.set_num_threads(1)
    model = load_generator(str(path)).model
    params = model.sampling_params()

    def once(i: int) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.thread_time()
        with torch.inference_mode():
            model.sample(Conditions("label", (i % len(CLASSES),)), params, make_generators([i]))
        return (time.perf_counter() - start) * 1e3, (time.thread_time() - cpu) * 1e3

    for i in range(3):
        once(i)
    return once


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def load(url: str, clients: int, requests: int, seed0: int) -> tuple[float, int, list[float]]:
    """`clients` concurrent clients send `requests` n=1 requests in all. Returns (seconds, images, latencies ms)."""
    import httpx

    counter = iter(range(requests))
    latencies: list[float] = []
    images = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal images
        for i in counter:
            body = {"n": 1, "seed": seed0 + i, "label": (seed0 + i) % len(CLASSES)}
            start = time.perf_counter()
            r = await http.post(f"{url}/v1/generate", json=body)
            latencies.append((time.perf_counter() - start) * 1e3)
            if r.status_code != 200:
                raise RuntimeError(f"request {body} failed: {r.status_code} {r.text[:300]}")
            images += len(r.json()["images"])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - start, images, latencies


def paired_overhead(url: str, direct, repeats: int, pids: dict[str, int], handle) -> dict:
    """Sequential n=1 HTTP requests alternating with direct sample calls: the p50s and the p50 of the
    paired differences (HTTP minus direct). Also the CPU time the proxy and the model's replica
    spend per request (less their idle rate and the direct call's sampling CPU): the work the HTTP
    path adds, which a loaded machine's waits do not inflate."""
    import httpx

    # what the processes use while idle (metrics, health checks, long polls), to take out below
    idle_start, idle_cpu = time.perf_counter(), {role: cpu_ms(pid) for role, pid in pids.items()}
    time.sleep(3.0)
    idle_rate = {role: (cpu_ms(pid) - idle_cpu[role]) / (time.perf_counter() - idle_start)
                 for role, pid in pids.items()}
    http_ms, direct_ms, direct_cpu = [], [], []
    before, t0 = {}, 0.0
    with httpx.Client(timeout=60) as http:
        for i in range(repeats + 3):
            if i == 3:
                before, t0 = {role: cpu_ms(pid) for role, pid in pids.items()}, time.perf_counter()
                sampled = handle.stats.remote().result()["sample_ms"]
            start = time.perf_counter()
            r = http.post(f"{url}/v1/generate", json={"n": 1, "seed": 10_000 + i, "label": i % len(CLASSES)})
            elapsed = (time.perf_counter() - start) * 1e3
            if r.status_code != 200:
                raise RuntimeError(f"sequential request failed: {r.status_code} {r.text[:300]}")
            alone, cpu = direct(10_000 + i)
            if i >= 3:
                http_ms.append(elapsed)
                direct_ms.append(alone)
                direct_cpu.append(cpu)
    wall = time.perf_counter() - t0
    replica_sample_ms = (handle.stats.remote().result()["sample_ms"] - sampled) / repeats
    per_request = {role: (cpu_ms(pid) - before[role] - idle_rate[role] * wall) / repeats
                   for role, pid in pids.items()}
    if "replica" in per_request:
        per_request["replica"] -= statistics.mean(direct_cpu)  # its sampling is not overhead
    return {"http_p50_ms": statistics.median(http_ms), "direct_p50_ms": statistics.median(direct_ms),
            "overhead_p50_ms": statistics.median(h - d for h, d in zip(http_ms, direct_ms)),
            # against the replica's own time in model.sample (slower than the direct call on a busy machine)
            "overhead_vs_replica_sample_ms": statistics.mean(http_ms) - replica_sample_ms,
            "replica_sample_ms": replica_sample_ms,
            "overhead_cpu_ms": per_request}


def wait_healthy(url: str, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the app at {url} did not become healthy in {timeout:g} s")


def run_mode(url: str, model: Path, merge: bool, args, direct, scratch: Path) -> dict:
    from ray import serve

    from raygen.serving.app import APP_NAME, AppArgs, plan_app

    app, plan = plan_app(AppArgs(model=f"bench={model}", serve={
        "max_n": 16, "max_batch_size": args.max_batch, "batch_wait_timeout_s": args.batch_wait_s,
        "max_queued_requests": 4 * args.clients, "request_timeout_s": 120}), merge=merge)
    serve.run(app, name=APP_NAME, route_prefix="/")
    wait_healthy(url)
    asyncio.run(load(url, args.clients, 2 * args.clients, seed0=1_000_000))  # warm-up, untimed
    handle = serve.get_deployment_handle("model-bench", app_name=APP_NAME)
    before = handle.stats.remote().result()
    seconds, images, latencies = asyncio.run(load(url, args.clients, args.requests, seed0=0))
    after = handle.stats.remote().result()
    calls = after["forward_calls"] - before["forward_calls"]
    result = {"mode": "on" if merge else "off", "images_per_s": images / seconds, "seconds": seconds,
              "images": images, "p50_ms": statistics.median(latencies),
              "p90_ms": statistics.quantiles(latencies, n=10)[-1] if len(latencies) > 1 else latencies[0],
              "forward_calls": calls, "images_per_forward": (after["images"] - before["images"]) / max(calls, 1),
              "replica_cpus": plan.sizing.replica_cpus}
    if merge:
        result.update(paired_overhead(url, direct, args.sequential, serve_processes(scratch), handle))
    serve.delete(APP_NAME)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients (default 16)")
    parser.add_argument("--requests", type=int, default=480, help="timed n=1 requests per mode (default 480)")
    parser.add_argument("--sequential", type=int, default=60, help="sequential requests for the overhead p50")
    parser.add_argument("--max-batch", type=int, default=16, help="serve.max_batch_size (default 16)")
    parser.add_argument("--batch-wait-s", type=float, default=0.0, help="serve.batch_wait_timeout_s (default 0)")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and few requests: checks the script runs")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.clients, args.requests, args.sequential = 4, 16, 5

    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                       "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}.items():
        os.environ.setdefault(key, value)
    scratch = Path(tempfile.mkdtemp(prefix="rg-bench-", dir="/tmp"))  # short: Ray's socket paths live here
    import ray
    from ray import serve

    try:
        model = export_model(scratch, args.smoke)
        direct = direct_sampler(model)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, object_store_memory=256 * 1024**2,
                 _node_ip_address="127.0.0.1", _temp_dir=str(scratch / "ray"), log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 125},
                    proxy_location="HeadOnly")
        url = f"http://127.0.0.1:{port}"
        on = run_mode(url, model, True, args, direct, scratch)
        off = run_mode(url, model, False, args, direct, scratch)
    finally:
        if ray.is_initialized():
            serve.shutdown()
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)

    ratio = on["images_per_s"] / off["images_per_s"]
    overhead = on["overhead_p50_ms"]
    cpus = args.cpus or os.cpu_count()
    what = "tiny model (--smoke)" if args.smoke else "quickstart seqimg (gpt2 dim 96 depth 3, 16x16, 10 classes)"
    print(f"serve batching: {what}, {args.clients} clients, n=1 requests, {cpus} CPUs, "
          f"max_batch_size {args.max_batch}, batch_wait_timeout_s {args.batch_wait_s:g}, "
          f"replica {on['replica_cpus']:g} CPU")
    print(f"{'mode':>4} {'images/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'images/forward':>15}")
    for r in (on, off):
        print(f"{r['mode']:>4} {r['images_per_s']:9.1f} {r['p50_ms']:8.1f} {r['p90_ms']:8.1f} "
              f"{r['images_per_forward']:15.2f}")
    print(f"ratio on/off: {ratio:.2f}x (target >= {TARGET_RATIO:g}x)")
    print(f"p50 overhead of HTTP over a direct sample call: {overhead:.1f} ms (paired; HTTP p50 "
          f"{on['http_p50_ms']:.1f} ms, direct p50 {on['direct_p50_ms']:.1f} ms; target <= {TARGET_OVERHEAD_MS:g} ms)")
    print(f"mean HTTP latency minus the replica's own mean model.sample time: "
          f"{on['overhead_vs_replica_sample_ms']:.1f} ms (replica sample {on['replica_sample_ms']:.1f} ms)")
    cpu = on["overhead_cpu_ms"]
    if cpu:
        parts = ", ".join(f"{role} {ms:.2f}" for role, ms in sorted(cpu.items()))
        print(f"CPU the HTTP path adds per request: {sum(cpu.values()):.2f} ms ({parts}; load-independent)")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                 for k, v in vars(args).items()},
                                        "cpus": cpus, "on": on, "off": off, "ratio": ratio,
                                        "overhead_p50_ms": overhead}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
