"""`raygen train --dry-run`: the parameter count and a per-worker memory
estimate for the spec's strategy, before Ray or any training starts."""
from __future__ import annotations

import torch

from raygen.spec.schema import JobSpec
from raygen.train.memory import MemoryEstimate, estimate_worker_memory


def one_batch(data_dir, spec: JobSpec) -> dict:
    """`data.batch_size` training rows decoded as a worker sees them (no Ray)."""
    from raygen.data import load_split_images

    rows = load_split_images(data_dir, "train", spec.data, limit=spec.data.batch_size)
    rows.pop("corrupt_count", None)
    return rows


def dry_run(spec: JobSpec, tracking_uri: str | None = None) -> MemoryEstimate:
    """Check the spec as a run would, build the model once and estimate a worker's peak RSS."""
    from raygen.data import ensure_dataset, read_manifest
    from raygen.models.registry import build_model
    from raygen.tracking.store import default_tracking_uri
    from raygen.train.components import load_components, resolve_components
    from raygen.train.runner import check_compatibility, with_absolute_paths
    from raygen.train.worker import describe_strategy, fits_without_gradients

    check_compatibility(spec)
    spec = with_absolute_paths(spec)
    data_dir = ensure_dataset(spec.data)
    info = read_manifest(data_dir).data_info(spec.data)
    spec = resolve_components(spec, tracking_uri or spec.track.tracking_uri or default_tracking_uri(spec.run_dir))
    torch.manual_seed(spec.train.seed)
    model = build_model(spec.model.family, spec.model.config, info, load_components(spec))
    return estimate_worker_memory(spec, model, one_batch(data_dir, spec), strategy_name=describe_strategy(spec),
                                  gradients=not fits_without_gradients(spec))
