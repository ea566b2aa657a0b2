"""After the last step: final grid, FID against the val split, model logged and registered."""
from __future__ import annotations

from pathlib import Path

import torch

from raygen.spec.schema import JobSpec


def generate(model, records: dict, seed: int, batch: int = 64, params: dict | None = None) -> torch.Tensor:
    """One sample per validation record, conditioned on that record (label for
    label, caption for caption, scene for scene), so FID compares like with like."""
    from raygen.train.sampling import conditions_from_records, sample_set
    return sample_set(model, conditions_from_records(model, records, len(records["image"])), seed, batch, params)


def dataset_extractor(spec: JobSpec, data_dir: Path):
    """The spec's named FID extractor for this dataset (trained once, then cached).
    The domain net is fit on the prepared folder's own fit images (not on a split
    decoded with this spec's settings), so `raygen metrics fid` on the same
    folder finds the same net."""
    from raygen.metrics import get_dataset_extractor

    cache_dir = Path(spec.data.root) / "fid-cache"
    if spec.track.fid.extractor != "domain":
        return get_dataset_extractor(spec.track.fid.extractor, data_dir, cache_dir=cache_dir)
    return get_dataset_extractor("domain", data_dir, cache_dir=cache_dir, steps=spec.track.fid.fit_steps)


def scene_fidelity(model, ref: dict, fake: torch.Tensor) -> dict[str, float]:
    """A scene determines its image: PSNR/SSIM of the samples against the val images of
    their scenes (the procedural renderer's output). Empty for other condition kinds."""
    if model.condition_kind != "scene":
        return {}
    from raygen.metrics import fidelity_metrics
    return {f"scene_{k}": v for k, v in fidelity_metrics(ref["image"][:len(fake)], fake).items()}


def compute_run_fid(spec: JobSpec, model, data_dir: Path, n: int) -> dict:
    """FID/KID of n samples against n val images, with the spec's named extractor,
    plus "fid_floor": the FID of n train images against the same val images, i.e.
    what a perfect generator would score here (cached beside the val statistics),
    and "clip_score" of the same samples when the spec names a scorer."""
    from raygen.train.clip_score import condition_clip_score, load_run_scorer
    from raygen.data import load_split_images
    from raygen.metrics import compute_fid, fid_floor, reference_stats

    cache_dir = Path(spec.data.root) / "fid-cache"
    ref = load_split_images(data_dir, "val", spec.data, limit=n)
    extractor = dataset_extractor(spec, data_dir)
    stats = reference_stats(ref["image"], extractor, cache_dir=cache_dir)
    # conditioned on the val images it is compared with; drawn as the FID hook draws them
    fake = generate(model, ref, seed=spec.train.seed + 1, params=spec.track.fid.sampling)
    result = compute_fid(fake, stats, extractor)
    result.update(scene_fidelity(model, ref, fake))
    train = load_split_images(data_dir, "train", spec.data, limit=stats.n)
    result["fid_floor"] = fid_floor(train["image"], stats, extractor, cache_dir=cache_dir)
    scorer = load_run_scorer(spec)
    if scorer is not None:
        result["clip_score"] = condition_clip_score(scorer, model, ref, fake)
    return result


def hook_fid(spec: JobSpec, last: dict, data_dir: Path) -> dict | None:
    """The FID the FID hook measured at the last step, when it did: the same export weights
    (EMA), seeds, conditions and extractor as `compute_run_fid`, so measuring again would
    give the same figures. None when the last report carries no FID."""
    if last.get("step") != spec.train.steps or not {"fid", "kid", "fid_floor", "fid_samples"} <= set(last):
        return None
    out = {k: last[k] for k in ("fid", "kid", "fid_floor", "clip_score", "scene_psnr", "scene_ssim") if k in last}
    n = int(last["fid_samples"])
    return {**out, "n_generated": n, "n_reference": int(last.get("fid_reference", n)),
            "extractor": dataset_extractor(spec, data_dir).name}


def finish_run(spec: JobSpec, out, tracked, data_dir: Path, *, progress: bool = True) -> None:
    from raygen.exports import load_exported
    from raygen.tracking.models import log_and_register
    from raygen.models import Capability, has
    from raygen.data import load_split_images
    from raygen.train.sampling import cycling_conditions, sample_grid_png

    export = out.checkpoint / "export"
    loaded = load_exported(export)
    name = spec.name if spec.track.register_model else None
    from raygen.tracking.plots import log_loss_curve
    log_loss_curve(tracked, out.run_dir / "loss_curve.png")
    if not has(loaded.model, Capability.SAMPLE):
        # a family that makes no images (a scorer such as clip) has nothing to grid or score with FID
        tracked.log_artifact(out.checkpoint, f"checkpoint/{out.checkpoint.name}")
        out.model_uri = log_and_register(tracked.tracking_uri, tracked.run_id, export, name, step=spec.train.steps,
                                         tags={"raygen.checkpoint": out.checkpoint.name})
        tracked.set_tags({"raygen.model_uri": out.model_uri})
        return
    n = max(16, spec.train.grid_samples)
    # kinds that need real records (image, scene) are conditioned on the first validation images
    val = None if cycling_conditions(loaded.model, n) is not None else load_split_images(data_dir, "val", spec.data,
                                                                                          limit=n)
    out.grid = sample_grid_png(loaded.model, n, out.run_dir / "samples" / "final.png", seed=spec.train.seed,
                               val_records=val)
    tracked.log_artifact(out.grid, "samples")
    tracked.log_artifact(out.checkpoint, f"checkpoint/{out.checkpoint.name}")
    if spec.track.fid.enabled:
        if progress:
            print(f"[raygen] computing FID on {spec.track.fid.samples} samples "
                  f"(extractor: {spec.track.fid.extractor})", flush=True)
        fid = hook_fid(spec, out.metrics, data_dir) or compute_run_fid(spec, loaded.model, data_dir,
                                                                        spec.track.fid.samples)
        fidelity = {k: fid[k] for k in ("scene_psnr", "scene_ssim") if k in fid}
        out.metrics.update({"fid": fid["fid"], "kid": fid["kid"], "fid_floor": fid["fid_floor"], **fidelity})
        tracked.log_metrics({"fid": fid["fid"], "kid": fid["kid"], "fid_floor": fid["fid_floor"],
                             "fid_samples": float(fid["n_generated"]), **fidelity}, step=spec.train.steps)
        if fid.get("clip_score") is not None:
            out.metrics["clip_score"] = fid["clip_score"]
            tracked.log_metrics({"clip_score": fid["clip_score"]}, step=spec.train.steps)
        if progress:  # the floor (train vs val images) is what a perfect generator would score
            clip = f", CLIP score {fid['clip_score']:.2f}" if fid.get("clip_score") is not None else ""
            print(f"[raygen] FID {fid['fid']:.2f} (real-vs-real floor {fid['fid_floor']:.2f}, "
                  f"{fid['n_generated']} samples, {fid['extractor']}){clip}", flush=True)
        tracked.set_tags({"fid.extractor": fid["extractor"], "fid.samples": fid["n_generated"],
                          "fid.reference": f"{data_dir.name}/val ({fid['n_reference']} images)"})
    out.model_uri = log_and_register(tracked.tracking_uri, tracked.run_id, export, name, step=spec.train.steps,
                                     tags={"raygen.checkpoint": out.checkpoint.name})
    tracked.set_tags({"raygen.model_uri": out.model_uri})
