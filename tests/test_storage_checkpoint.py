"""Checkpoints on S3 without a cluster (a local moto S3): the RunConfig
storage arguments `scale.storage` gives Ray Train, and a worker's resume
from the checkpoint Ray Train holds there (`ray.train.get_checkpoint()`)
when the run folder has none or an older one. The whole round trip through
Ray Train (upload on report, resume in a new driver) is
tests/test_storage_train.py (e2e)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import ray.train
import torch

from raygen import storage
from raygen.spec import parse_spec
from raygen.train import worker
from raygen.train.checkpoint import CheckpointManager, list_checkpoints, load_torch, save_torch
from raygen.train.runner import run_folder_uri, train_storage

from s3_server import s3_server  # noqa: F401  (fixture)


def _spec(storage_uri: str | None):
    return parse_spec({"name": "c", "data": {"dataset": "digits", "resolution": 8},
                       "model": {"family": "seqimg", "options": {"backbone": "gpt2", "dim": 16, "depth": 1, "heads": 2}},
                       "train": {"keep_checkpoints": 3},
                       "scale": {"workers": 1, "strategy": "ddp", "storage": storage_uri}})


def _commit(root: Path, step: int) -> Path:
    manager = CheckpointManager(root / "checkpoints")
    tmp = manager.begin(step)
    save_torch({"w": torch.full((4,), float(step))}, tmp / "model.pt")
    return manager.commit(step, {"train_state": {"step": step}})


def test_scale_storage_is_ray_trains_storage(s3_server, tmp_path):  # noqa: F811
    from pyarrow.fs import S3FileSystem
    spec = _spec(s3_server.uri("runs"))
    args = train_storage(spec, tmp_path / "r")
    assert isinstance(args["storage_filesystem"], S3FileSystem)
    assert args["storage_path"] == f"{s3_server.bucket}/runs/ray"
    assert args["checkpoint_config"].num_to_keep == 3
    assert run_folder_uri(spec, tmp_path / "r") == s3_server.uri("runs", "runs", "r")
    # the filesystem Ray gets really writes there (Ray pickles it to every worker: no keys inside)
    with args["storage_filesystem"].open_output_stream(args["storage_path"] + "/probe") as f:
        f.write(b"x")
    assert "runs/ray/probe" in s3_server.keys("runs/")
    import pickle
    assert s3_server.env["AWS_SECRET_ACCESS_KEY"].encode() not in pickle.dumps(args["storage_filesystem"])
    assert train_storage(_spec(None), tmp_path / "r") == {"storage_path": str(tmp_path / "r" / "ray")}


def test_a_worker_resumes_from_the_checkpoint_on_s3(s3_server, tmp_path, monkeypatch):  # noqa: F811
    # a checkpoint as Ray Train keeps it after a report: the committed folder copied to the storage path
    made = _commit(tmp_path / "elsewhere", 6)
    uri = s3_server.uri("ckpt", "ray", "run-1", "checkpoint_000001")
    storage.upload_dir(made, uri)
    fs, path = storage.filesystem(uri)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(path, filesystem=fs))
    config = SimpleNamespace(spec=_spec(s3_server.uri("ckpt")), resume_from=None)

    run_dir = tmp_path / "run"  # a fresh node: no checkpoints in the run folder
    got = worker._resume_folder(config, run_dir)
    assert got == run_dir / "checkpoints" / "step-00000006"
    assert torch.equal(load_torch(got / "model.pt")["w"], torch.full((4,), 6.0))
    assert json.loads((got / "state.json").read_text())["train_state"]["step"] == 6
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000006"]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp folder left

    # a run folder with a newer checkpoint keeps it; an older one loses to S3's
    newer = tmp_path / "newer"
    _commit(newer, 8)
    assert worker._resume_folder(config, newer) == newer / "checkpoints" / "step-00000008"
    older = tmp_path / "older"
    _commit(older, 2)
    assert worker._resume_folder(config, older) == older / "checkpoints" / "step-00000006"

    # a checkpoint without raygen's marker is never taken for one
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "weights.bin").write_bytes(b"x")
    storage.upload_dir(tmp_path / "foreign", s3_server.uri("ckpt", "foreign"))
    fs2, path2 = storage.filesystem(s3_server.uri("ckpt", "foreign"))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(path2, filesystem=fs2))
    assert worker._fetch_storage_checkpoint(tmp_path / "fresh") is None

    # no storage configured: the run folder alone decides, nothing is fetched
    plain = SimpleNamespace(spec=_spec(None), resume_from=None)
    assert worker._resume_folder(plain, tmp_path / "empty") is None
