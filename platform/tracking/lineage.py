"""Dataset lineage: a run's training and validation data as MLflow dataset inputs.

Each split of the prepared dataset is one MLflow dataset, named
`<dataset>/<split>`, whose digest is the manifest's content digest (the
manifest lists every shard's sha256, so equal digests mean equal data: two
runs on the same prepared folder show the same digest). The source names the
prepared folder (or an s3:// prefix); the profile holds the split's counts,
the manifest's full sha256 and the `prepare` recipe; the schema lists the
columns a record has.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

#: MLflow keeps at most 36 characters of a dataset digest
DIGEST_CHARS = 32
CONTEXTS = {"train": "training", "val": "validation"}


def manifest_sha256(manifest) -> str:
    """sha256 of the manifest's canonical JSON (Manifest.to_json: fixed key order, no folder path)."""
    return hashlib.sha256(manifest.to_json().encode()).hexdigest()


def _schema(manifest) -> dict[str, Any]:
    """The columns of a record, in MLflow's column-spec form (the UI shows it as a table)."""
    cols = [{"name": "index", "type": "long"}, {"name": "png", "type": "binary"}]
    if manifest.num_classes:
        cols.append({"name": "label", "type": "long"})
    if manifest.has_captions:
        cols.append({"name": "caption", "type": "string"})
    for name, extra in manifest.extra_columns.items():
        cols.append({"name": name, "type": {"scalar": "double", "string": "string"}.get(extra.kind, "tensor")})
    return {"mlflow_colspec": cols}


def split_datasets(manifest, location: str) -> list[tuple[Any, str]]:
    """(mlflow.entities.Dataset, context) for each split of `manifest`, read from `location`."""
    from mlflow.entities import Dataset

    full = manifest_sha256(manifest)
    source_type = "s3" if location.startswith("s3://") else "local"
    out = []
    for split, info in manifest.splits.items():
        profile = {"num_rows": info.rows, "skipped": info.skipped, "split": split, "shards": len(info.shards),
                   "counts": manifest.counts, "manifest_sha256": full, "prepare": manifest.prepare,
                   "source": manifest.source, "height": manifest.height, "width": manifest.width,
                   "channels": manifest.channels, "num_classes": manifest.num_classes}
        dataset = Dataset(name=f"{manifest.name}/{split}", digest=full[:DIGEST_CHARS], source_type=source_type,
                          source=json.dumps({"uri": location, "split": split}),
                          schema=json.dumps(_schema(manifest)), profile=json.dumps(profile, default=str))
        out.append((dataset, CONTEXTS.get(split, split)))
    return out


def log_dataset_inputs(tracked, data_dir, manifest=None) -> None:
    """Log the prepared dataset at `data_dir` (its train and val splits) as the
    inputs of the run `tracked` (a raygen.tracking.TrackingRun)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    if manifest is None:
        from raygen.data import read_manifest
        manifest = read_manifest(data_dir)
    inputs = [DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
              for dataset, context in split_datasets(manifest, str(data_dir))]
    tracked.client.log_inputs(tracked.run_id, datasets=inputs)
