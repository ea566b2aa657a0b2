"""Bounded-memory streaming in training: a worker's training epoch over a
dataset 16x larger keeps its peak RSS flat (within 10% at 1x, 4x and 16x),
with Ray's object store at 80 MiB and the worker held to 128 MiB more than
it had once warmed up, less than the 16x dataset's decoded size (192 MiB).

The cap is a cgroup (v1 `memory.limit_in_bytes` or v2 `memory.max`) made
for the worker's process, so going past it gets the worker OOM-killed, and
the test fails (a worker that keeps every batch is killed at 4x). RLIMIT_AS
is no substitute: a Ray worker with torch maps gigabytes of address space
it never touches (thread stacks, the object store's mapping, allocator
arenas; seen: 6.2 GiB mapped for 0.7 GiB resident), so an address-space cap
either sits far above the RSS or fails allocations unrelated to the data.
Where no cgroup can be made the test skips.

The worker is a Ray actor running what a Ray Train worker runs: the
pipeline's rank shard (`build_datasets` + `rank_shards`), iterated by
`WorkerBatches.epoch` (the per-epoch row-group order and shuffle buffer),
each batch taken through a forward, backward and optimizer step of a small
torch model. Each size's peak RSS is the process's own
(`raygen.train.memory`: VmHWM, reset before each epoch)."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import stop_own_ray_processes

ROWS_1X, SIDE = 1024, 64          # 64x64 RGB: 12 KiB decoded per row, 12 MiB at 1x, 192 MiB at 16x
OBJECT_STORE_MB, HEADROOM_MB = 80, 128


def memory_cgroup_root() -> Path | None:
    """This process's memory cgroup folder, if a child can be made in it."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for base in ((Path("/sys/fs/cgroup/memory"),) if "memory" in controllers.split(",") else ()) + \
                ((Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")) if controllers == "" else ()):
            folder = base / path.lstrip("/")
            limit = "memory.limit_in_bytes" if base.name == "memory" else "memory.max"
            if (folder / "cgroup.procs").exists() and (base.name == "memory" or (folder / limit).exists()
                                                        or (folder / "cgroup.subtree_control").exists()):
                probe = folder / f"raygen-probe-{os.getpid()}"
                try:
                    probe.mkdir()
                    ok = (probe / limit).exists()
                    probe.rmdir()
                except OSError:
                    continue
                if ok:
                    return folder
    return None


def write_dataset(folder: Path, rows: int) -> None:
    """`rows` training images (64 distinct noise PNGs, repeated) and a small
    val split, as shards + manifest; written directly, not rendered."""
    from raygen.data.manifest import SCHEMA_VERSION, Manifest
    from raygen.data.shards import ShardWriter, write_manifest

    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    folder.mkdir(parents=True)
    splits = {}
    for split, n in (("train", rows), ("val", 16)):
        writer = ShardWriter(folder, split, {}, max_bytes=4 * 2**20, decoded_row_bytes=SIDE * SIDE * 3)
        for i in range(n):
            writer.add(pngs[i % 64], i % 10, "", {})
        splits[split] = writer.close()
    write_manifest(Manifest(name="noise", height=SIDE, width=SIDE, channels=3, splits=splits, num_classes=10,
                            class_names=[str(i) for i in range(10)], schema_version=SCHEMA_VERSION), folder)


# The driver: a private Ray with a small object store, one actor that caps
# itself with a cgroup and trains an epoch per dataset size.
DRIVER = r'''
import json, os, sys, time
from pathlib import Path
import ray

cgroup_root, work, store_mb, headroom_mb, ray_tmp = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), sys.argv[5]
ray.init(address="local", num_cpus=2, object_store_memory=store_mb * 2**20, include_dashboard=False,
         log_to_driver=False, _temp_dir=ray_tmp)


@ray.remote(num_cpus=0)  # the CPUs are left to Ray Data's read tasks
class Worker:
    def __init__(self):
        import logging
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        self.cgroup = None

    def cap(self, root: str, headroom_mb: int) -> dict:
        """Move this process into a new memory cgroup allowing `headroom_mb` MiB of new memory."""
        from raygen.train.memory import current_rss_mb
        folder = Path(root) / f"raygen-stream-{os.getpid()}"
        folder.mkdir()
        v1 = (folder / "memory.limit_in_bytes").exists()
        (folder / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(headroom_mb * 2**20))
        (folder / "cgroup.procs").write_text(str(os.getpid()))
        self.cgroup = folder
        return {"cgroup": str(folder), "rss_mb": current_rss_mb(), "pid": os.getpid()}

    def epoch(self, folder: str, epoch: int) -> dict:
        import torch
        from raygen.data import build_datasets
        from raygen.data.pipeline import rank_shards
        from raygen.data.worker import WorkerBatches
        from raygen.spec.schema import DataSpec
        from raygen.train.memory import current_rss_mb, peak_rss_mb, reset_peak_rss
        torch.set_num_threads(1)
        spec = DataSpec(dataset=folder, resolution=64, channels=3, batch_size=32, augment={"hflip": True})
        shard = rank_shards(build_datasets(folder, spec)["train"], 1)[0]
        data = WorkerBatches(shard, spec, rank=0, world_size=1, train=True)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.ReLU(),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        reset_peak_rss()
        t0, rows = time.perf_counter(), 0
        for batch in data.epoch(epoch):
            loss = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rows += len(batch["label"])
        return {"rows": rows, "steps": data.steps_per_epoch, "seconds": time.perf_counter() - t0,
                "peak_rss_mb": peak_rss_mb(), "rss_mb": current_rss_mb()}

    def cgroup_stats(self) -> dict:
        if self.cgroup is None:
            return {}
        read = lambda name: (self.cgroup / name).read_text() if (self.cgroup / name).exists() else ""
        v1 = (self.cgroup / "memory.max_usage_in_bytes").exists()
        peak = read("memory.max_usage_in_bytes" if v1 else "memory.peak").strip()
        events = read("memory.oom_control" if v1 else "memory.events")
        kills = next((int(l.split()[1]) for l in events.splitlines() if l.startswith("oom_kill ")), 0)
        return {"cgroup_peak_mb": int(peak) / 2**20 if peak.isdigit() else None, "oom_kills": kills}


w = Worker.remote()
out = {"warmup": ray.get(w.epoch.remote(str(work / "data-1"), 0))}
out["cap"] = ray.get(w.cap.remote(cgroup_root, headroom_mb))
for k in (1, 4, 16):
    out[f"{k}x"] = ray.get(w.epoch.remote(str(work / f"data-{k}"), 1))
    print(k, out[f"{k}x"], flush=True)
out["cgroup"] = ray.get(w.cgroup_stats.remote())
print("RESULT " + json.dumps(out), flush=True)
ray.shutdown()
'''


@pytest.mark.slow
@pytest.mark.e2e  # about 65 s on 2 loaded cores, most of it starting Ray and writing the data
def test_a_training_epoch_streams_in_flat_memory_under_a_cap(tmp_path):
    root = memory_cgroup_root()
    if root is None:
        pytest.skip("no memory cgroup can be made here (read-only /sys/fs/cgroup): nothing to cap a worker with")
    for k in (1, 4, 16):
        write_dataset(tmp_path / f"data-{k}", ROWS_1X * k)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    ray_tmp = Path(tempfile.mkdtemp(prefix="rg-ms-"))  # Ray's socket paths must stay short
    try:
        done = subprocess.run([sys.executable, "-c", DRIVER, str(root), str(tmp_path), str(OBJECT_STORE_MB),
                               str(HEADROOM_MB), str(ray_tmp)], capture_output=True, text=True, timeout=420, env=env)
    finally:
        stop_own_ray_processes(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        for left in root.glob("raygen-stream-*"):  # the worker's cgroup, once its process is gone
            try:
                left.rmdir()
            except OSError:
                pass
    assert "RESULT " in done.stdout, f"the worker or the driver died (rc {done.returncode}):\n" \
                                     f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    out = json.loads(done.stdout.split("RESULT ")[1].splitlines()[0])
    decoded_16x = ROWS_1X * 16 * SIDE * SIDE * 3 / 2**20
    assert decoded_16x > HEADROOM_MB and decoded_16x > OBJECT_STORE_MB  # the data does not fit under the caps
    for k in (1, 4, 16):
        assert out[f"{k}x"]["rows"] == out[f"{k}x"]["steps"] * 32 == (ROWS_1X * k // 32) * 32
    peaks = {k: out[f"{k}x"]["peak_rss_mb"] for k in (1, 4, 16)}
    print("peak RSS per size:", peaks, "cgroup:", out["cgroup"], "seconds:",
          {k: round(out[f"{k}x"]["seconds"], 1) for k in (1, 4, 16)})
    assert out["cgroup"]["oom_kills"] == 0
    assert max(peaks.values()) <= 1.10 * peaks[1], peaks
    assert min(peaks.values()) >= 0.90 * peaks[1], peaks
