"""The function Ray Train runs on every worker: assemble a Trainer and fit."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from raygen.models.base import DataInfo
from raygen.spec.schema import JobSpec
from raygen.train.checkpoint import CheckpointManager, find_latest_checkpoint
from raygen.train.hooks import EMAHook, GradClipHook, Hook, MetricsSinkHook, ProgressHook, SampleGridHook
from raygen.train.strategy import DDPStrategy, Strategy
from raygen.train.trainer import Trainer

POINTER = "raygen_checkpoint.json"


def make_strategy(spec: JobSpec, world_size: int, device: torch.device) -> Strategy:
    if spec.scale.strategy == "deepspeed":
        from raygen.train.deepspeed_strategy import DeepSpeedStrategy, build_deepspeed_config
        return DeepSpeedStrategy(ds_config=build_deepspeed_config(spec, world_size),
                                 grad_accum=spec.train.grad_accum, device=device)
    return DDPStrategy(precision=spec.train.precision, grad_accum=spec.train.grad_accum,
                       loss_scale_floor=spec.train.loss_scale_floor,
                       initial_loss_scale=spec.train.initial_loss_scale, device=device)


def make_hooks(spec: JobSpec, *, sink, run_dir: Path, progress: bool, data_dir: str | None = None) -> list[Hook]:
    hooks: list[Hook] = []
    if spec.scale.strategy == "ddp" and (spec.train.clip.norm or spec.train.clip.value):
        hooks.append(GradClipHook(spec.train.clip.norm, spec.train.clip.value))
    if spec.train.ema.enabled:
        hooks.append(EMAHook(spec.train.ema.decay, spec.train.ema.start_step))
    hooks.append(ProgressHook(spec.train.log_every, spec.train.steps, enabled=progress))
    if sink is not None:
        hooks.append(MetricsSinkHook(sink, spec.train.log_every))
        hooks.append(SampleGridHook(sink, run_dir / "samples", spec.train.grid_samples))
    if spec.track.fid.enabled and spec.track.fid.every:
        from raygen.train.fid_hook import FIDHook
        hooks.append(FIDHook(spec, sink, data_dir))
    return hooks


def _resume_folder(config: dict[str, Any], run_dir: Path) -> Path | None:
    """Where to continue from. A run folder is new unless --resume, so a
    completed checkpoint in it means this is a restart after a failure (Ray
    restarted the workers) or a resume: continue from the newest one. Ray's
    own record of reported checkpoints can lag behind a checkpoint that was
    committed just before the failure, so the folder is the source of truth."""
    latest = find_latest_checkpoint(run_dir)
    if latest is not None:
        return latest
    return Path(config["resume_from"]) if config.get("resume_from") else None


PLACEMENT_GROUP_FILE = ".ray_placement_group"


def record_placement_group(run_dir: Path) -> None:
    """Note the worker group's placement group, so the driver can make sure it
    is released (see runner.release_placement_group)."""
    import ray.util
    pg = ray.util.get_current_placement_group()
    if pg is not None:
        (run_dir / PLACEMENT_GROUP_FILE).write_text(pg.id.hex())


def train_worker(config: dict[str, Any]) -> None:
    import ray.train
    from ray.train import Checkpoint

    from raygen.data import WorkerBatches
    from raygen.models.registry import build_model
    from raygen.spec.loader import parse_spec

    spec = parse_spec(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if spec.scale.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    info = DataInfo.from_dict(config["data_info"])
    run_dir = Path(config["run_dir"])
    sink = None
    if rank == 0 and config.get("mlflow_run_id"):
        from raygen.tracking.mlflow_sink import MlflowSink
        sink = MlflowSink(config["tracking_uri"], config["mlflow_run_id"])

    def report(metrics: dict[str, float], folder: Path | None) -> None:
        if folder is not None and rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / POINTER).write_text(json.dumps({"path": str(folder)}))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    trainer = Trainer(
        spec=spec, data_info=info,
        make_generator=lambda: build_model(spec.model.family, spec.model.config, info),
        strategy=make_strategy(spec, world, device),
        train_data=WorkerBatches(ray.train.get_dataset_shard("train"), spec.data, rank=rank, world_size=world, train=True),
        val_data=WorkerBatches(ray.train.get_dataset_shard("val"), spec.data, rank=rank, world_size=world, train=False),
        hooks=make_hooks(spec, sink=sink, run_dir=run_dir, progress=config.get("progress", True),
                         data_dir=config.get("data_dir")),
        checkpoints=CheckpointManager(run_dir / "checkpoints", spec.train.keep_checkpoints,
                                      spec.train.best_metric, spec.train.best_mode),
        report=report, rank=rank, world_size=world,
        run_meta={"run_id": config.get("mlflow_run_id"), "run_dir": str(run_dir)},
    )
    if rank == 0:
        trainer.checkpoints.clean_stale()
        record_placement_group(run_dir)
    resume = _resume_folder(config, run_dir)
    if resume is not None and rank == 0:
        print(f"[raygen] resuming from {resume}", flush=True)
    trainer.fit(resume, stop_after=config.get("stop_after"))
