"""Cost curves: images/s and peak RSS per worker against dataset size, model
size and worker count, plus the shuffle buffer's quality and cost and the
engine's memory against a plain PyTorch loop.

    dataset size   the real pipeline (parquet shards -> Ray Data -> WorkerBatches)
                   feeding the Trainer for one epoch at 1x, 4x, 16x the rows, in
                   this process with Ray's object store capped; peak RSS of the
                   process reading (a worker), reset before each size
    model size     the seqimg debug config at 1x, 2x, 4x width, one worker
    workers        1 and 2 workers (more where the machine has the cores); each
                   worker its own process over a loopback gloo group
                   (raygen.train.memory_probe), the real Trainer and Strategy
    shuffle        pair sharing across two epochs (raygen.data.shuffle) without a
                   buffer, with buffers of one row group and of half the rows,
                   against an independent shuffle; rows/s of the epoch stream
    engine memory  the engine's peak RSS / a plain PyTorch loop's on the same
                   model and batches (target: at most 1.15)
    imports        `raygen data prepare` of a generated parquet source at 1x, 4x,
                   16x the rows, each in a fresh process: how far its peak RSS
                   rose during the import (flat: the import streams)

    .venv/bin/python bench/scaling.py              # minutes on 2 cores
    .venv/bin/python bench/scaling.py --smoke      # tiny sizes (CI): that it runs, not a figure

It writes the curves as JSON and PNG under bench/results/ (--smoke: a temp
folder) and ends with the complexity it observed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_work_dir() -> Path:
    base = os.environ.get("RAY_TMPDIR")
    if base:
        Path(base).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="rg-bench-", dir=base or None))


def base_spec(width: int, batch: int, steps: int, workers: int = 1) -> dict:
    """The seqimg debug config (gpt2 backbone) at `width` x its token width."""
    return {"model": {"family": "seqimg", "options": {"backbone": "gpt2", "dim": 32 * width, "depth": 2,
                                                       "heads": 2, "dropout": 0.0}},
            "data": {"batch_size": batch},
            "train": {"steps": steps, "eval_every": 10**6, "checkpoint_every": 10**6, "log_every": 10**6,
                      "ema": {"enabled": False}, "optimizer": {"name": "adamw"}},
            "scale": {"workers": workers, "strategy": "ddp"}, "track": {"fid": {"enabled": False}}}


# ---------------------------------------------------------------- shuffle
def shuffle_section(rows: int, unit: int, batch: int) -> dict:
    from raygen.data.shuffle import epoch_indices, ideal_pair_sharing, in_memory_shard, pair_sharing
    from raygen.data.worker import WorkerBatches
    from raygen.spec.schema import DataSpec

    rng = np.random.default_rng(0)
    table = {"index": np.arange(rows), "image": rng.integers(0, 255, (rows, 3, 16, 16), dtype=np.uint8),
             "label": np.zeros(rows, np.int64), "caption": np.array([""] * rows, dtype=object)}
    out = {"rows": rows, "row_group_rows": unit, "batch": batch, "ideal": ideal_pair_sharing(rows, batch), "buffers": []}
    for buffer in (0, unit, rows // 2):
        spec = DataSpec(dataset="memory", batch_size=batch, shuffle_buffer=buffer, augment={}, seed=0)
        wb = WorkerBatches(in_memory_shard(table, unit), spec, rank=0, world_size=1, train=True)
        e0 = epoch_indices(wb._raw_batches(0))
        e1 = epoch_indices(wb._raw_batches(1))
        seconds = []
        for epoch in (2, 3, 4):  # best of 3: a loaded machine only ever adds time
            t0 = time.perf_counter()
            n = sum(len(b["index"]) for b in wb.epoch(epoch))  # the whole stream: buffer, augment (off), tensors
            seconds.append(time.perf_counter() - t0)
        seconds = min(seconds)
        out["buffers"].append({"buffer": buffer, "pair_sharing": pair_sharing(e0, e1), "rows_per_s": n / seconds})
    return out


# ---------------------------------------------------------------- dataset size (Ray Data)
def data_size_section(work: Path, sizes: list[int], resolution: int, channels: int, batch: int,
                      object_store_mb: int) -> list[dict]:
    import ray
    import torch

    from raygen.data import build_datasets, read_manifest
    from raygen.data.pipeline import rank_shards
    from raygen.data.prepare import prepare_dataset
    from raygen.data.worker import WorkerBatches
    from raygen.models.registry import build_model
    from raygen.spec import parse_spec
    from raygen.train.memory import peak_rss_mb, reset_peak_rss
    from raygen.train.trainer import Trainer
    from raygen.train.worker import make_strategy

    ray.init(address="local", num_cpus=2, object_store_memory=object_store_mb * 2**20, include_dashboard=False,
             log_to_driver=False, _temp_dir=str(work / "ray"))
    import logging
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    from raygen.train.runner import quiet_data_progress
    quiet_data_progress()
    rows_out = []
    try:
        for i, n in enumerate([sizes[0], *sizes]):  # the first pass starts Ray's workers: untimed
            folder = work / f"shapes-{n}"
            if not folder.exists():
                prepare_dataset("shapes", folder, resolution=resolution, channels=channels, count=n, seed=0, val_fraction=0.02,
                                shard_bytes=256 * 1024)
            raw = base_spec(1, batch, 1)
            # a regression head: the epoch's time is the pipeline's and a small model's, not 256-way logits per value
            raw["model"]["options"]["head"] = "regression_l2"
            raw["data"] = {"dataset": str(folder), "resolution": resolution, "channels": channels, "batch_size": batch,
                           "augment": {"hflip": True}}
            spec = parse_spec(raw)
            info = read_manifest(folder).data_info(spec.data)
            shard = rank_shards(build_datasets(folder, spec.data)["train"], 1)[0]
            data = WorkerBatches(shard, spec.data, rank=0, world_size=1, train=True)
            steps = data.steps_per_epoch
            spec = spec.model_copy(update={"train": spec.train.model_copy(update={"steps": steps})})
            torch.manual_seed(0)
            trainer = Trainer(spec=spec, data_info=info, strategy=make_strategy(spec, 1, torch.device("cpu")),
                              make_generator=lambda: build_model(spec.model.family, spec.model.config, info),
                              train_data=data, val_data=None, hooks=[], checkpoints=None)
            reset_peak_rss()
            t0 = time.perf_counter()
            trainer.fit()
            seconds = time.perf_counter() - t0
            decoded_mb = steps * batch * resolution * resolution * channels / 2**20
            if i == 0:
                continue
            rows_out.append({"rows": steps * batch, "seconds": seconds, "images_per_s": steps * batch / seconds,
                             "peak_rss_mb": peak_rss_mb(), "decoded_mb": decoded_mb})
            print(f"  data {steps * batch:>6} rows ({decoded_mb:6.1f} MiB decoded): {seconds:6.1f} s, "
                  f"{steps * batch / seconds:7.0f} img/s, peak RSS {rows_out[-1]['peak_rss_mb']:.0f} MiB", flush=True)
    finally:
        ray.shutdown()
    return rows_out


# ---------------------------------------------------------------- imports (raygen data prepare)
#: a fresh process: a warm-up prepare loads the code, then the peak RSS (reset) is measured over the import
_PREPARE = """
import sys, tempfile, time
from pathlib import Path
from raygen.jobs.cli import main
def status(field):
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))
with tempfile.TemporaryDirectory() as warm:
    assert main(["data", "prepare", "digits", "--out", warm + "/d", "--count", "20"]) == 0
Path("/proc/self/clear_refs").write_text("5")
before, t0 = status("VmRSS"), time.perf_counter()
assert main(["data", "prepare", *sys.argv[1:]]) == 0
print("IMPORT", status("VmHWM") - before, time.perf_counter() - t0)
"""


def import_section(work: Path, sizes: list[int], side: int) -> list[dict]:
    """Peak-RSS growth of importing a parquet source of `sizes` rows
    (side x side RGB noise PNGs in files of 1,000 rows), default buffers."""
    import io
    import subprocess

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    out = []
    for n in sizes:
        src = work / f"import-src-{n}"
        src.mkdir()
        for k, start in enumerate(range(0, n, 1000)):
            rows = range(start, min(n, start + 1000))
            pq.write_table(pa.table({"image": [pngs[i % 64] for i in rows], "label": [i % 10 for i in rows]}),
                           src / f"part-{k:05d}.parquet", row_group_size=250, compression="none",
                           use_dictionary=False)
        source_mb = sum(f.stat().st_size for f in src.iterdir()) / 2**20
        done = subprocess.run([sys.executable, "-c", _PREPARE, str(src), "--out", str(work / f"import-out-{n}")],
                              capture_output=True, text=True, env={**os.environ, "RAYGEN_NO_PROGRESS": "1"})
        if done.returncode != 0 or "IMPORT" not in done.stdout:
            raise RuntimeError(f"import of {n} rows failed: {done.stderr[-2000:]}")
        growth, seconds = map(float, done.stdout.split("IMPORT")[1].split()[:2])
        out.append({"rows": n, "source_mb": source_mb, "rss_growth_mb": growth, "seconds": seconds})
        print(f"  import {n:>6} rows ({source_mb:6.1f} MiB of parquet): {seconds:6.1f} s, peak RSS rose "
              f"{growth:.1f} MiB", flush=True)
    return out


# ---------------------------------------------------------------- model size, workers, plain loop
def probe_section(widths: list[int], workers: list[int], batch: int, steps: int) -> dict:
    from raygen.models.base import DataInfo
    from raygen.train.memory_probe import measure

    info = DataInfo(channels=1, resolution=8)

    def point(per_rank, **extra) -> dict:
        return {**extra, "images_per_s": sum(r.images for r in per_rank) / max(r.seconds for r in per_rank),
                "peak_rss_mb": max(r.peak_rss_mb for r in per_rank),
                "state_mb": (per_rank[0].params + per_rank[0].grads + per_rank[0].optimizer) / 2**20}

    plain = measure([base_spec(1, batch, steps)], info, world=1, plain=True)[0]
    by_width = measure([base_spec(w, batch, steps) for w in widths], info, world=1)
    model = [point(r, width=w, params=r[0].params // 4) for w, r in zip(widths, by_width)]
    for m in model:
        print(f"  width {m['width']}x ({m['params']:>8,} params): {m['images_per_s']:7.0f} img/s, "
              f"peak RSS {m['peak_rss_mb']:.0f} MiB, params+grads+optimizer {m['state_mb']:.1f} MiB", flush=True)
    scaling = [dict(model[0], workers=1)]
    for w in workers:
        if w > 1:
            scaling.append(point(measure([base_spec(1, batch, steps, w)], info, world=w)[0], workers=w))
    for s in scaling:
        print(f"  {s['workers']} worker(s): {s['images_per_s']:7.0f} img/s in all, peak RSS per worker "
              f"{s['peak_rss_mb']:.0f} MiB", flush=True)
    engine = model[0]["peak_rss_mb"]
    return {"model": model, "workers": scaling, "plain_peak_rss_mb": plain[0].peak_rss_mb,
            "engine_peak_rss_mb": engine, "engine_over_plain": engine / plain[0].peak_rss_mb}


# ---------------------------------------------------------------- report
def slope(xs, ys) -> float:
    """The exponent k of y ~ x^k (least squares in log-log)."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def plot(results: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    curves = [("data", [r["rows"] for r in results["data_size"]], results["data_size"], "rows (one epoch)"),
              ("model", [m["params"] for m in results["probes"]["model"]], results["probes"]["model"], "parameters"),
              ("workers", [w["workers"] for w in results["probes"]["workers"]], results["probes"]["workers"], "workers")]
    for ax, (name, xs, rows, label) in zip(axes, curves):
        ax.plot(xs, [r["images_per_s"] for r in rows], "o-", color="tab:blue")
        ax.set_xlabel(label)
        ax.set_ylabel("images/s", color="tab:blue")
        if name != "workers":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        twin = ax.twinx()
        twin.plot(xs, [r["peak_rss_mb"] for r in rows], "s--", color="tab:red")
        twin.set_ylabel("peak RSS per worker (MiB)", color="tab:red")
        twin.set_ylim(0, max(r["peak_rss_mb"] for r in rows) * 1.2)
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs (CI), no figure to quote")
    p.add_argument("--rows", type=int, default=2200, help="rows of the 1x dataset (4x and 16x follow; "
                   "the default 16x is about 100 MiB decoded, 10%% of a worker's RSS)")
    p.add_argument("--resolution", type=int, default=32, help="of the generated shapes dataset (16 or more)")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="training steps per model-size / worker point")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--object-store-mb", type=int, default=96)
    p.add_argument("--import-rows", type=int, default=2000, help="rows of the 1x parquet source to import "
                   "(64x64 RGB, about 12 KiB each; 4x and 16x follow)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    if args.smoke:
        args.rows, args.resolution, args.channels, args.batch, args.steps = 128, 16, 1, 16, 3
        args.import_rows = 50
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    work = make_work_dir()
    out_dir = work if args.smoke else args.out
    load = os.getloadavg()[0]
    print(f"bench/scaling.py: load average {load:.1f} on {os.cpu_count()} cores", flush=True)

    sh = shuffle_section(rows=2048 if args.smoke else 16384, unit=256 if args.smoke else 1024, batch=args.batch)
    print(f"shuffle ({sh['rows']} rows, row groups of {sh['row_group_rows']}, batch {sh['batch']}): pair sharing "
          f"across two epochs (ideal {sh['ideal']:.4f}):", flush=True)
    base_rate = sh["buffers"][0]["rows_per_s"]
    for b in sh["buffers"]:
        print(f"  buffer {b['buffer']:>6}: {b['pair_sharing']:.4f} ({b['pair_sharing'] / sh['ideal']:.1f}x ideal), "
              f"{b['rows_per_s']:,.0f} rows/s ({b['rows_per_s'] / base_rate:.2f}x of no buffer)", flush=True)

    print("dataset size (one epoch through Ray Data, object store "
          f"{args.object_store_mb} MiB):", flush=True)
    data = data_size_section(work, [args.rows * k for k in (1, 4, 16)], args.resolution, args.channels, args.batch,
                             args.object_store_mb)
    print("imports (raygen data prepare of a parquet source, each in a fresh process):", flush=True)
    imports = import_section(work, [args.import_rows * k for k in (1, 4, 16)], 64)
    print("model size and workers (processes over loopback gloo):", flush=True)
    probes = probe_section([1, 2, 4], args.workers, args.batch, args.steps)

    results = {"date": datetime.date.today().isoformat(), "load_average": load, "cpus": os.cpu_count(),
               "smoke": args.smoke, "shuffle": sh, "data_size": data, "imports": imports, "probes": probes,
               "observed": {
                   "data_time_exponent": slope([r["rows"] for r in data], [r["seconds"] for r in data]),
                   # the last step alone: the first size is the most exposed to a passing load spike
                   "data_time_16x_over_4x": data[-1]["seconds"] / data[-2]["seconds"],
                   "data_memory_16x_over_1x": data[-1]["peak_rss_mb"] / data[0]["peak_rss_mb"],
                   "model_time_exponent": slope([m["params"] for m in probes["model"]],
                                                [1 / m["images_per_s"] for m in probes["model"]]),
                   "engine_over_plain_peak_rss": probes["engine_over_plain"],
                   "import_memory_16x_minus_4x_mb": imports[-1]["rss_growth_mb"] - imports[-2]["rss_growth_mb"],
                   "import_time_16x_over_4x": imports[-1]["seconds"] / imports[-2]["seconds"]}}
    o = results["observed"]
    stem = f"scaling_{'smoke' if args.smoke else 'cpu'}_{results['date']}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2))
    plot(results, out_dir / f"{stem}.png")
    print(f"wrote {out_dir / stem}.json and .png")
    print(f"observed: epoch time ~ rows^{o['data_time_exponent']:.2f} (1.00 = linear), 16x / 4x rows "
          f"{o['data_time_16x_over_4x']:.2f} (4.00 = linear); peak RSS at 16x / 1x rows "
          f"{o['data_memory_16x_over_1x']:.3f} (1.00 = flat); time per image ~ params^{o['model_time_exponent']:.2f}; "
          f"engine / plain loop peak RSS {o['engine_over_plain_peak_rss']:.3f} (target <= 1.15); import: peak RSS "
          f"growth at 16x less 4x rows {o['import_memory_16x_minus_4x_mb']:+.1f} MiB (0 = flat once the source "
          f"outgrows the 64 MiB buffers), time 16x / 4x {o['import_time_16x_over_4x']:.2f} (4.00 = linear)")
    if not args.smoke:  # the generated datasets and Ray's session files (smoke keeps its outputs there)
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
