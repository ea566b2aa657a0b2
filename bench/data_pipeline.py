"""Images/s through the raygen Ray Data pipeline versus a plain torch DataLoader.

Both read the same prepared shards and deliver the same thing: shuffled
float batches [B, C, H, W] in [0, 1] at the prepared resolution. The Ray
path iterates both rank shards of a 2-worker split at once (two threads,
like two Train workers on one node), through `WorkerBatches`; the baseline
is a map-style Dataset decoding each PNG with PIL in a DataLoader with as
many worker processes as Ray gets CPUs. Each epoch is timed from the start
(Ray's per-epoch start-up and the loader's worker start included).

    python bench/data_pipeline.py                       # Fashion-MNIST, 60k train images
    python bench/data_pipeline.py --dataset spheres --count 20000 --resolution 32
    python bench/data_pipeline.py --smoke               # seconds: 512 digits, 2 epochs (CI)
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAYGEN_NO_PROGRESS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


class PILShards(torch.utils.data.Dataset):
    """The baseline: all PNG bytes of a split in memory, one PIL decode per item."""

    def __init__(self, dir: Path, split: str):
        import pyarrow.parquet as pq

        from raygen.data import read_manifest
        m = read_manifest(dir)
        self.mode = "L" if m.channels == 1 else "RGB"
        self.png, self.label = [], []
        for path in m.shard_paths(split):
            t = pq.read_table(path, columns=["png", "label"])
            self.png += t.column("png").to_pylist()
            self.label += t.column("label").to_pylist()

    def __len__(self) -> int:
        return len(self.png)

    def __getitem__(self, i: int):
        from PIL import Image
        img = Image.open(io.BytesIO(self.png[i])).convert(self.mode)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        return x.float().div_(255.0), self.label[i]


def make_loader(dir: Path, batch_size: int, workers: int):
    """One DataLoader for all epochs: persistent worker processes (spawned,
    since Ray's threads make forking unsafe), reshuffled every epoch."""
    return torch.utils.data.DataLoader(PILShards(dir, "train"), batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       multiprocessing_context="spawn" if workers else None,
                                       generator=torch.Generator().manual_seed(0))


def bench_dataloader_epoch(loader) -> float:
    t0 = time.perf_counter()
    n = sum(x.shape[0] for x, _ in loader)
    return n / (time.perf_counter() - t0)


def bench_ray_epoch(dir: Path, spec, world_size: int, epoch: int) -> float:
    from raygen.data import WorkerBatches, build_datasets, make_data_config
    t0 = time.perf_counter()
    shards = make_data_config(spec).configure({"train": build_datasets(dir, spec)["train"]}, world_size)
    counts = [0] * world_size

    def run(rank: int) -> None:
        wb = WorkerBatches(shards[rank]["train"], spec, rank=rank, world_size=world_size, train=True)
        for batch in wb.epoch(epoch):
            counts[rank] += batch["image"].shape[0]

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def make_work_dir() -> Path:
    """The prepared copy and Ray's session files go under RAY_TMPDIR (where
    the caller wants Ray's files), else TMPDIR, else /tmp."""
    base = os.environ.get("RAY_TMPDIR")
    if base:
        Path(base).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="rg-bench-", dir=base or None))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--dir", help="an already prepared dataset folder (skips preparing)")
    p.add_argument("--count", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shuffle-buffer", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--cpus", type=int, default=2, help="CPUs for Ray and DataLoader workers alike")
    p.add_argument("--smoke", action="store_true", help="a small offline dataset, 2 epochs: checks that it runs (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.dataset, args.count, args.epochs, args.batch_size, args.shuffle_buffer = "digits", 512, 2, 32, 128
    work = make_work_dir()
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the prepared copy and Ray's session files


def run(args, work: Path) -> int:
    from raygen.data import prepare_dataset, read_manifest
    from raygen.spec.schema import DataSpec

    if args.dir:
        dir = Path(args.dir)
    else:
        dir = work / args.dataset
        t0 = time.perf_counter()
        prepare_dataset(args.dataset, dir, resolution=args.resolution, count=args.count, shard_bytes=4 << 20)
        print(f"prepared {args.dataset} in {time.perf_counter() - t0:.1f}s")
    m = read_manifest(dir)
    spec = DataSpec(dataset=str(dir), resolution=m.resolution, channels=m.channels, batch_size=args.batch_size,
                    shuffle_buffer=args.shuffle_buffer)
    print(f"{m.name}: {m.counts['train']} train images, {m.resolution}x{m.resolution}x{m.channels}, "
          f"batch {args.batch_size}, {args.cpus} CPUs")

    import ray
    ray.init(address="local", num_cpus=args.cpus, object_store_memory=512 << 20, include_dashboard=False,
             log_to_driver=False, _temp_dir=str(work / "ray"))
    import ray.data
    ray.data.DataContext.get_current().enable_progress_bars = False
    loader = make_loader(dir, args.batch_size, args.cpus)
    base, rayr = [], []
    try:
        # Interleaved, so load from anything else on the machine hits both alike.
        for epoch in range(args.epochs):
            base.append(bench_dataloader_epoch(loader))
            rayr.append(bench_ray_epoch(dir, spec, 2, epoch))
            print(f"epoch {epoch}: ray data (2 rank shards) {rayr[-1]:8.0f} img/s | "
                  f"DataLoader+PIL ({args.cpus} workers) {base[-1]:8.0f} img/s | ratio {rayr[-1] / base[-1]:.2f}"
                  + ("   (cold: worker processes start)" if epoch == 0 else ""), flush=True)
    finally:
        del loader
        ray.shutdown()
    if args.epochs > 1:
        r, b = float(np.median(rayr[1:])), float(np.median(base[1:]))
        print(f"warm epochs (median): ray data {r:.0f} img/s, DataLoader {b:.0f} img/s, ratio {r / b:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
