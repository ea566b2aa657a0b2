"""The function Ray Train runs on every worker: assemble a Trainer and fit."""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from raygen.models.base import DataInfo
from raygen.spec.schema import JobSpec
from raygen.train.checkpoint import CheckpointManager, find_latest_checkpoint
from raygen.train.hooks import EMAHook, GradClipHook, Hook, MetricsSinkHook, ProgressHook, SampleGridHook
from raygen.train.strategy import DDPStrategy, NoGradStrategy, Strategy
from raygen.train.trainer import Trainer

POINTER = "raygen_checkpoint.json"


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """Everything `train_worker` needs, built by the driver (raygen.train.runner).

    Ray hands `train_loop_config` to the workers as a plain dict: `to_dict`
    makes one of plain values and `from_dict` parses it back (the spec through
    the spec parser), so a missing or unknown key fails at the top of the
    worker with its name, not halfway through a run."""
    spec: JobSpec
    data_info: DataInfo
    run_dir: Path
    data_dir: Path | None = None
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    resume_from: Path | None = None      # a checkpoint to start from (--resume)
    stop_after: int | None = None        # pause at this step, with a checkpoint
    progress: bool = True                # progress events and messages for the driver's console
    threads_per_worker: int = 1
    family_sources: tuple[str, ...] = ()  # files registering families outside entry points

    def to_dict(self) -> dict[str, Any]:
        from raygen.spec.loader import spec_to_dict
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(spec=spec_to_dict(self.spec), data_info=self.data_info.to_dict(), run_dir=str(self.run_dir),
                   data_dir=str(self.data_dir) if self.data_dir else None,
                   resume_from=str(self.resume_from) if self.resume_from else None,
                   family_sources=list(self.family_sources))
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "WorkerConfig":
        from raygen.spec.loader import parse_spec
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        missing = sorted(f.name for f in fields(cls) if f.name in ("spec", "data_info", "run_dir") and f.name not in raw)
        if unknown or missing:
            raise ValueError(f"train_worker config: unknown keys {unknown}, missing keys {missing}; "
                             f"it takes {sorted(known)}")
        values = dict(raw)
        values.update(spec=parse_spec(raw["spec"]), data_info=DataInfo.from_dict(raw["data_info"]),
                      run_dir=Path(raw["run_dir"]),
                      data_dir=Path(raw["data_dir"]) if raw.get("data_dir") else None,
                      resume_from=Path(raw["resume_from"]) if raw.get("resume_from") else None,
                      family_sources=tuple(raw.get("family_sources") or ()))
        return cls(**values)


def fits_without_gradients(spec: JobSpec) -> bool:
    """A family that declares 'fit' but not 'train' runs under NoGradStrategy."""
    from raygen.models.capabilities import Capability
    from raygen.models.registry import get_family
    caps = get_family(spec.model.family).capabilities
    return Capability.TRAIN not in caps and Capability.FIT in caps


def describe_strategy(spec: JobSpec) -> str:
    """The strategy a run will use, in words, for the driver's run line."""
    if fits_without_gradients(spec):
        return f"no-gradient fit (family {spec.model.family} declares 'fit', not 'train'; scale.strategy ignored)"
    if spec.scale.strategy == "deepspeed":
        return f"deepspeed ZeRO-{spec.scale.zero_stage}"
    return spec.scale.strategy


def make_strategy(spec: JobSpec, world_size: int, device: torch.device) -> Strategy:
    if fits_without_gradients(spec):
        # no optimizer and no DeepSpeed engine, whatever scale.strategy says
        return NoGradStrategy(grad_accum=spec.train.grad_accum, device=device)
    if spec.scale.strategy == "deepspeed":
        from raygen.train.deepspeed_strategy import DeepSpeedStrategy, build_deepspeed_config
        return DeepSpeedStrategy(ds_config=build_deepspeed_config(spec, world_size),
                                 grad_accum=spec.train.grad_accum, device=device)
    return DDPStrategy(precision=spec.train.precision, grad_accum=spec.train.grad_accum,
                       loss_scale_floor=spec.train.loss_scale_floor,
                       initial_loss_scale=spec.train.initial_loss_scale, device=device)


def make_hooks(spec: JobSpec, *, sink, run_dir: Path, progress: bool, data_dir: str | None = None) -> list[Hook]:
    hooks: list[Hook] = []
    gradients = not fits_without_gradients(spec)  # clipping and EMA concern gradient-trained weights only
    if gradients and (spec.train.clip.norm or spec.train.clip.value):
        hooks.append(GradClipHook(spec.train.clip.norm, spec.train.clip.value))  # every strategy alike
    if gradients and spec.train.ema.enabled:
        hooks.append(EMAHook(spec.train.ema.decay, spec.train.ema.start_step))
    hooks.append(ProgressHook(spec.train.log_every, spec.train.steps, enabled=progress))
    if sink is not None:
        hooks.append(MetricsSinkHook(sink, spec.train.log_every))
        hooks.append(SampleGridHook(sink, run_dir / "samples", spec.train.grid_samples, data_dir, spec.data))
    if spec.track.fid.enabled and spec.track.fid.every:
        from raygen.train.fid_hook import FIDHook
        hooks.append(FIDHook(spec, sink, data_dir))
    return hooks


def _resume_folder(config: WorkerConfig, run_dir: Path) -> Path | None:
    """Where to continue from. A run folder is new unless --resume, so a
    completed checkpoint in it means this is a restart after a failure (Ray
    restarted the workers) or a resume: continue from the newest one. Ray's
    own record of reported checkpoints can lag behind a checkpoint that was
    committed just before the failure, so the folder is the source of truth."""
    if config.spec.scale.storage:
        _fetch_storage_checkpoint(run_dir)  # a restart on another node, or a run folder that lost its checkpoints
    latest = find_latest_checkpoint(run_dir)
    if latest is not None:
        return latest
    return config.resume_from


def _fetch_storage_checkpoint(run_dir: Path) -> Path | None:
    """Download the latest checkpoint Ray Train holds in `scale.storage`
    (its `get_checkpoint()`: the newest one reported by this Ray run, kept
    across worker restarts and driver resumes) into the run folder as
    `step-N`, unless that step is already there. Each rank downloads into
    its own temp folder and renames it into place (the marker is inside)."""
    import os
    import shutil

    import ray.train

    from raygen.train.checkpoint import MARKER, checkpoint_name, is_complete
    remote = ray.train.get_checkpoint()
    if remote is None:
        return None
    try:  # the marker alone first: a step already in the run folder is not downloaded again
        with remote.filesystem.open_input_stream(f"{remote.path}/{MARKER}") as f:
            step = int(json.loads(f.read())["step"])
    except FileNotFoundError:  # a checkpoint without our marker (not written by raygen): nothing to fetch
        return None
    root = run_dir / "checkpoints"
    final = root / checkpoint_name(step)
    if is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".download-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    remote.to_directory(str(tmp))
    try:
        os.replace(tmp, final)
    except OSError:  # another rank put it there first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


PLACEMENT_GROUP_FILE = ".ray_placement_group"


def record_placement_group(run_dir: Path) -> None:
    """Note the worker group's placement group, so the driver can make sure it
    is released (see runner.release_placement_group)."""
    import ray.util
    pg = ray.util.get_current_placement_group()
    if pg is not None:
        (run_dir / PLACEMENT_GROUP_FILE).write_text(pg.id.hex())


def train_worker(raw_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function; `raw_config` is `WorkerConfig.to_dict()`."""
    import ray.train

    from raygen.models.registry import import_family_sources
    from raygen.train.cluster import record_worker_node
    from raygen.train.console import worker_console

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    run_dir = Path(raw_config["run_dir"])
    # stdout/stderr (library chatter) into run.log; rank 0's progress and messages to the driver's console
    with worker_console(run_dir, rank, progress=bool(raw_config.get("progress", True))):
        import_family_sources(raw_config.get("family_sources") or [])  # families registered outside entry points
        record_worker_node(run_dir, rank, ctx.get_world_size())  # which node this rank runs on (workers.jsonl)
        _train(WorkerConfig.from_dict(raw_config), ctx)


def _train(config: WorkerConfig, ctx) -> None:
    import ray.train
    from ray.train import Checkpoint

    from raygen.data import WorkerBatches
    from raygen.models.registry import build_model
    from raygen.train.components import load_components
    from raygen.train.console import say

    spec, info, run_dir = config.spec, config.data_info, config.run_dir
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if spec.scale.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, config.threads_per_worker))
    components = load_components(spec)  # frozen, loaded once; every model this worker builds shares them
    sink = None
    if rank == 0 and config.mlflow_run_id:
        from raygen.tracking.mlflow_sink import MlflowSink
        sink = MlflowSink(config.tracking_uri, config.mlflow_run_id)

    def report(metrics: dict[str, float], folder: Path | None) -> None:
        if folder is not None and rank == 0 and spec.scale.storage:
            # Ray Train uploads the folder to scale.storage; a restart on any node downloads it from there
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(folder)))
        elif folder is not None and rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / POINTER).write_text(json.dumps({"path": str(folder)}))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    strategy = make_strategy(spec, world, device)
    trainer = Trainer(
        spec=spec, data_info=info,
        make_generator=lambda: build_model(spec.model.family, spec.model.config, info, components),
        strategy=strategy,
        train_data=WorkerBatches(ray.train.get_dataset_shard("train"), spec.data, rank=rank, world_size=world, train=True),
        val_data=WorkerBatches(ray.train.get_dataset_shard("val"), spec.data, rank=rank, world_size=world, train=False),
        hooks=make_hooks(spec, sink=sink, run_dir=run_dir, progress=config.progress,
                         data_dir=str(config.data_dir) if config.data_dir else None),
        checkpoints=CheckpointManager(run_dir / "checkpoints", spec.train.keep_checkpoints,
                                      spec.train.best_metric, spec.train.best_mode),
        report=report, rank=rank, world_size=world,
        run_meta={"run_id": config.mlflow_run_id, "run_dir": str(run_dir)},
    )
    if rank == 0:
        trainer.checkpoints.clean_stale()
        record_placement_group(run_dir)
        if not strategy.uses_gradients and spec.scale.strategy != "ddp":
            say(f"{spec.model.family} is fitted without gradients: scale.strategy={spec.scale.strategy} is not used")
    resume = _resume_folder(config, run_dir)
    if resume is not None and rank == 0:
        say(f"resuming from {resume}")
    from raygen.tracking.system_metrics import worker_system_metrics
    # MLflow system metrics from local rank 0 only: one monitor per node
    with worker_system_metrics(ctx, config.tracking_uri, config.mlflow_run_id, spec.track.system_metrics_every_s):
        trainer.fit(resume, stop_after=config.stop_after)
