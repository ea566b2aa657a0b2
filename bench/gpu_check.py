"""The checks CPU CI cannot run, in one short script for a GPU machine.

1. seqimg training on real Fashion-MNIST shards through the platform's own
   Trainer and strategies, in each precision and strategy a GPU adds:
   DDP fp32 / bf16 / fp16 (dynamic loss scale with a floor), DeepSpeed ZeRO-2
   fp16 and bf16, ZeRO-3 fp16, ZeRO-2 with the optimizer offloaded to the CPU.
   Each row: first and last loss, val bits/dim, images/s, steps skipped as
   non-finite, final loss scale, peak GPU memory.
2. Cached versus uncached seqimg sampling on the GPU (bench/seqimg_sampling.py).

    python bench/gpu_check.py --data runs/data/fashion-mnist-XXXX --json gpu.json
    python bench/gpu_check.py --smoke     # seconds, random data, two cases: that it runs (CI)

One process, world size 1 (a process group is started here, as Ray Train
would). Without a GPU it runs on the CPU with fp16 cases skipped, which is how
it is checked before spending GPU time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from raygen.data.local import load_split_images  # noqa: E402
from raygen.models.base import DataInfo  # noqa: E402
from raygen.models.registry import build_model  # noqa: E402
from raygen.spec import parse_spec  # noqa: E402
from raygen.train.hooks import GradClipHook  # noqa: E402
from raygen.train.trainer import Trainer  # noqa: E402
from raygen.train.worker import make_strategy  # noqa: E402

CASES = [  # (name, strategy, precision, zero stage, offload optimizer)
    ("ddp-fp32", "ddp", "fp32", 0, False),
    ("ddp-bf16", "ddp", "bf16", 0, False),
    ("ddp-fp16", "ddp", "fp16", 0, False),
    ("zero2-fp16", "deepspeed", "fp16", 2, False),
    ("zero2-bf16", "deepspeed", "bf16", 2, False),
    ("zero3-fp16", "deepspeed", "fp16", 3, False),
    ("zero2-bf16-offload", "deepspeed", "bf16", 2, True),
]


class TensorBatches:
    """Epochs over in-memory images; order is a function of (seed, epoch)."""

    def __init__(self, data: dict, batch_size: int, shuffle: bool, seed: int = 0):
        self.image, self.label = data["image"], data["label"]
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.corrupt_count = 0

    def epoch(self, epoch: int, skip: int = 0):
        n = len(self.image)
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        for i, start in enumerate(range(0, n - self.batch_size + 1, self.batch_size)):
            if i >= skip:
                idx = order[start:start + self.batch_size]
                yield {"image": self.image[idx], "label": self.label[idx]}


def _spec(args, strategy: str, precision: str, zero: int, offload: bool):
    return parse_spec({
        "data": {"dataset": "fashion-mnist", "resolution": 16, "channels": 1, "batch_size": args.batch_size},
        "model": {"family": "seqimg", "options": {"backbone": args.backbone, "patch_mode": "rowwise",
                                                  "head": "categorical", "dim": args.dim, "depth": args.depth}},
        "train": {"steps": args.steps, "precision": precision, "log_every": 10**9, "eval_every": 10**9,
                  "checkpoint_every": 10**9, "optimizer": {"name": "adamw", "lr": 1e-3},
                  "schedule": {"name": "warmup_cosine", "warmup_steps": 50}, "clip": {"norm": 1.0},
                  "ema": {"enabled": False}},
        "scale": {"workers": 1, "strategy": strategy, "zero_stage": zero, "offload_optimizer": offload,
                  "use_gpu": torch.cuda.is_available()},
    })


def train_case(args, name, strategy, precision, zero, offload, train, val, info, device) -> dict:
    spec = _spec(args, strategy, precision, zero, offload)
    hooks = [GradClipHook(spec.train.clip.norm, None)]  # under every strategy (raygen clips, not DeepSpeed)
    trainer = Trainer(spec=spec, data_info=info, make_generator=lambda: build_model("seqimg", spec.model.config, info),
                      strategy=make_strategy(spec, 1, device), train_data=TensorBatches(train, args.batch_size, True),
                      val_data=TensorBatches(val, min(256, len(val["image"])), False), hooks=hooks, checkpoints=None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.fit()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    val_metrics = trainer.evaluate()
    losses = trainer.step_losses
    finite = [x for x in losses if math.isfinite(x)]
    head, tail = finite[:20], finite[-20:]
    return {"case": name, "strategy": strategy, "precision": precision, "zero_stage": zero, "offload_optimizer": offload,
            "steps": len(losses), "first_loss": sum(head) / max(len(head), 1), "last_loss": sum(tail) / max(len(tail), 1),
            "non_finite_steps": len(losses) - len(finite), "bad_steps": trainer.state.bad_steps,
            "loss_scale": trainer.last_metrics.get("loss_scale"),
            "val_bits_per_dim": val_metrics.get("val_bits_per_dim"), "val_loss": val_metrics.get("val_loss"),
            "images_per_s": len(losses) * args.batch_size / seconds, "seconds": seconds,
            "gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="a prepared fashion-mnist folder at 16x16 (runs/data/fashion-mnist-*); "
                                   "required unless --smoke")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--backbone", default="gpt2")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--cases", nargs="+", default=[c[0] for c in CASES])
    ap.add_argument("--no-sampling", action="store_true", help="skip the sampling benchmark")
    ap.add_argument("--sampling-n", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--sampling-backbones", nargs="+", default=["gpt2", "alibi", "modern", "lstm", "mamba"])
    ap.add_argument("--sampling-heads", nargs="+", default=["categorical", "regression_l2"])
    ap.add_argument("--json", help="write every result here")
    ap.add_argument("--smoke", action="store_true",
                    help="random data, a tiny model, DDP fp32 and ZeRO-2 bf16, tiny sampling: checks that it runs (CI)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.dim, args.depth = 3, 8, 16, 1
        args.sampling_n = [4]
        if args.cases == [c[0] for c in CASES]:  # not chosen on the command line
            args.cases = ["ddp-fp32", "zero2-bf16"]
        args.sampling_backbones, args.sampling_heads = ["gpt2"], ["categorical"]
    elif not args.data:
        ap.error("--data is required (or --smoke)")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533" if not args.smoke else str(_free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)

    spec = _spec(args, "ddp", "fp32", 0, False)
    if args.smoke:  # random 16x16 images in 8-bit levels, labels: no prepared dataset needed
        g = torch.Generator().manual_seed(0)
        train, val = ({"image": torch.randint(0, 256, (n, 1, 16, 16), generator=g).float() / 255,
                       "label": torch.randint(0, 10, (n,), generator=g)} for n in (64, 32))
    else:
        train = load_split_images(args.data, "train", spec.data)
        val = load_split_images(args.data, "val", spec.data, limit=1024)
    info = DataInfo(channels=1, resolution=16, num_classes=10)
    print(f"data: {len(train['image'])} train / {len(val['image'])} val images, 16x16", flush=True)

    results: dict = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
                     "training": [], "sampling": []}
    print(f"{'case':<20} {'first loss':>10} {'last loss':>10} {'val bpd':>8} {'img/s':>8} {'skipped':>7} "
          f"{'scale':>8} {'GPU MB':>8}", flush=True)
    for name, strategy, precision, zero, offload in CASES:
        if name not in args.cases:
            continue
        if precision == "fp16" and not cuda:
            print(f"{name:<20} skipped: fp16 needs a GPU", flush=True)
            continue
        try:
            row = train_case(args, name, strategy, precision, zero, offload, train, val, info, device)
        except Exception as err:  # report and go on: one broken case must not hide the others
            row = {"case": name, "error": f"{type(err).__name__}: {err}"}
            print(f"{name:<20} FAILED {row['error'][:300]}", flush=True)
        else:
            fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
            print(f"{name:<20} {row['first_loss']:>10.3f} {row['last_loss']:>10.3f} {fmt(row['val_bits_per_dim'], '>8.3f')} "
                  f"{row['images_per_s']:>8.0f} {row['bad_steps']:>7} {fmt(row['loss_scale'], '>8.0f')} "
                  f"{fmt(row['gpu_peak_mb'], '>8.0f')}", flush=True)
        results["training"].append(row)

    if not args.no_sampling:
        import seqimg_sampling
        for n in args.sampling_n:
            results["sampling"] += seqimg_sampling.main(
                ["--device", str(device), "--backbones", *args.sampling_backbones, "--head", *args.sampling_heads,
                 "--n", str(n), *(["--smoke"] if args.smoke else ["--dim", "256", "--depth", "6", "--repeats", "2"])])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
