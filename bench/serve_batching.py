"""Images per second of the serving app under concurrent HTTP clients, batching on vs off, same run.

The model is the quickstart's (jobs/specs/quickstart.yaml: seqimg, gpt2, dim 96,
depth 3, rowwise patches, categorical head, label-conditional, 16x16 grayscale
with 10 classes), built untrained and exported to a temp folder: speed does not
depend on training. One embedded Ray and one Serve instance host the same app
twice side by side, with the same settings but one:

    /on   concurrent requests with equal sampling params are merged into ONE
          `model.sample` call (one torch.Generator per image) and split back
    /off  the same batcher collects them, but each request is sampled in a
          call of its own (`BatchSampler(merge=False)`)

Each client (asyncio, one bare keep-alive HTTP/1.1 connection each, so the
load generator takes little of the CPUs it shares with the server) sends n=1 requests with
its own seeds and labels back to back; images/s is images over wall time
after a warm-up, summed over `--rounds` rounds that alternate /on and /off so
both see the same load on a shared machine. The printed ratio is on/off.

Overhead (with /off removed): sequential n=1 requests over HTTP (JSON body,
base64 PNG answer; proxy -> the model's replica, which holds the front door
when one model is served) alternate with direct `model.sample` calls of one
image in this process (one thread, like a replica, whose CPU share sets one
sampling thread); the overhead is the median of the paired differences. For
reference the script also prints Ray Serve's own floor (an app answering at
once, timed in the same loop), the latency beyond the replica's own sampling
time, and the CPU the proxy and the replica spend per request beyond sampling.
`--batch-wait-s` is the app's `serve.batch_wait_timeout_s`; at 0 a lone
request waits for nothing, and a busy replica batches the requests that
queued while its previous batch ran.

Run it in a loopback-only network namespace (Ray otherwise listens on the
machine's address):

    unshare -n bash -c 'ip link set lo up; .venv/bin/python bench/serve_batching.py'
    .venv/bin/python bench/serve_batching.py --smoke      # tiny model, few requests: one round
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


def serve_processes(scratch: Path, app: str) -> dict[str, int]:
    """The pids of this run's Serve proxy and the model replica of `app` (children of its own raylet)."""
    procs = _processes()
    raylets = {pid for pid, (_, cmd) in procs.items() if "raylet" in cmd.split(" ")[0] and str(scratch) in cmd}
    found = {}
    for pid, (ppid, cmd) in procs.items():
        if ppid in raylets:
            for role, title in (("proxy", "ProxyActor"), ("replica", f"ServeReplica:{app}:model-")):
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


async def _post(reader, writer, host: str, path: str, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 POST on a keep-alive connection: (status, body). A bare client, so the load
    generator takes little of the CPUs it shares with the server."""
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length, chunked = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if not chunked:
        return status, await reader.readexactly(length)
    parts = []
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        parts.append(await reader.readexactly(size + 2))
        if size == 0:
            return status, b"".join(p[:-2] for p in parts)


def label_body(seed0: int):
    """Request i: one image of class i, seed seed0 + i."""
    return lambda i: {"n": 1, "seed": seed0 + i, "label": (seed0 + i) % len(CLASSES)}


async def load(url: str, clients: int, requests: int, seed0: int = 0, make_body=None) -> tuple[float, int, list[float]]:
    """`clients` concurrent clients send `requests` requests in all (`make_body(i)`, default n=1 labelled
    requests from seed0). Returns (seconds, images, latencies ms)."""
    from urllib.parse import urlsplit

    make_body = make_body or label_body(seed0)
    parts = urlsplit(url)
    counter = iter(range(requests))
    latencies: list[float] = []
    images = 0

    async def client() -> None:
        nonlocal images
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            for i in counter:
                body = make_body(i)
                start = time.perf_counter()
                status, raw = await _post(reader, writer, parts.netloc, f"{parts.path}/v1/generate",
                                          json.dumps(body).encode())
                latencies.append((time.perf_counter() - start) * 1e3)
                if status != 200:
                    raise RuntimeError(f"{status} {raw[:300]!r} for request {str(body)[:200]}")
                images += raw.count(b'"png_base64"')
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - start, images, latencies


def echo_app():
    """Ray Serve's own floor: one deployment whose route answers at once (a JSON body in, JSON out)."""
    from fastapi import FastAPI, Request
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.01})
    @serve.ingress(api)
    class Echo:
        @api.post("/")
        async def echo(self, request: Request):
            return {"echo": len(await request.body())}

    return Echo.bind()


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
    http_ms, direct_ms, direct_cpu, echo_ms = [], [], [], []
    before, t0 = {}, 0.0
    with httpx.Client(timeout=60) as http:
        for i in range(repeats + 3):
            if i == 3:
                before, t0 = {role: cpu_ms(pid) for role, pid in pids.items()}, time.perf_counter()
                sampled = handle.stats.remote().result()["sample_ms"]
            start = time.perf_counter()
            r = http.post(f"{url}/on/v1/generate", json={"n": 1, "seed": 10_000 + i, "label": i % len(CLASSES)})
            elapsed = (time.perf_counter() - start) * 1e3
            if r.status_code != 200:
                raise RuntimeError(f"sequential request failed: {r.status_code} {r.text[:300]}")
            alone, cpu = direct(10_000 + i)
            start = time.perf_counter()
            http.post(f"{url}/echo", json={"n": 1, "seed": 10_000 + i, "label": i % len(CLASSES)})
            echoed = (time.perf_counter() - start) * 1e3
            if i >= 3:
                http_ms.append(elapsed)
                direct_ms.append(alone)
                direct_cpu.append(cpu)
                echo_ms.append(echoed)
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
            "serve_floor_p50_ms": statistics.median(echo_ms),
            "overhead_cpu_ms": per_request}


def local_overhead(model: Path, direct, repeats: int) -> dict:
    """The same app without Ray (`raygen.serving.local`: uvicorn in this process, the model behind the
    same front door and batcher): sequential n=1 HTTP requests paired with direct calls, so raygen's own
    HTTP path is seen apart from Ray Serve's proxy and replica hops."""
    import httpx

    from raygen.serving.local import LocalServer, build_local

    app = build_local({"model": f"bench={model}", "serve": {"max_n": 16, "batch_wait_timeout_s": 0.0}})
    http_ms, direct_ms = [], []
    with LocalServer(app.api) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        for i in range(repeats + 3):
            start = time.perf_counter()
            r = http.post("/v1/generate", json={"n": 1, "seed": 20_000 + i, "label": i % len(CLASSES)})
            elapsed = (time.perf_counter() - start) * 1e3
            if r.status_code != 200:
                raise RuntimeError(f"local request failed: {r.status_code} {r.text[:300]}")
            alone, _ = direct(20_000 + i)
            if i >= 3:
                http_ms.append(elapsed)
                direct_ms.append(alone)
    return {"local_http_p50_ms": statistics.median(http_ms),
            "local_overhead_p50_ms": statistics.median(h - d for h, d in zip(http_ms, direct_ms))}


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


def deploy(name: str, model: Path, merge: bool, args):
    """The app with the model at /NAME; returns (plan, a handle to its model replica)."""
    from ray import serve

    from raygen.serving.app import AppArgs, plan_app

    app, plan = plan_app(AppArgs(model=f"bench={model}", serve={
        "max_n": 16, "max_batch_size": args.max_batch, "batch_wait_timeout_s": args.batch_wait_s,
        "max_queued_requests": 4 * args.clients, "request_timeout_s": 120}), merge=merge)
    serve.run(app, name=name, route_prefix=f"/{name}")
    return plan, serve.get_deployment_handle("model-bench", app_name=name)


def run(url: str, model: Path, args, direct, scratch: Path) -> tuple[dict, dict]:
    """Both apps side by side (/on merges, /off does not), loaded in alternating rounds so that both
    see the same load on a shared machine; then the sequential overhead on /on."""
    from ray import serve

    plans, handles, totals = {}, {}, {}
    for mode in ("on", "off"):
        plans[mode], handles[mode] = deploy(mode, model, mode == "on", args)
    for mode in ("on", "off"):
        wait_healthy(f"{url}/{mode}")
        asyncio.run(load(f"{url}/{mode}", args.clients, 2 * args.clients, seed0=1_000_000))  # warm-up, untimed
        totals[mode] = {"seconds": 0.0, "images": 0, "latencies": [], "calls": 0, "forward_images": 0}
    per_round = max(args.clients, args.requests // args.rounds)
    for r in range(args.rounds):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            before = handles[mode].stats.remote().result()
            client_cpu = time.process_time()
            seconds, images, latencies = asyncio.run(load(f"{url}/{mode}", args.clients, per_round, seed0=r * per_round))
            client_cpu = time.process_time() - client_cpu
            after = handles[mode].stats.remote().result()
            t = totals[mode]
            t["client_cpu_s"] = t.get("client_cpu_s", 0.0) + client_cpu
            t["seconds"] += seconds
            t["images"] += images
            t["latencies"] += latencies
            t["calls"] += after["forward_calls"] - before["forward_calls"]
            t["forward_images"] += after["images"] - before["images"]
    results = {}
    for mode, t in totals.items():
        lat = t["latencies"]
        results[mode] = {"mode": mode, "images_per_s": t["images"] / t["seconds"], "seconds": t["seconds"],
                         "images": t["images"], "p50_ms": statistics.median(lat),
                         "p90_ms": statistics.quantiles(lat, n=10)[-1] if len(lat) > 1 else lat[0],
                         "forward_calls": t["calls"], "images_per_forward": t["forward_images"] / max(t["calls"], 1),
                         "replica_cpus": plans[mode].sizing.replica_cpus,
                         "client_cpu_ms_per_request": t["client_cpu_s"] * 1e3 / max(len(lat), 1)}
    serve.delete("off")  # the overhead is measured with one model replica, as `raygen serve` runs it
    serve.run(echo_app(), name="echo", route_prefix="/echo")
    results["on"].update(paired_overhead(url, direct, args.sequential, serve_processes(scratch, "on"),
                                         handles["on"]))
    return results["on"], results["off"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients (default 16)")
    parser.add_argument("--requests", type=int, default=480, help="timed n=1 requests per mode (default 480)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating on/off load rounds (default 4)")
    parser.add_argument("--sequential", type=int, default=60, help="sequential requests for the overhead p50")
    parser.add_argument("--max-batch", type=int, default=16, help="serve.max_batch_size (default 16)")
    parser.add_argument("--batch-wait-s", type=float, default=0.0, help="serve.batch_wait_timeout_s (default 0)")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and few requests: checks the script runs")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.clients, args.requests, args.sequential, args.rounds = 4, 16, 5, 1

    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                       "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}.items():
        os.environ.setdefault(key, value)
    scratch = Path(tempfile.mkdtemp(prefix="rg-bench-", dir="/tmp"))  # short: Ray's socket paths live here
    load_before = os.getloadavg()
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
        on, off = run(url, model, args, direct, scratch)
        serve.shutdown()
        ray.shutdown()
        on.update(local_overhead(model, direct, args.sequential))
    finally:
        if ray.is_initialized():
            serve.shutdown()
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    load_after = os.getloadavg()

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
    print(f"ratio on/off: {ratio:.2f}x (target >= {TARGET_RATIO:g}x); the load generator itself used "
          f"{on['client_cpu_ms_per_request']:.2f} ms CPU per request of the same cores")
    print(f"p50 overhead of HTTP over a direct sample call: {overhead:.1f} ms (paired; HTTP p50 "
          f"{on['http_p50_ms']:.1f} ms, direct p50 {on['direct_p50_ms']:.1f} ms; target <= {TARGET_OVERHEAD_MS:g} ms)")
    print(f"Ray Serve's own floor (an app that answers at once, same loop): p50 {on['serve_floor_p50_ms']:.1f} ms")
    print(f"mean HTTP latency minus the replica's own mean model.sample time: "
          f"{on['overhead_vs_replica_sample_ms']:.1f} ms (replica sample {on['replica_sample_ms']:.1f} ms)")
    cpu = on["overhead_cpu_ms"]
    if cpu:
        parts = ", ".join(f"{role} {ms:.2f}" for role, ms in sorted(cpu.items()))
        print(f"CPU the HTTP path adds per request: {sum(cpu.values()):.2f} ms ({parts}; load-independent)")
    print(f"the same app without Ray (uvicorn in this process): HTTP p50 {on['local_http_p50_ms']:.1f} ms, "
          f"overhead over a direct call {on['local_overhead_p50_ms']:.1f} ms (raygen's own HTTP path)")
    print(f"machine load average (1 min) at start {load_before[0]:.1f}, at end {load_after[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    met = lambda ok: "MET" if ok else "MISSED"  # noqa: E731
    print(f"TARGETS: batching on/off {ratio:.2f}x >= {TARGET_RATIO:g}x {met(ratio >= TARGET_RATIO)}; "
          f"HTTP overhead p50 {overhead:.1f} ms <= {TARGET_OVERHEAD_MS:g} ms {met(overhead <= TARGET_OVERHEAD_MS)} "
          f"(Ray Serve's floor here {on['serve_floor_p50_ms']:.1f} ms; without Ray {on['local_overhead_p50_ms']:.1f} ms)")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                 for k, v in vars(args).items()},
                                        "cpus": cpus, "on": on, "off": off, "ratio": ratio,
                                        "overhead_p50_ms": overhead, "loadavg_start": load_before,
                                        "loadavg_end": load_after}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
