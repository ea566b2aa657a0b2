"""Serving throughput per family: 16 concurrent HTTP clients at n=1 and n=4, batching on vs off.

Every registered family that can sample is served through raygen's generic
path (nothing here knows a family): its first debug flavor that needs no
frozen components is built untrained, exported like training does, and
served twice side by side by one embedded Ray and Serve:

    /on   concurrent requests with equal sampling params merged into one `sample` call
    /off  the same batcher, each request sampled in a call of its own

Requests carry the model's condition: a label index, a caption, or for other
kinds a small value made from the model's own condition schema (the one
`/v1/models` shows); a family that refuses it is reported as skipped with
its reason.
For each family and n it prints images/s, p50 and p99 latency and the on/off
ratio (target >= 3x), and per family the serving memory its replica measured
at load (weights, activations at max batch, resident, ratio; target <= 1.2). The HTTP overhead over a direct `sample` call is
`bench/serve_batching.py`'s (quickstart model).

    unshare -n bash -c 'ip link set lo up; .venv/bin/python bench/serve_families.py'
    .venv/bin/python bench/serve_families.py --smoke --families seqimg
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_batching import free_port, load, wait_healthy  # noqa: E402

TARGET_RATIO = 3.0
SIMPLE_KINDS = ("none", "label", "caption")


def export_family(name: str, folder: Path):
    """(export path, condition kind, DataInfo, flavor) for the family's first debug flavor whose condition
    the bench can fill in (else its last), or (None, reason). A flavor built on frozen components (the
    cascade on its autoencoder) gets them exported first, as the earlier runs of a pipeline would."""
    import torch

    from raygen.exports import export_generator
    from raygen.models import build_model, get_family
    from raygen.spec import parse_spec

    family = get_family(name)
    flavors = list((family.debug() if family.debug else {}).items())
    if not flavors:
        return None, "no debug flavor", None, None
    for flavor, (config, info, *rest) in flavors:
        components = rest[0] if rest else {}
        torch.manual_seed(0)
        model = build_model(name, config, info, components)
        if model.condition_kind in SIMPLE_KINDS or flavor == flavors[-1][0]:
            exported = {}
            for part, component in components.items():
                part_spec = parse_spec({"model": {"family": component.family, "options": {}}})
                exported[part] = str(export_generator(folder / f"{name}-{part}", component.state_dict(), part_spec,
                                                      component.data_info))
            resolution = info.resolution or [info.height, info.width]
            spec = parse_spec({"name": f"bench-{name}", "data": {"resolution": resolution,
                                                                  "channels": info.channels},
                               "model": {"family": name, "options": config.model_dump(mode="json"),
                                         **({"components": exported} if exported else {})}})
            path = export_generator(folder / name, model.state_dict(), spec, info, meta={"run_id": f"bench-{name}"})
            return path, model.condition_kind, info, flavor
    return None, "no debug flavor", None, None


def example(schema: dict):
    """A small valid value of a JSON schema (the model's own condition schema): the bench makes a
    condition for any kind without knowing it."""
    if "enum" in schema:
        return schema["enum"][0]
    if "anyOf" in schema:
        return example(next(s for s in schema["anyOf"] if s.get("type") != "null"))
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: example(props[k]) for k in schema.get("required", list(props))}
    if kind == "array":
        return [example(schema.get("items", {})) for _ in range(max(1, schema.get("minItems", 1)))]
    if kind in ("number", "integer"):
        low, high = schema.get("minimum", 0), schema.get("maximum", 1)
        value = (low + high) / 2 if kind == "number" else low
        return int(value) if kind == "integer" else value
    if kind == "boolean":
        return False
    return "a picture"


def body_for(kind: str, info, i: int, n: int) -> dict:
    from raygen.models.conditions import get_kind
    from raygen.serving.loading import condition_schema

    body = {"n": n, "seed": i * n}
    if kind == "label" and info.num_classes:
        body["label"] = i % info.num_classes
    elif kind == "caption":
        body["caption"] = f"a picture of thing {i % 7}"
    elif kind != "none":
        condition = get_kind(kind)
        body[condition.field] = example(condition_schema(condition, info))
    return body


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[-1] if len(values) > 1 else values[0]


def print_memory(url: str, name: str):
    """The model's serving memory as its replica measured it at load (`/v1/models`), printed."""
    import httpx

    memory = httpx.get(f"{url}/{name}-on/v1/models", timeout=30).json()["models"][0].get("serving_memory")
    if not memory or memory.get("ratio") is None:
        print(f"{name:>10} serving memory: not measured ({(memory or {}).get('note')})", flush=True)
        return memory
    mib = 2**20
    print(f"{name:>10} serving memory at batch {memory['batch']}: weights {memory['weights_bytes'] / mib:.2f} MiB "
          f"+ activations {memory['activation_bytes'] / mib:.2f} MiB, resident {memory['resident_bytes'] / mib:.2f} "
          f"MiB: ratio {memory['ratio']:.2f} (target <= {memory['target_ratio']:g}; load peak "
          f"{memory['load_peak_bytes'] / mib:.2f} MiB, torch runtime {memory['runtime_bytes'] / mib:.2f} MiB apart)",
          flush=True)
    return memory


def bench_family(url: str, name: str, path: Path, kind: str, info, args) -> list[dict]:
    from ray import serve

    from raygen.serving.app import AppArgs, plan_app

    for mode in ("on", "off"):
        app, _ = plan_app(AppArgs(model=f"bench={path}", serve={
            "max_n": 16, "max_batch_size": args.max_batch, "batch_wait_timeout_s": args.batch_wait_s,
            "max_queued_requests": 8 * args.clients, "request_timeout_s": 300}), merge=mode == "on")
        serve.run(app, name=f"{name}-{mode}", route_prefix=f"/{name}-{mode}")
    rows = []
    try:
        for mode in ("on", "off"):
            wait_healthy(f"{url}/{name}-{mode}")
        memory = print_memory(url, name)
        for n in args.n:
            totals = {m: {"seconds": 0.0, "images": 0, "latencies": []} for m in ("on", "off")}
            for mode in ("on", "off"):  # warm-up, untimed
                asyncio.run(load(f"{url}/{name}-{mode}", args.clients, args.clients,
                                 make_body=lambda i: body_for(kind, info, 10_000 + i, n)))
            per_round = max(args.clients, args.requests // args.rounds)
            for r in range(args.rounds):
                for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                    seconds, images, lat = asyncio.run(load(
                        f"{url}/{name}-{mode}", args.clients, per_round,
                        make_body=lambda i: body_for(kind, info, r * per_round + i, n)))
                    t = totals[mode]
                    t["seconds"] += seconds
                    t["images"] += images
                    t["latencies"] += lat
            row = {"family": name, "n": n, "kind": kind, "serving_memory": memory}
            for mode, t in totals.items():
                row[mode] = {"images_per_s": t["images"] / t["seconds"], "p50_ms": statistics.median(t["latencies"]),
                             "p99_ms": p99(t["latencies"]), "requests": len(t["latencies"])}
            row["ratio"] = row["on"]["images_per_s"] / row["off"]["images_per_s"]
            rows.append(row)
            print(f"{name:>10} n={n} on {row['on']['images_per_s']:8.1f} img/s p50 {row['on']['p50_ms']:7.1f} "
                  f"p99 {row['on']['p99_ms']:7.1f} | off {row['off']['images_per_s']:8.1f} img/s p50 "
                  f"{row['off']['p50_ms']:7.1f} p99 {row['off']['p99_ms']:7.1f} | ratio {row['ratio']:.2f}x",
                  flush=True)
    finally:
        for mode in ("on", "off"):
            serve.delete(f"{name}-{mode}")
    return rows


def main(argv=None) -> int:
    from raygen.models import families_with

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="*", default=None, help="default: every family that can sample")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--n", type=int, nargs="*", default=[1, 4], help="images per request (default 1 4)")
    parser.add_argument("--requests", type=int, default=128, help="timed requests per family, n and mode")
    parser.add_argument("--rounds", type=int, default=2, help="alternating on/off rounds")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-s", type=float, default=0.0)
    parser.add_argument("--cpus", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="4 clients, few requests: checks the script runs")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.clients, args.requests, args.rounds = 4, 8, 1
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                       "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}.items():
        os.environ.setdefault(key, value)
    names = args.families or families_with("sample")
    scratch = Path(tempfile.mkdtemp(prefix="rg-benchf-", dir="/tmp"))
    import ray
    from ray import serve

    rows, skipped = [], {}
    try:
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, object_store_memory=256 * 1024**2,
                 _node_ip_address="127.0.0.1", _temp_dir=str(scratch / "ray"), log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 305},
                    proxy_location="HeadOnly")
        url = f"http://127.0.0.1:{port}"
        for name in names:
            try:
                path, kind, info, flavor = export_family(name, scratch / "models")
            except Exception as err:  # noqa: BLE001 - a family that cannot be exported is reported, not fatal
                path, kind = None, "export failed: " + " ".join(str(err).split())[:200]
            if path is None:
                skipped[name] = kind
                print(f"{name:>10} skipped: {kind}", flush=True)
                continue
            print(f"{name:>10} flavor {flavor} ({kind}, {info.height}x{info.width}x{info.channels})", flush=True)
            try:
                rows += bench_family(url, name, path, kind, info, args)
            except Exception as err:  # noqa: BLE001 - one family's failure is reported, the others still run
                skipped[name] = " ".join(str(err).split())[:300]
                print(f"{name:>10} skipped: {skipped[name]}", flush=True)
    finally:
        if ray.is_initialized():
            serve.shutdown()
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    low = [f"{r['family']} n={r['n']} {r['ratio']:.2f}x" for r in rows if r["ratio"] < TARGET_RATIO]
    print(f"batching on/off target >= {TARGET_RATIO:g}x: {len(rows) - len(low)} of {len(rows)} met"
          + (f"; below: {', '.join(low)}" if low else ""))
    if args.out:
        args.out.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                 for k, v in vars(args).items()},
                                        "cpus": args.cpus or os.cpu_count(), "loadavg": os.getloadavg(),
                                        "rows": rows, "skipped": skipped}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
