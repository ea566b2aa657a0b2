"""After the last step: final grid, FID against the val split, model logged and registered."""
from __future__ import annotations

from pathlib import Path

import torch

from raygen.spec.schema import JobSpec


def generate(model, n: int, seed: int, batch: int = 64) -> torch.Tensor:
    """n samples in batches, cycling class labels when the model is class-conditional."""
    from raygen.train.images import class_cycle_labels
    gen = torch.Generator().manual_seed(seed)
    out = []
    kind = getattr(model, "conditioning", "none")
    for start in range(0, n, batch):
        k = min(batch, n - start)
        labels = None
        if kind == "label":
            labels = (class_cycle_labels(start + k, model.data_info.num_classes))[start:]
        captions = None
        if kind == "caption":
            names = model.data_info.class_names or ["an image"]
            captions = [names[(start + i) % len(names)] for i in range(k)]
        out.append(model.sample(k, labels=labels, captions=captions, generator=gen))
    return torch.cat(out)


# The domain feature net is fit on (at most) this many train images; the same
# subset everywhere keeps one cache entry per dataset.
DOMAIN_FIT_IMAGES = 8192


def dataset_extractor(spec: JobSpec, data_dir: Path):
    """The spec's named FID extractor for this dataset (trained once, then cached)."""
    from raygen.data import load_split_images
    from raygen.metrics import get_dataset_extractor

    cache_dir = Path(spec.data.root) / "fid-cache"
    if spec.track.fid.extractor != "domain":
        return get_dataset_extractor(spec.track.fid.extractor, data_dir, cache_dir=cache_dir)
    train = load_split_images(data_dir, "train", spec.data, limit=DOMAIN_FIT_IMAGES)
    return get_dataset_extractor("domain", data_dir, train["image"], train.get("label"), cache_dir,
                                 max_seconds=spec.track.fid.fit_seconds)


def compute_run_fid(spec: JobSpec, model, data_dir: Path, n: int) -> dict:
    """FID/KID of n samples against n val images, with the spec's named extractor."""
    from raygen.data import load_split_images
    from raygen.metrics import compute_fid

    ref = load_split_images(data_dir, "val", spec.data, limit=n)
    extractor = dataset_extractor(spec, data_dir)
    fake = generate(model, min(n, len(ref["image"])), seed=spec.train.seed + 1)
    return compute_fid(fake, ref["image"], extractor)


def finish_run(spec: JobSpec, out, tracked, data_dir: Path, *, progress: bool = True) -> None:
    from raygen.models.io import load_exported
    from raygen.tracking.models import log_and_register
    from raygen.train.images import sample_grid_png

    export = out.checkpoint / "export"
    loaded = load_exported(export)
    name = spec.name if spec.track.register_model else None
    from raygen.tracking.plots import log_loss_curve
    log_loss_curve(tracked, out.run_dir / "loss_curve.png")
    if getattr(loaded.model, "is_scorer", False):
        # a scorer family (clip) has no images to sample or score with FID
        tracked.log_artifact(out.checkpoint, f"checkpoint/{out.checkpoint.name}")
        out.model_uri = log_and_register(tracked.tracking_uri, tracked.run_id, export, name)
        tracked.set_tags({"raygen.model_uri": out.model_uri})
        return
    out.grid = sample_grid_png(loaded.model, max(16, spec.train.grid_samples), out.run_dir / "samples" / "final.png",
                               seed=spec.train.seed)
    tracked.log_artifact(out.grid, "samples")
    tracked.log_artifact(out.checkpoint, f"checkpoint/{out.checkpoint.name}")
    if spec.track.fid.enabled:
        if progress:
            print(f"[raygen] computing FID on {spec.track.fid.samples} samples "
                  f"(extractor: {spec.track.fid.extractor})", flush=True)
        fid = compute_run_fid(spec, loaded.model, data_dir, spec.track.fid.samples)
        out.metrics.update({"fid": fid["fid"], "kid": fid["kid"]})
        tracked.log_metrics({"fid": fid["fid"], "kid": fid["kid"], "fid_samples": float(fid["n_generated"])},
                            step=spec.train.steps)
        tracked.set_tags({"fid.extractor": fid["extractor"], "fid.samples": fid["n_generated"],
                          "fid.reference": f"{data_dir.name}/val ({fid['n_reference']} images)"})
    out.model_uri = log_and_register(tracked.tracking_uri, tracked.run_id, export, name)
    tracked.set_tags({"raygen.model_uri": out.model_uri})
