"""Images per second of seqimg sampling with and without the cache, same run.

Cached sampling carries each backbone's state (KV cache, recurrent state,
conv/scan buffers, past-input buffers) and runs one step per patch; uncached
sampling re-runs the whole prefix for every patch. Both paths draw the same
random numbers; this script also reports how far their images differ (float
rounding only: 0 or ~1e-7, and the count of 8-bit values that differ).

Two ratios per row:
- ratio: whole sampling, cached / uncached images per second (the target:
  at least 5x for the transformers);
- backbone: the backbone alone (hidden states for every position, one step
  each vs a re-run of the prefix each), which isolates what the cache saves.

Costs both paths pay alike bound the whole-sampling ratio: the categorical
head's 256 logits per sub-pixel (96 sub-pixels per token for rowwise 32x32
RGB: a 256 -> 24,576 projection, larger than a dim-256 transformer layer),
and per-step Python and kernel-launch overhead, which dominates tiny models
on the CPU and every model here on a GPU. The defaults are a generator of
useful size (dim 256, depth 6) sampling 128 images per call; the whole
default grid takes about an hour on 2 cores.

    .venv/bin/python bench/seqimg_sampling.py --threads 1                          # every backbone, 32x32 RGB
    .venv/bin/python bench/seqimg_sampling.py --backbones gpt2 alibi modern --threads 1   # the target's subject
    .venv/bin/python bench/seqimg_sampling.py --dim 64 --depth 3 --n 32            # a tiny model: overhead-bound
    .venv/bin/python bench/seqimg_sampling.py --smoke                              # seconds: that it runs (CI)

Sampling goes through the family protocol's friendly front,
`model.generate(n, seed=..., use_cache=...)` (one generator per image).
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from raygen.images import quantize
from raygen.models.base import DataInfo
from raygen.models.seqimg import BACKBONES, SeqImgConfig, build_seqimg

TRANSFORMERS = ("gpt2", "alibi", "modern")
TARGET = 5.0  # the speed-up the transformers' KV cache should reach at least


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(model, n: int, seed: int, use_cache: bool) -> tuple[float, torch.Tensor]:
    device = model.embed.weight.device
    _sync(device)
    start = time.perf_counter()
    images = model.generate(n, seed=seed, use_cache=use_cache)
    _sync(device)
    return time.perf_counter() - start, images


@torch.no_grad()
def backbone_seconds(model, n: int, use_cache: bool) -> float:
    """The backbone's own share of sampling: hidden states for every patch
    position of n images, one step per position with the cache, or a re-run
    of the prefix per position without it (no head, no sampler)."""
    backbone, device = model.backbone, model.embed.weight.device
    tokens = torch.randn(n, model.seq_len, model.config.dim, generator=torch.Generator().manual_seed(0)).to(device)
    _sync(device)
    start = time.perf_counter()
    state = None
    for t in range(model.seq_len):
        if use_cache:
            h, state = backbone.step(tokens[:, t], state)
        else:
            h = backbone(tokens[:, :t + 1])[:, -1]
    _sync(device)
    return time.perf_counter() - start


def compare(model, n: int, repeats: int) -> tuple[float, float, torch.Tensor, torch.Tensor, float]:
    """Best-of-`repeats` images/s of both paths (cached and uncached calls are
    interleaved so both see the same machine load), their images, and the
    speed-up of the backbone alone."""
    model.generate(2, use_cache=True)  # warm-up
    model.generate(2, use_cache=False)
    best = {True: float("inf"), False: float("inf")}
    for i in range(repeats):
        for use_cache in (True, False):
            seconds, images = _timed(model, n, i, use_cache)
            best[use_cache] = min(best[use_cache], seconds)
            if use_cache:
                a = images
            else:
                b = images
    backbone = {c: min(backbone_seconds(model, n, c) for _ in range(repeats)) for c in (True, False)}
    return n / best[True], n / best[False], a, b, backbone[False] / backbone[True]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=sorted(BACKBONES), choices=sorted(BACKBONES))
    ap.add_argument("--modes", nargs="+", default=["rowwise", "square"], choices=["rowwise", "columnwise", "square"])
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--head", nargs="+", default=["categorical", "regression_l2"],
                    choices=["categorical", "regression_l1", "regression_l2"],
                    help="the categorical head's 256 logits per sub-pixel are a per-step cost both paths pay")
    ap.add_argument("--patch-size", type=int, default=4, help="side of square patches (rowwise/columnwise use 1)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--attn-heads", type=int, default=4)
    ap.add_argument("--n", type=int, default=128, help="images per sample() call")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per path; the best is kept")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--smoke", action="store_true", help="two tiny models, a few images: checks that it runs (CI)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.backbones, args.modes, args.head = ["gpt2", "lstm"], ["rowwise"], ["categorical"]
        args.resolution, args.channels, args.dim, args.depth, args.n, args.repeats = 8, 1, 16, 1, 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    info = DataInfo(channels=args.channels, resolution=args.resolution)
    print(f"seqimg sampling, {args.resolution}x{args.resolution}x{args.channels}, dim {args.dim}, depth {args.depth}, "
          f"{args.n} images per call, device {args.device}, {torch.get_num_threads()} threads")
    print(f"{'head':<13} {'backbone':<9} {'mode':<10} {'tokens':>6} {'cached img/s':>13} {'uncached img/s':>15} "
          f"{'ratio':>7} {'backbone':>9}  {'max |diff|':>10} {'8-bit flips':>11}")
    rows = []
    for head, mode, backbone in itertools.product(args.head, args.modes, args.backbones):
        torch.manual_seed(0)
        cfg = SeqImgConfig(backbone=backbone, patch_mode=mode, dim=args.dim, depth=args.depth, head=head,
                           heads=args.attn_heads,
                           patch_size=args.patch_size if mode == "square" else 1)
        model = build_seqimg(cfg, info).to(args.device).eval()
        cached, uncached, a, b, backbone_ratio = compare(model, args.n, args.repeats)
        diff = (a - b).abs().max().item()
        flips = int((quantize(a) != quantize(b)).sum())  # 8-bit values as every PNG raygen writes has them
        ratio = cached / uncached
        rows.append(dict(head=head, backbone=backbone, mode=mode, tokens=model.seq_len, cached=cached, uncached=uncached,
                         ratio=ratio, backbone_ratio=backbone_ratio, max_abs_diff=diff, flipped_8bit_values=flips))
        flag = "  (below target)" if backbone in TRANSFORMERS and ratio < TARGET and not args.smoke else ""
        print(f"{head:<13} {backbone:<9} {mode:<10} {model.seq_len:>6} {cached:>13.1f} {uncached:>15.1f} {ratio:>6.1f}x {backbone_ratio:>8.1f}x  "
              f"{diff:>10.1e} {flips:>11}{flag}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
