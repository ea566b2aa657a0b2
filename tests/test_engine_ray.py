"""The engine on Ray Train: DDP and DeepSpeed ZeRO stages on 2 CPU workers,
exact resume across runs, and recovery from a killed worker."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raygen.spec import parse_spec
from raygen.tracking.store import client
from raygen.train.checkpoint import find_latest_checkpoint, list_checkpoints
from raygen.train.runner import run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def tiny_spec(tmp_path: Path, data_root: Path, **over):
    raw = {
        "name": "t", "run_dir": str(tmp_path / "runs"),
        "data": {"dataset": "digits", "root": str(data_root), "resolution": 8, "batch_size": 16},
        "model": {"family": "seqimg", "options": {"backbone": "gpt2", "dim": 16, "depth": 1, "heads": 2,
                                                  "conditioning": "label", "dropout": 0.1}},
        "train": {"steps": 6, "eval_every": 3, "checkpoint_every": 3, "val_batches": 1, "grid_samples": 4,
                  "log_every": 1, "optimizer": {"lr": 3e-3}, "ema": {"decay": 0.9}},
        "scale": {"workers": 2, "strategy": "ddp"},
        "track": {"fid": {"enabled": False}, "register_model": False},
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        raw[section] = {**raw.get(section, {}), **value} if not field else raw[section]
    return parse_spec(raw)


def history(result, key="loss"):
    return sorted((m.step, m.value) for m in client(result.tracking_uri).get_metric_history(result.run_id, key))


@pytest.mark.parametrize("strategy", [
    {"strategy": "ddp"},
    {"strategy": "deepspeed", "zero_stage": 0},
    pytest.param({"strategy": "deepspeed", "zero_stage": 1}, marks=pytest.mark.e2e),
    {"strategy": "deepspeed", "zero_stage": 2},
    pytest.param({"strategy": "deepspeed", "zero_stage": 3}, marks=pytest.mark.e2e),
], ids=["ddp", "deepspeed0", "deepspeed1", "deepspeed2", "deepspeed3"])
def test_strategies_train_on_two_cpu_workers(ray_session, tmp_path, data_root, strategy):
    over = {"scale": {"workers": 2, **strategy}}
    if strategy.get("zero_stage") == 3:
        over["train"] = {"steps": 6, "eval_every": 3, "checkpoint_every": 3, "val_batches": 1, "grid_samples": 4,
                         "log_every": 1, "optimizer": {"lr": 3e-3}, "ema": {"enabled": False}}
    spec = tiny_spec(tmp_path, data_root, **over)
    result = run_training(spec, progress=False)
    losses = history(result)
    assert [s for s, _ in losses] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    assert [p.name for p in list_checkpoints(result.run_dir)] == ["step-00000003", "step-00000006"]
    assert history(result, "val_loss")
    assert history(result, "grad_norm") and history(result, "images_per_s") and history(result, "data_wait_s")
    assert history(result, "mem_rss_mb_rank0") and history(result, "mem_rss_mb_rank1")  # memory of every worker
    weights = load_file(str(result.checkpoint / "export" / "weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


# the same property without Ray, in the default tier: test_engine_loop.py::test_exact_resume_matches_uninterrupted_run
@pytest.mark.e2e  # several minutes on 2 cores: `make test-e2e`
def test_resumed_run_matches_uninterrupted_run(ray_session, tmp_path, data_root):
    spec = tiny_spec(tmp_path / "a", data_root)
    full = run_training(spec, progress=False)
    split_spec = tiny_spec(tmp_path / "b", data_root)
    given = ["train.log_every=1"]  # what `raygen train --set` passes; resume reapplies it from run.json
    first = run_training(split_spec, progress=False, stop_after=4, overrides=given)
    assert find_latest_checkpoint(first.run_dir).name == "step-00000004"
    assert json.loads((first.run_dir / "run.json").read_text())["overrides"] == given
    second = run_training(split_spec, resume=True, progress=False)
    assert second.run_dir == first.run_dir and second.run_id == first.run_id  # same run continued
    assert json.loads((first.run_dir / "run.json").read_text())["overrides"] == given  # kept across the resume
    assert history(second) == history(full)  # same loss at every step
    a = load_file(str(full.checkpoint / "model.safetensors"))
    b = load_file(str(second.checkpoint / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_worker_pids() -> list[int]:
    """PIDs of this session's Ray Train workers (children of our own raylet)."""
    import psutil
    import ray
    from ray._private import ray_constants

    node = ray._private.worker._global_node
    raylets = [p.process.pid for p in node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]]
    found = []
    for pid in raylets:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(child.cmdline()):
                    found.append(child.pid)
            except psutil.NoSuchProcess:
                pass
    return sorted(found)


@pytest.mark.e2e  # several minutes on 2 cores: `make test-e2e`
def test_killed_worker_recovers_from_last_checkpoint(ray_session, tmp_path, data_root):
    spec = tiny_spec(tmp_path, data_root,
                     train={"steps": 400, "eval_every": 1000, "checkpoint_every": 20, "val_batches": 1,
                            "grid_samples": 4, "log_every": 5, "optimizer": {"lr": 3e-3}},
                     scale={"workers": 2, "strategy": "ddp", "max_failures": 1})
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("result", run_training(spec, progress=False)))
    runner.start()
    ckpts = tmp_path / "runs" / "t" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpts / "step-00000020").is_dir():
        time.sleep(0.2)
    assert (ckpts / "step-00000020").is_dir(), "no checkpoint appeared"
    workers = train_worker_pids()
    assert workers, "no Ray Train worker process found"
    os.kill(workers[-1], signal.SIGKILL)
    runner.join(timeout=280)
    assert not runner.is_alive()
    result = outcome["result"]
    steps = [s for s, _ in history(result)]
    assert max(steps) == 400 and set(steps) == set(range(1, 401))  # every step logged, none lost
    # the restart continued from a checkpoint committed before the kill, not from step 0
    resumed = [int(v) for _, v in history(result, "resumed_from_step")]
    assert resumed, "the worker was killed but the run never resumed: did Ray restart it?"
    assert all(r >= 20 and r % 20 == 0 for r in resumed)
    # only steps past that checkpoint may have been run (and logged) twice
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    assert all(s > resumed[0] for s in repeated)


@pytest.mark.e2e  # several minutes on 2 cores: `make test-e2e`
def test_fit_family_on_two_workers_sums_statistics_and_resumes(ray_session, tmp_path, data_root):
    """A family fitted without gradients runs through the same runner: both
    workers' statistics are summed every step (all-reduce), every rank applies
    the same total, and a paused run resumes from its checkpoint."""
    import engine_toys  # noqa: F401  (registers toy-means; the workers import it from its file)

    spec = parse_spec({
        "name": "fit", "run_dir": str(tmp_path / "runs"),
        "data": {"dataset": "digits", "root": str(data_root), "resolution": 8, "batch_size": 16},
        "model": {"family": "toy-means", "options": {"keep": 1.0}},
        "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 2, "log_every": 1, "grid_samples": 4},
        "scale": {"workers": 2, "strategy": "deepspeed", "zero_stage": 2},  # ignored: the family has no 'train'
        "track": {"fid": {"enabled": False}, "register_model": False},
    })
    first = run_training(spec, progress=False, stop_after=2)
    assert find_latest_checkpoint(first.run_dir).name == "step-00000002"
    second = run_training(spec, resume=True, progress=False)
    assert second.run_dir == first.run_dir
    pixels_per_step = 16 * 2 * 8 * 8  # a batch of 16 on each of 2 workers
    assert history(second, "fit_pixels") == [(s, float(s * pixels_per_step)) for s in range(1, 5)]
    saved = load_file(str(second.checkpoint / "model.safetensors"))
    assert float(saved["count"].sum()) == 4 * pixels_per_step
    assert 0 < float(saved["mean"][0]) < 1
    assert not (second.checkpoint / "deepspeed").exists() and not (second.checkpoint / "optimizer.pt").exists()
    assert [int(v) for _, v in history(second, "resumed_from_step")] == [2]
