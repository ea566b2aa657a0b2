"""Seed 001's claims about the inr family, measured at tiny CPU scale with equal steps.

Every run trains on the same Kali-set patches (300 training images: the seed's
"small data"), with the seed's augmentation (h/v flips, pixel shifts, by the
data worker's own `augment_batch`), for the same number of steps, and reports
the validation L1 of the reconstructions and the seconds per step. A
reconstruction grid per run (rows: originals, 1x, 2x rendered then shown at
the same size) goes to --grids.

    OMP_NUM_THREADS=1 python bench/inr_claims.py --steps 300 --seeds 0 1 --grids docs/img/inr
    python bench/inr_claims.py --smoke      # seconds: that it runs (CI)

Plain torch, no Ray: the numbers are the model's, not the platform's.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BASE = {"code_size": 25, "cnn": {"channels": [16, 24, 32]}, "decoder": {"hid": 64, "blocks": 2, "layers": 2},
        "loss": "l1", "constraint": 1e-4}
RUNS = {  # name -> overrides of BASE
    "cnn": {},
    "resnet18": {"encoder": "resnet18"},
    "constraint-0.1": {"constraint": 0.1},
    "decoder-large": {"decoder": {"hid": 128, "blocks": 4, "layers": 2}},
    "add-8x2x16": {"decoder": {"hid": 16, "blocks": 8, "layers": 2}},
    "concat-8x2x16": {"decoder": {"hid": 16, "blocks": 8, "layers": 2, "concat": [True, False] * 4}},
}


def kali(root: Path, count: int, size: int):
    from raygen.data.local import load_split_images
    from raygen.data.prepare import prepare_dataset
    from raygen.spec.schema import DataSpec
    out = root / f"kali-{size}-{count}"
    if not (out / "manifest.json").exists():
        prepare_dataset("kali", out, resolution=size, channels=3, count=count, seed=0, val_fraction=0.25,
                        render_size=4 * size, patch=size)
    spec = DataSpec(dataset=str(out), resolution=size, channels=3)
    return load_split_images(out, "train", spec)["image"], load_split_images(out, "val", spec)["image"]


def run(name: str, overrides: dict, train: torch.Tensor, val: torch.Tensor, steps: int, seed: int,
        grids: Path | None) -> dict:
    from raygen.data.augment import augment_batch
    from raygen.images import save_grid
    from raygen.models import DataInfo, build_model
    from raygen.spec.schema import AugmentSpec
    options = {**BASE, **overrides}
    torch.manual_seed(seed)
    model = build_model("inr", options, DataInfo(channels=3, resolution=train.shape[-1]))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3)
    g, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    aug = AugmentSpec(hflip=True, vflip=True, shift=2)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        x = train[torch.randint(len(train), (32,), generator=g)]
        x = torch.from_numpy(augment_batch((x * 255).round().byte().numpy(), aug, rng)).float() / 255
        loss = model.training_step({"image": x})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = (time.perf_counter() - t0) / steps
    model.eval()
    with torch.no_grad():
        one = model.reconstruct(val)
        two = model.reconstruct(val, 2 * val.shape[-2], 2 * val.shape[-1])
    result = {"run": name, "seed": seed, "steps": steps, "val_l1": float((one - val).abs().mean()),
              "val_l1_2x_pooled": float((F.avg_pool2d(two, 2) - val).abs().mean()),
              "s_per_step": seconds, "params": sum(p.numel() for p in model.parameters())}
    if grids is not None:  # rows: 8 validation images, their 1x reconstructions (shown at 2x), the 2x renders
        grids.mkdir(parents=True, exist_ok=True)
        up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731 - show 1x at 2x's size
        save_grid(torch.cat([up(val[:8]), up(one[:8]), two[:8]]), grids / f"inr-{name}-seed{seed}.png", upscale=2,
                  nrow=8)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--count", type=int, default=400, help="images in all; a quarter is validation")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--data", default="/tmp/inr-claims-data")
    p.add_argument("--grids", default=None, help="folder for the reconstruction grids, one per run and seed")
    p.add_argument("--out", default=None, help="JSON lines of the results")
    p.add_argument("--smoke", action="store_true", help="two runs of 3 steps on 40 patches in a scratch folder (CI)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.smoke:
        import os
        import tempfile
        scratch = tempfile.mkdtemp(prefix="rg-bench-", dir=os.environ.get("RAY_TMPDIR") or None)
        args.steps, args.count, args.runs, args.seeds = 3, 40, ["cnn", "concat-8x2x16"], [0]
        args.data, args.grids, args.out = f"{scratch}/data", None, None
    train, val = kali(Path(args.data), args.count, args.size)
    print(f"{len(train)} training / {len(val)} validation patches, {args.size} px, {args.steps} steps per run")
    for seed in args.seeds:
        for name in args.runs:
            result = run(name, RUNS[name], train, val, args.steps, seed, Path(args.grids) if args.grids else None)
            print(json.dumps(result), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
