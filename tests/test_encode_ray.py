"""The encode job through Ray Train (`raygen data encode`, an `encode:`
pipeline stage): the same bytes with 1 and 2 workers and as the in-process
job, a resume after a stop, the latents streamed back through the Ray Data
pipeline, and a pipeline ae (train) -> latents (encode) with its MLflow
child run and a rerun that skips both."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import pipeline_toys  # noqa: F401  (registers toy_ae)
from raygen.data import WorkerBatches, load_split_latents, prepare_dataset, read_manifest
from raygen.spec.schema import DataSpec
from test_encode_latents import BATCH, SHARD_ROWS, export_toy, files

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("encray") / "digits"
    prepare_dataset("digits", out, count=200, seed=3)
    return out


@pytest.mark.timeout(900)  # two Ray Train jobs: a hang guard for a loaded 2-core machine, not a speed check
def test_encode_stops_and_resumes_through_ray_train(ray_session, digits, tmp_path, capfd):
    from raygen.jobs.cli import main
    from raygen.train.encode import prepare_encode, run_encode, run_local

    ae = export_toy(tmp_path / "ae", "toy_ae", {"dataset": str(digits), "resolution": 8, "channels": 1})
    # the uninterrupted job in this process, without Ray (tests/test_encode_latents.py: any worker count, same bytes)
    run_local(prepare_encode(str(ae), str(digits), tmp_path / "local", batch_size=BATCH, shard_rows=SHARD_ROWS))

    # two Ray Train workers, each stopped after 2 batches ...
    common = ["--batch-size", str(BATCH), "--shard-rows", str(SHARD_ROWS)]
    assert main(["data", "encode", str(ae), str(digits), "--out", str(tmp_path / "lat"), "--workers", "2",
                 "--stop-after-batches", "2", *common]) == 0
    assert "stopped: 0 of 6 shard(s), 4 of 15 batch(es) done" in capfd.readouterr().out
    # ... then one worker finishes the job: the shards of both equal the in-process job's, byte for byte
    second = run_encode(str(ae), str(digits), tmp_path / "lat", workers=1, batch_size=BATCH, shard_rows=SHARD_ROWS,
                        progress=False)
    assert second.finished and second.status == "resumed" and second.batches == 15 - 4
    assert files(tmp_path / "lat") == files(tmp_path / "local")
    assert main(["data", "encode", str(ae), str(digits), "--out", str(tmp_path / "lat"), *common]) == 0
    assert "already encoded digits with toy_ae: train 200, val 22 latents of shape 2x4x4 float32 in 6 shard(s)" \
        in capfd.readouterr().out


def test_ray_data_streams_latents_to_each_rank(ray_session, digits, tmp_path):
    from raygen.data.pipeline import build_datasets, rank_shards
    from raygen.train.encode import prepare_encode, run_local

    ae = export_toy(tmp_path / "ae", "toy_ae", {"dataset": str(digits), "resolution": 8, "channels": 1})
    run_local(prepare_encode(str(ae), str(digits), tmp_path / "lat", batch_size=BATCH, shard_rows=SHARD_ROWS))
    spec = DataSpec(dataset=str(tmp_path / "lat"), batch_size=10, shuffle_buffer=20, seed=1)
    every = load_split_latents(tmp_path / "lat", "train")
    ds = build_datasets(tmp_path / "lat", spec)
    seen = []
    for rank, shard in enumerate(rank_shards(ds["train"], 2)):
        wb = WorkerBatches(shard, spec, rank=rank, world_size=2, train=True)
        batches = list(wb.epoch(0))
        assert len(batches) == wb.steps_per_epoch == 10
        for b in batches:
            assert "image" not in b and b["latent"].shape == (10, 2, 4, 4)
            assert torch.equal(b["latent"], every["latent"][b["index"]])
            seen += b["index"].tolist()
    assert sorted(seen) == list(range(200))


@pytest.mark.timeout(900)  # a training and an encode job, each on Ray Train (a hang guard, as above)
def test_pipeline_trains_then_encodes_and_skips_when_rerun(ray_session, tmp_path):
    from raygen.tracking.store import client
    from raygen.spec.pipeline import load_pipeline
    from raygen.train.pipeline import run_pipeline

    stage = {"data": {"dataset": "digits", "resolution": 8, "batch_size": 16, "count": 200, "seed": 3,
                      "root": str(tmp_path / "data")},
             "train": {"steps": 3, "eval_every": 3, "checkpoint_every": 3, "val_batches": 1, "grid_samples": 4,
                       "log_every": 1, "ema": {"enabled": False}},
             "scale": {"workers": 1}, "track": {"fid": {"enabled": False}, "register_model": False}}
    raw = {"name": "cascade", "run_dir": str(tmp_path / "runs"),
           "stages": {"ae": {"spec": {**stage, "model": {"family": "toy_ae"}}},
                      "latents": {"encode": {"model": "${stages.ae.model}", "data": "digits", "batch_size": 32,
                                             "dtype": "float16", "workers": 1}}}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    first = run_pipeline(*load_pipeline(path), progress=False, log=lambda *_: None)
    assert first.ran == ["ae", "latents"]
    latents = Path(first.data["latents"])
    m = read_manifest(latents)
    assert m.kind == "latents" and m.latents.dtype == "float16" and m.counts == {"train": 200, "val": 22}
    assert m.latents.encoder["export"] == first.models["ae"]
    # the encoder's data settings: the very dataset the autoencoder trained on
    trained_on = json.loads((Path(first.models["ae"]).parent.parent.parent / "run.json").read_text())["data_dir"]
    assert m.latents.source["path"] == trained_on

    c = client(first.tracking_uri)
    runs = {r.data.tags["mlflow.runName"]: r for r in c.search_runs([c.get_run(first.parent_run_id).info.experiment_id])
            if r.data.tags.get("mlflow.parentRunId") == first.parent_run_id}
    assert sorted(runs) == ["ae", "latents"]
    enc = runs["latents"]
    assert enc.data.metrics["rows_train"] == 200 and enc.data.metrics["rows_val"] == 22
    state = json.loads((first.folder / "pipeline.json").read_text())["stages"]["latents"]
    assert enc.data.tags["raygen.latents_digest"] == state["digest"] and enc.info.status == "FINISHED"

    again = run_pipeline(*load_pipeline(path), progress=False, log=lambda *_: None)
    assert again.ran == [] and again.skipped == ["ae", "latents"] and again.data == first.data
