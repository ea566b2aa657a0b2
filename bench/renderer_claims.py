"""Seed 002's claims about the renderer, measured at tiny CPU scale with equal steps.

Each claim is a Tune grid spec (jobs/specs/renderer_claim_*.yaml); `raygen tune
SPEC` runs it on Ray with MLflow. This script runs the same grid points in one
process, on the platform's own engine (`raygen.train.Trainer`, the spec's
optimizer, schedule, clipping, EMA and precision, validation by
`validation_sums`), with the prepared spheres splits held in memory, so a
2-core machine measures every trial in minutes without Ray's start-up per
trial. Reported per trial: val_loss (the spec's loss on the whole val split,
EMA weights), val MSE, PSNR/SSIM against the procedural renderer's images,
parameters and seconds.

    OMP_NUM_THREADS=1 .venv/bin/python bench/renderer_claims.py jobs/specs/renderer_claim_*.yaml --out runs/renderer_claims.json
    .venv/bin/python bench/renderer_claims.py jobs/specs/renderer_claim_mix_bias.yaml --steps 50   # a quick look
    .venv/bin/python bench/renderer_claims.py --smoke    # seconds: 3 steps on 200 scenes (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYGEN_NO_PROGRESS", "1")

import torch  # noqa: E402

COLUMNS = ("image", "scene", "scene_mask", "scene_globals")


class MemoryBatches:
    """A split in memory; each epoch's order is a function of (seed, epoch), like the Ray pipeline's."""

    def __init__(self, records: dict, batch_size: int, *, seed: int = 0, train: bool = True):
        self.records, self.batch_size, self.seed, self.train = records, batch_size, seed, train
        self.corrupt_count = 0

    def epoch(self, epoch: int, skip: int = 0):
        n = len(self.records["image"])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)) \
            if self.train else torch.arange(n)
        stop = n - self.batch_size + 1 if self.train else n  # training drops the ragged tail, validation keeps it
        for i, start in enumerate(range(0, stop, self.batch_size)):
            if i >= skip:
                idx = order[start:start + self.batch_size]
                yield {k: self.records[k][idx] for k in COLUMNS}


def run_trial(spec, data_info, train, val) -> dict:
    from raygen.metrics import fidelity_metrics
    from raygen.models import build_model
    from raygen.train.worker import make_hooks, make_strategy
    from raygen.train.trainer import Trainer
    from raygen.train.validation import validation_metrics, validation_sums
    from raygen.train.wrapup import generate

    torch.manual_seed(spec.train.seed)
    make = lambda: build_model(spec.model.family, spec.model.config, data_info)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(spec=spec, data_info=data_info, make_generator=make,
                          strategy=make_strategy(spec, 1, torch.device("cpu")),
                          train_data=MemoryBatches(train, spec.data.batch_size, seed=spec.train.seed),
                          val_data=MemoryBatches(val, spec.data.batch_size, train=False),
                          hooks=make_hooks(spec, sink=None, run_dir=Path(tmp), progress=False), checkpoints=None)
        t0 = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - t0
        model = trainer.eval_model()
    batches = MemoryBatches(val, spec.data.batch_size, train=False).epoch(0)
    val_loss = validation_metrics(validation_sums(model, batches))["val_loss"]
    fake = generate(model, val, seed=spec.train.seed + 1)
    fid = fidelity_metrics(val["image"], fake)
    return {"val_loss": val_loss, "val_mse": float((fake - val["image"]).pow(2).mean()), "psnr": fid["psnr"],
            "ssim": fid["ssim"], "final_train_loss": trainer.step_losses[-1],
            "parameters": sum(p.numel() for p in model.parameters()), "seconds": round(seconds, 1)}


def trial_key(spec) -> str:
    """What decides a trial's result: data, model and training sections (the name and tune do not)."""
    d = spec.model_dump(mode="json")
    d["model"]["options"] = spec.model.config.model_dump(mode="json")  # defaults filled in: equal configs, one key
    return json.dumps({k: d[k] for k in ("data", "model", "train")}, sort_keys=True)


def run_claim(path: Path, overrides: dict, cache: dict[str, dict]) -> list[dict]:
    from raygen.data import ensure_dataset, load_split_images
    from raygen.data.manifest import read_manifest
    from raygen.spec import load_spec, parse_spec
    from raygen.spec.loader import apply_overrides, spec_to_dict
    from raygen.tune.space import grid_points

    base = load_spec(path, {k: v for k, v in overrides.items() if not k.startswith("train.")})
    data_dir = ensure_dataset(base.data)
    info = read_manifest(data_dir).data_info(base.data)
    train = load_split_images(data_dir, "train", base.data)
    val = load_split_images(data_dir, "val", base.data)
    rows = []
    for point in grid_points(base.tune):
        over = dict(point, **{k: v for k, v in overrides.items() if k.startswith("train.")})
        spec = parse_spec(apply_overrides(spec_to_dict(base), over))
        key = trial_key(spec)  # a point two claims share (the baseline) runs once
        if key not in cache:
            cache[key] = run_trial(spec, info, train, val)
        rows.append({"claim": base.name, "point": point, "steps": spec.train.steps, **cache[key]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("specs", nargs="*", type=Path)
    p.add_argument("--steps", type=int, help="override train.steps (every trial gets the same)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    p.add_argument("--smoke", action="store_true", help="one claim, 3 steps on 200 scenes in a temp folder")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {"train.steps": args.steps} if args.steps else {}
    specs = args.specs
    if args.smoke:
        specs = [Path(__file__).resolve().parents[1] / "jobs" / "specs" / "renderer_claim_mix_bias.yaml"]
        overrides = {"train.steps": 3, "train.schedule.warmup_steps": 1, "data.count": 200,
                     "data.root": tempfile.mkdtemp(prefix="rg-bench-renderer-")}
    if not specs:
        p.error("give claim specs (jobs/specs/renderer_claim_*.yaml) or --smoke")
    cache: dict[str, dict] = {}
    rows = [row for path in specs for row in run_claim(path, overrides, cache)]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
