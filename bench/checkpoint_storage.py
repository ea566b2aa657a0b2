"""Checkpoint save and restore time: local disk against S3, same model.

One seqimg model (and its AdamW state after one step) is checkpointed the
way a training run does it, into a folder committed with raygen's
CheckpointManager (temp folder, COMPLETE marker, rename):

    local  save: commit the folder on local disk
           restore: load the weights and optimizer state from it
    s3     save: the same commit, then the upload Ray Train makes of a
           reported checkpoint when `scale.storage` is s3:// (pyarrow
           filesystem copy, raygen.storage.upload_dir)
           restore: download the folder (raygen.storage.download_dir), then load

S3 is a local `moto_server` on 127.0.0.1 started here (a subprocess, stopped
by pid), so the ratio measures the object-store protocol and copy overhead
on one machine, not a network: on a real cluster bandwidth to the bucket
adds to it. Timings are medians over `--repeats`, alternating local and s3.

    .venv/bin/python bench/checkpoint_storage.py                 # dim 256, depth 4, 5 repeats
    .venv/bin/python bench/checkpoint_storage.py --dim 512 --depth 8
    .venv/bin/python bench/checkpoint_storage.py --smoke         # seconds: that it runs (CI), not a figure

The last line printed is the headline: s3/local time ratios for save and restore.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from raygen import storage
from raygen.models.base import DataInfo
from raygen.models.registry import build_model
from raygen.train.checkpoint import CheckpointManager, find_latest_checkpoint, load_torch, save_torch


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=2).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {log.read_text()[-1000:]}")
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("moto_server did not start in 60 s")


def make_state(dim: int, depth: int) -> dict:
    info = DataInfo(channels=1, height=16, width=16, num_classes=10, class_names=[str(i) for i in range(10)])
    model = build_model("seqimg", {"backbone": "gpt2", "dim": dim, "depth": depth, "heads": 4}, info)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def save_local(root: Path, step: int, state: dict) -> Path:
    manager = CheckpointManager(root, keep_last=1)
    tmp = manager.begin(step)
    save_torch(state, tmp / "state.pt")
    return manager.commit(step, {"step": step})


def restore(folder: Path) -> dict:
    return load_torch(find_latest_checkpoint(folder) / "state.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 repeat: that it runs, not a figure")
    args = ap.parse_args()
    if args.smoke:
        args.dim, args.depth, args.repeats = 16, 1, 1
    torch.manual_seed(0)
    state = make_state(args.dim, args.depth)
    work = Path(tempfile.mkdtemp(prefix="rg-ckpt-bench-"))
    proc, url = start_moto(work / "moto.log")
    # a throwaway local endpoint and dummy keys: only this process's environment
    os.environ.update({"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        import boto3
        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="bench")
        times: dict[str, list[float]] = {k: [] for k in ("local save", "local restore", "s3 save", "s3 restore")}
        size = 0
        for i in range(args.repeats):
            t = time.perf_counter()
            folder = save_local(work / f"local-{i}", 1, state)
            times["local save"].append(time.perf_counter() - t)
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            t = time.perf_counter()
            back = restore(work / f"local-{i}")
            times["local restore"].append(time.perf_counter() - t)
            assert torch.equal(next(iter(back["model"].values())), next(iter(state["model"].values())))

            uri = f"s3://bench/run-{i}/checkpoint"
            t = time.perf_counter()
            folder = save_local(work / f"s3-{i}", 1, state)
            storage.upload_dir(folder, uri, last=("COMPLETE",))
            times["s3 save"].append(time.perf_counter() - t)
            shutil.rmtree(work / f"s3-{i}")
            t = time.perf_counter()
            storage.download_dir(uri, work / f"restored-{i}" / "step-00000001")
            back = restore(work / f"restored-{i}")
            times["s3 restore"].append(time.perf_counter() - t)
            assert torch.equal(next(iter(back["model"].values())), next(iter(state["model"].values())))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"checkpoint of seqimg gpt2 dim {args.dim} depth {args.depth}: {size / 2**20:.1f} MiB "
              f"(weights + AdamW state), {args.repeats} repeat(s), medians")
        for k, v in med.items():
            print(f"  {k:14s} {v * 1000:8.1f} ms   ({size / 2**20 / v:7.1f} MiB/s)")
        print(f"s3 (moto, loopback) / local disk: save {med['s3 save'] / med['local save']:.2f}x, "
              f"restore {med['s3 restore'] / med['local restore']:.2f}x")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
