"""Dataset lineage (MLflow dataset inputs) and system metrics, read back through MlflowClient."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from raygen.data import prepare_dataset, read_manifest
from raygen.tracking.lineage import log_dataset_inputs, manifest_sha256
from raygen.tracking.store import client, open_run
from raygen.tracking.system_metrics import system_metrics, worker_system_metrics


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("lineage")
    prepare_dataset("digits", root / "digits", resolution=8, count=120)
    return root


def _inputs(c, run_id):
    out = {}
    for item in c.get_run(run_id).inputs.dataset_inputs:
        tags = {t.key: t.value for t in item.tags}
        out[tags["mlflow.data.context"]] = item.dataset
    return out


def test_runs_log_their_splits_with_the_manifests_digest(digits):
    uri = f"sqlite:///{digits / 'mlflow.db'}"
    data_dir = digits / "digits"
    manifest = read_manifest(data_dir)
    c = client(uri)
    runs = [open_run(uri, "lineage", f"run-{i}") for i in range(2)]
    for run in runs:
        log_dataset_inputs(run, data_dir)
    log_dataset_inputs(runs[0], data_dir)  # a resumed run logs again: still one input per split
    first, second = (_inputs(c, r.run_id) for r in runs)
    assert len(c.get_run(runs[0].run_id).inputs.dataset_inputs) == 2
    assert set(first) == {"training", "validation"}
    full = manifest_sha256(manifest)
    for context, split in (("training", "train"), ("validation", "val")):
        ds = first[context]
        assert ds.name == f"{manifest.name}/{split}" and full.startswith(ds.digest) and len(ds.digest) == 32
        assert (second[context].name, second[context].digest) == (ds.name, ds.digest)  # same data, same digest
        assert ds.source_type == "local" and json.loads(ds.source) == {"uri": str(data_dir), "split": split}
        profile = json.loads(ds.profile)
        assert profile["num_rows"] == manifest.counts[split] and profile["counts"] == manifest.counts
        assert profile["manifest_sha256"] == full and profile["prepare"] == manifest.prepare
        cols = {c["name"] for c in json.loads(ds.schema)["mlflow_colspec"]}
        assert {"png", "label"} <= cols
    assert sum(json.loads(first[c].profile)["num_rows"] for c in first) == sum(manifest.counts.values())


def test_other_data_gives_another_digest(digits):
    uri = f"sqlite:///{digits / 'mlflow-other.db'}"
    prepare_dataset("digits", digits / "digits-more", resolution=8, count=160)
    a, b = open_run(uri, "lineage", "a"), open_run(uri, "lineage", "b")
    log_dataset_inputs(a, digits / "digits")
    log_dataset_inputs(b, digits / "digits-more")
    c = client(uri)
    assert _inputs(c, a.run_id)["training"].digest != _inputs(c, b.run_id)["training"].digest


def _wait_for_system_metrics(c, run_id, prefix, limit_s=120):
    """Poll until the monitor's first sample lands (a wait, not a timed assertion)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        found = {k for k in c.get_run(run_id).data.metrics if k.startswith(prefix)}
        if found:
            return found
        time.sleep(0.2)
    return set()


def test_system_metrics_land_in_the_run_from_local_rank_0_only(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    run = open_run(uri, "sysmetrics", "run")
    with system_metrics(uri, run.run_id, 0.2):
        found = _wait_for_system_metrics(c, run.run_id, "system/")
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= found, found

    # a two-node run: each node's local rank 0 logs under its node; other local ranks log nothing
    other = open_run(uri, "sysmetrics", "two-nodes")
    node1 = SimpleNamespace(get_local_rank=lambda: 0, get_world_size=lambda: 4, get_local_world_size=lambda: 2,
                            get_node_rank=lambda: 1)
    with worker_system_metrics(node1, uri, other.run_id, 0.2):
        found = _wait_for_system_metrics(c, other.run_id, "system/")
    assert "system/node_1/cpu_utilization_percentage" in found, found
    rank1 = SimpleNamespace(get_local_rank=lambda: 1)
    with worker_system_metrics(rank1, uri, other.run_id, 0.2) as monitor:
        assert monitor is None
    with system_metrics(uri, other.run_id, 0) as monitor:  # track.system_metrics_every_s: 0 turns them off
        assert monitor is None


def test_a_block_shorter_than_one_interval_still_leaves_a_sample(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = open_run(uri, "sysmetrics", "short")
    with system_metrics(uri, run.run_id, 3600):
        pass
    history = client(uri).get_metric_history(run.run_id, "system/cpu_utilization_percentage")
    assert [m.step for m in history] == [0]
