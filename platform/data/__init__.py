"""raygen.data: datasets that need no network, size-bounded parquet shards
with a manifest, and the deterministic Ray Data pipeline that feeds Train
workers.

    prepare_dataset / ensure_dataset   generate or import, write shards + manifest.json
    read_manifest -> Manifest          what a prepared folder holds
    build_datasets, make_data_config   lazy decoded Ray datasets; the deterministic split
    WorkerBatches                      shuffled, augmented, resumable batches in a worker
    load_split_images                  a split as tensors, no Ray
    load_split_latents                 a latent dataset's split (raygen.data.latents)

Ray and torch are imported only when the pipeline parts are used, so the
CLI and the builders start fast.
"""
from raygen.data.errors import DataError
from raygen.data.manifest import Manifest, read_manifest
from raygen.data.prepare import ensure_dataset, prepare_dataset
from raygen.data.registry import builder_names

_LAZY = {
    "build_datasets": "raygen.data.pipeline",
    "make_data_config": "raygen.data.pipeline",
    "DeterministicDataConfig": "raygen.data.pipeline",
    "RankShard": "raygen.data.pipeline",
    "WorkerBatches": "raygen.data.worker",
    "load_split_images": "raygen.data.local",
    "load_split_latents": "raygen.data.latents",
    "render_spheres": "raygen.data.sources.spheres",
}

__all__ = ["DataError", "Manifest", "read_manifest", "prepare_dataset", "ensure_dataset", "builder_names", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'raygen.data' has no attribute '{name}'")
