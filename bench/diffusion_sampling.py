"""Wall time and FID of diffusion samplers at one trained checkpoint, in one run.

The same model, the same images' conditions (the first N validation records,
as FID during training draws them), the same seeds and the same FID
extractor (the spec's: the domain feature net by default) for every sampler:
DDPM-1000, DDIM-50 and DPM-Solver++-20 by default. Prints each sampler's
seconds, images per second, speed-up over the first (the reference, DDPM)
and FID, and the target verdict: at least 15x faster than DDPM-1000 at an FID
within 10% of it (the DDIM paper: CIFAR-10 FID 4.67 at 50 steps vs 4.04 at 1000).

    .venv/bin/python bench/diffusion_sampling.py runs/diffusion-fashion --n 500 --threads 2
    .venv/bin/python bench/diffusion_sampling.py MODEL --samplers ddpm:1000 ddim:50 ddim:25 dpmsolver++:20 dpmsolver++:10
    .venv/bin/python bench/diffusion_sampling.py --smoke          # seconds: trains a tiny model in-process (CI)

MODEL is anything `raygen sample` takes (a run folder, an export, models:/NAME/VERSION).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

SPEED_TARGET, FID_TOLERANCE = 15.0, 0.10


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_samples(model, conditions, params, seed: int, batch: int) -> tuple[float, torch.Tensor]:
    from raygen.models.sampling import image_seeds, make_generators
    device = next(model.parameters()).device
    seeds = image_seeds(seed, conditions.n)
    out = []
    _sync(device)
    start = time.perf_counter()
    for lo in range(0, conditions.n, batch):
        hi = min(lo + batch, conditions.n)
        out.append(model.sample(conditions[lo:hi], params, make_generators(seeds[lo:hi], device)).cpu())
    _sync(device)
    return time.perf_counter() - start, torch.cat(out)


def parse_sampler(text: str) -> tuple[str, int]:
    name, _, steps = text.partition(":")
    if not steps.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: give SAMPLER:STEPS, e.g. ddim:50")
    return name, int(steps)


def smoke_model(work: Path):
    """A tiny class-conditional model trained a few steps on prepared 8x8 digits, exported like a run."""
    from raygen.data import ensure_dataset, load_split_images
    from raygen.exports import export_generator
    from raygen.models import build_model
    from raygen.spec import parse_spec

    spec = parse_spec({"name": "bench-smoke", "data": {"dataset": "digits", "resolution": 8, "count": 300,
                                                       "root": str(work / "data")},
                       "model": {"family": "diffusion", "options": {
                           "conditioning": "label", "unet": {"widths": [8, 16], "head_dim": 8, "norm_groups": 4,
                                                             "layers_per_block": 1},
                           "noise": {"train_timesteps": 100}}},
                       "track": {"fid": {"samples": 16, "fit_steps": 10}}})
    data_dir = ensure_dataset(spec.data)
    train = load_split_images(data_dir, "train", spec.data, limit=64)
    from raygen.data.manifest import read_manifest
    info = read_manifest(data_dir).data_info(spec.data)  # what a run would store beside its weights
    torch.manual_seed(0)
    model = build_model("diffusion", spec.model.config, info)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(10):
        idx = torch.arange(16) + 16 * (step % 4)
        loss = model.training_step({"image": train["image"][idx], "label": train["label"][idx]})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    export_generator(work / "model", model.state_dict(), spec, info, {"step": 10})
    return str(work / "model")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="a trained diffusion model (run folder, export, models:/...)")
    ap.add_argument("--samplers", nargs="+", type=parse_sampler,
                    default=[("ddpm", 1000), ("ddim", 50), ("dpmsolver++", 20)],
                    help="SAMPLER:STEPS; the first is the reference of the speed-up and FID ratios")
    ap.add_argument("--n", type=int, default=None, help="images per sampler (default: the spec's track.fid.samples)")
    ap.add_argument("--guidance-scale", type=float, default=None, help="default: the model's")
    ap.add_argument("--batch", type=int, default=100, help="images per sample() call")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tracking-uri", help="MLflow store for models:/ URIs")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--smoke", action="store_true", help="a tiny model trained in-process, 16 images: that it runs")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="rg-bench-", dir=os.environ.get("RAY_TMPDIR") or None))
    if args.smoke:
        args.model = smoke_model(work)
        args.samplers, args.n = [("ddpm", 40), ("ddim", 4), ("dpmsolver++", 3)], 16
    if not args.model:
        ap.error("give MODEL (or --smoke)")

    from raygen.data import ensure_dataset, load_split_images
    from raygen.exports import load_generator
    from raygen.metrics import FIDEvaluator
    from raygen.models import parse_params
    from raygen.train.sampling import conditions_from_records
    from raygen.train.wrapup import dataset_extractor

    loaded = load_generator(args.model, args.tracking_uri)
    model, spec = loaded.model.to(args.device).eval(), loaded.spec
    if model.family != "diffusion":
        ap.error(f"{args.model} is a {model.family} model; this benchmark compares diffusion samplers")
    n = args.n or spec.track.fid.samples
    data_dir = ensure_dataset(spec.data)
    ref = load_split_images(data_dir, "val", spec.data, limit=n)
    extractor = dataset_extractor(spec, data_dir)
    evaluator = FIDEvaluator(extractor, ref["image"], cache_dir=Path(spec.data.root) / "fid-cache")
    conditions = conditions_from_records(model, ref, n)
    guidance = args.guidance_scale if args.guidance_scale is not None else model.config.sampling.guidance_scale
    print(f"diffusion sampling, {args.model} (step {loaded.meta.get('step', '?')}), {n} images, "
          f"guidance {guidance}, extractor {extractor.name}, device {args.device}, {torch.get_num_threads()} threads")
    print(f"{'sampler':<12} {'steps':>5} {'seconds':>9} {'img/s':>8} {'speed-up':>9} {'FID':>8} {'FID ratio':>9}")
    rows = []
    timed_samples(model, conditions[:2], parse_params(model.sampling_params, {"num_inference_steps": 2}), 0, 2)
    for name, steps in args.samplers:
        params = parse_params(model.sampling_params, {"sampler": name, "num_inference_steps": steps,
                                                      "guidance_scale": guidance})
        seconds, images = timed_samples(model, conditions, params, args.seed, args.batch)
        fid = evaluator(images)
        ref_row = rows[0] if rows else None
        row = dict(sampler=name, steps=steps, seconds=seconds, images_per_s=n / seconds, fid=fid["fid"],
                   kid=fid["kid"], speedup=(ref_row["seconds"] / seconds) if ref_row else 1.0,
                   fid_ratio=(fid["fid"] / ref_row["fid"]) if ref_row else 1.0)
        rows.append(row)
        print(f"{name:<12} {steps:>5} {seconds:>9.1f} {n / seconds:>8.2f} {row['speedup']:>8.1f}x {fid['fid']:>8.2f} "
              f"{row['fid_ratio']:>9.3f}", flush=True)
    for row in rows[1:]:
        ok = row["speedup"] >= SPEED_TARGET and row["fid_ratio"] <= 1 + FID_TOLERANCE
        print(f"{row['sampler']}-{row['steps']} vs {rows[0]['sampler']}-{rows[0]['steps']}: {row['speedup']:.1f}x "
              f"faster, FID {row['fid']:.2f} vs {rows[0]['fid']:.2f} ({100 * (row['fid_ratio'] - 1):+.1f}%): "
              f"{'meets' if ok else 'misses'} the target (>= {SPEED_TARGET:.0f}x, FID within "
              f"{100 * FID_TOLERANCE:.0f}%)")
    if args.smoke:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "n": n,
                                               "extractor": extractor.name, "results": rows}, indent=2, default=str))
    return rows


if __name__ == "__main__":
    main()
