"""Driver side of `raygen train`: data, cluster, tracking, TorchTrainer, wrap-up."""
from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raygen.spec.errors import SpecError
from raygen.spec.schema import JobSpec
from raygen.train.checkpoint import find_latest_checkpoint
from raygen.train.console import RUN_LOG, ConsoleFollower, library_logs_to, stderr_to


@dataclass
class RunResult:
    run_dir: Path
    run_id: str | None
    tracking_uri: str
    checkpoint: Path | None
    model_uri: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    grid: Path | None = None
    seconds: float = 0.0
    placement: str = ""  # the node each rank last ran on (raygen.train.cluster.describe_placement)


def pick_run_dir(spec: JobSpec, resume: bool) -> Path:
    """`runs/<name>` for a new run, `runs/<name>-2`, ... when taken; `--resume` takes the newest."""
    root = Path(spec.run_dir)
    taken = sorted((p for p in root.glob(f"{spec.name}*") if p.is_dir() and re.fullmatch(rf"{re.escape(spec.name)}(-\d+)?", p.name)),
                   key=lambda p: int(p.name.rsplit("-", 1)[1]) if p.name != spec.name else 1)
    if resume:
        if not taken:
            raise SpecError([f"--resume: no earlier run named '{spec.name}' under {root}/ to continue"])
        return taken[-1]
    if not taken:
        return root / spec.name
    last = taken[-1]
    n = int(last.name.rsplit("-", 1)[1]) + 1 if last.name != spec.name else 2
    return root / f"{spec.name}-{n}"


def quiet_data_progress() -> None:
    """The trainer prints its own progress; Ray Data's per-operator bars from
    every worker would bury it."""
    from ray.data import DataContext
    ctx = DataContext.get_current()
    for flag in ("enable_progress_bars", "enable_operator_progress_bars", "print_on_execution_start"):
        if hasattr(ctx, flag):
            setattr(ctx, flag, False)


def with_absolute_paths(spec: JobSpec) -> JobSpec:
    data = spec.data.model_copy(update={"root": str(Path(spec.data.root).resolve())})
    if spec.data.source:
        data = data.model_copy(update={"source": str(Path(spec.data.source).resolve())})
    if Path(spec.data.dataset).exists():
        data = data.model_copy(update={"dataset": str(Path(spec.data.dataset).resolve())})
    fid = spec.track.fid
    kind, sep, rest = fid.extractor.partition(":")
    if sep and rest and Path(rest).exists():
        fid = fid.model_copy(update={"extractor": f"{kind}:{Path(rest).resolve()}"})
    scale = spec.scale
    if scale.deepspeed_config:
        scale = scale.model_copy(update={"deepspeed_config": str(Path(scale.deepspeed_config).resolve())})
    return spec.model_copy(update={"run_dir": str(Path(spec.run_dir).resolve()), "data": data, "scale": scale,
                                   "track": spec.track.model_copy(update={"fid": fid})})


def check_compatibility(spec: JobSpec) -> None:
    """The spec checks `raygen spec validate` makes too (raygen.spec.checks)."""
    from raygen.spec.checks import check_runnable
    check_runnable(spec, tune=False)


def run_training(spec: JobSpec, *, resume: bool = False, tracking_uri: str | None = None,
                 address: str | None = None, stop_after: int | None = None, progress: bool = True,
                 parent_run_id: str | None = None, extra_callbacks: list | None = None,
                 run_dir: Path | None = None, final_eval: bool = True,
                 overrides: list[str] | None = None, verbose: bool = False,
                 resume_from: Path | None = None, gpus_per_worker: float | None = None) -> RunResult:
    """`overrides` (the `--set` items) are kept in run.json, so a resume can reapply them.
    `resume_from`: a checkpoint folder to start from (another run's: a Tune PBT exploit),
    used when the run folder holds none of its own. `gpus_per_worker`: a GPU share per
    worker (Tune trials sharing a GPU); needs scale.use_gpu."""
    started = time.perf_counter()
    check_compatibility(spec)  # the same checks (and words) as `raygen spec validate`, before anything starts
    spec = with_absolute_paths(spec)  # Ray workers do not run in the driver's folder
    run_dir = (run_dir or pick_run_dir(spec, resume)).resolve()
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        # library chatter (Ray, MLflow, warnings) into run.log; on the console too with --verbose
        with library_logs_to(run_dir / RUN_LOG, verbose):
            return _run_in(run_dir, spec, started, resume=resume, tracking_uri=tracking_uri, address=address,
                           stop_after=stop_after, progress=progress, parent_run_id=parent_run_id,
                           extra_callbacks=extra_callbacks, final_eval=final_eval, overrides=overrides,
                           verbose=verbose, resume_from=resume_from, gpus_per_worker=gpus_per_worker)
    except BaseException:
        # A run that failed before it started (unreachable cluster, bad data:
        # no MLflow run, no run.json yet) leaves no folder behind, so the next
        # run keeps the name instead of taking `<name>-2`.
        if created and not (run_dir / "run.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _run_in(run_dir: Path, spec: JobSpec, started: float, *, resume: bool, tracking_uri: str | None,
            address: str | None, stop_after: int | None, progress: bool, parent_run_id: str | None,
            extra_callbacks: list | None, final_eval: bool, overrides: list[str] | None,
            verbose: bool = False, resume_from: Path | None = None,
            gpus_per_worker: float | None = None) -> RunResult:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raygen.data import build_datasets, ensure_dataset, make_data_config, read_manifest
    from raygen.models.registry import build_model
    from raygen.tracking.store import default_tracking_uri, open_run
    from raygen.train.cluster import cpus_per_worker, describe_placement, ensure_ray, placement_strategy, worker_nodes
    from raygen.train.components import load_components, resolve_components
    from raygen.train.worker import WorkerConfig, describe_strategy, train_worker

    if spec.scale.storage:
        from raygen import storage
        storage.check(spec.scale.storage)  # one line now, not a worker traceback later
    data_dir = ensure_dataset(spec.data)
    manifest = read_manifest(data_dir)
    info = manifest.data_info(spec.data)
    tracking_uri = tracking_uri or spec.track.tracking_uri or default_tracking_uri(spec.run_dir)
    sources = dict(spec.model.components)
    spec = resolve_components(spec, tracking_uri)  # earlier runs' models, frozen: fail now if one is missing
    components = load_components(spec)
    probe = build_model(spec.model.family, spec.model.config, info, components)  # cross-field errors surface here
    n_params = sum(p.numel() for n, p in probe.named_parameters() if not n.startswith("components."))
    del probe

    if spec.track.fid.enabled and final_eval:
        # fit (or load) the FID feature net once here, so workers and the final eval only load it
        from raygen.train.wrapup import dataset_extractor
        if progress and spec.track.fid.extractor == "domain":
            print("[raygen] preparing the FID feature extractor (trained once per dataset, then cached)", flush=True)
        dataset_extractor(spec, data_dir)

    with stderr_to(run_dir / RUN_LOG, enabled=not verbose):  # ray.init's C++ warnings
        resources = ensure_ray(address or spec.scale.address, quiet=not verbose)
    quiet_data_progress()
    cpus = cpus_per_worker(spec.scale.cpus_per_worker, spec.scale.workers, resources.get("CPU", 1))
    if spec.scale.use_gpu and resources.get("GPU", 0) < spec.scale.workers * (gpus_per_worker or 1):
        raise SpecError([f"scale.use_gpu: the cluster has {resources.get('GPU', 0):g} GPUs for {spec.scale.workers} workers; "
                         "lower scale.workers or set scale.use_gpu=false"])

    state_file = run_dir / "run.json"
    previous = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if overrides is None:  # a resume keeps the overrides the run was started with
        overrides = previous.get("overrides", []) if resume else []
    resume_from = (find_latest_checkpoint(run_dir) if resume else None) or resume_from
    if resume and resume_from is None and progress and not spec.scale.storage:  # else the workers look in storage
        print(f"[raygen] {run_dir} has no completed checkpoint yet: starting it from step 0", flush=True)
    tracked = open_run(tracking_uri, spec.track.experiment, run_dir.name, spec=spec,
                       run_id=previous.get("mlflow_run_id") if resume else None, parent_run_id=parent_run_id,
                       tags={"raygen.family": spec.model.family, "raygen.run_dir": str(run_dir)})
    tracked.log_params({"model.num_parameters": n_params, "data.prepared_dir": str(data_dir)})
    from raygen.tracking.lineage import log_dataset_inputs
    log_dataset_inputs(tracked, data_dir, manifest)  # train and val splits: folder, manifest digest, counts, recipe
    if sources:
        tracked.set_tags({f"raygen.component.{k}": v for k, v in sources.items()})
    # Ray Train resumes a name under the same storage path from its latest checkpoint: a resume with
    # scale.storage reuses it (without, the run folder is where checkpoints are found: a fresh name)
    ray_name = previous.get("ray_run_name") if resume and spec.scale.storage else None
    ray_name = ray_name or f"{run_dir.name}-{int(time.time())}"
    state_file.write_text(json.dumps({"mlflow_run_id": tracked.run_id, "tracking_uri": tracking_uri,
                                      "data_dir": str(data_dir), "name": spec.name,
                                      "overrides": list(overrides), "ray_run_name": ray_name,
                                      "storage": spec.scale.storage}, indent=2))
    if progress:
        print(f"[raygen] run {run_dir.name}: {spec.model.family} ({n_params/1e6:.2f}M params), "
              f"{spec.scale.workers} worker(s) × {cpus:g} CPU, {describe_strategy(spec)}, "
              f"{spec.train.steps} steps; MLflow run {tracked.run_id} in {tracking_uri}", flush=True)

    trainer = TorchTrainer(
        train_worker,
        train_loop_config=WorkerConfig(
            spec=spec, data_info=info, run_dir=run_dir, data_dir=data_dir,
            tracking_uri=tracking_uri, mlflow_run_id=tracked.run_id,
            resume_from=resume_from, stop_after=stop_after, progress=progress,
            threads_per_worker=max(1, int(cpus)), family_sources=tuple(family_sources(spec, components)),
        ).to_dict(),
        scaling_config=ScalingConfig(num_workers=spec.scale.workers, use_gpu=spec.scale.use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": gpus_per_worker} if gpus_per_worker else {})},
                                     placement_strategy=placement_strategy(spec.scale.placement)),
        run_config=RunConfig(name=ray_name, **train_storage(spec, run_dir),
                             failure_config=FailureConfig(max_failures=spec.scale.max_failures),
                             callbacks=extra_callbacks or []),
        datasets=build_datasets(data_dir, spec.data),
        dataset_config=make_data_config(spec.data),
    )
    try:
        # rank 0's progress and messages, rendered once here (a bar on a TTY); run.log too with --verbose
        with ConsoleFollower(run_dir, total=spec.train.steps, verbose=verbose) if progress else contextlib.nullcontext():
            result = trainer.fit()
    except Exception as err:
        tracked.finish("FAILED")
        raise TrainingFailed(_root_cause(err)) from err
    finally:
        release_placement_group(run_dir)
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}

    checkpoint = find_latest_checkpoint(run_dir)
    out = RunResult(run_dir=run_dir, run_id=tracked.run_id, tracking_uri=tracking_uri, checkpoint=checkpoint,
                    model_uri=None, metrics=metrics, placement=describe_placement(worker_nodes(run_dir)))
    if out.placement:
        tracked.set_tags({"raygen.worker_nodes": out.placement})
    finished = checkpoint is not None and json.loads((checkpoint / "state.json").read_text())["train_state"]["step"] >= spec.train.steps
    if checkpoint is not None and finished and final_eval:
        from raygen.train.wrapup import finish_run
        finish_run(spec, out, tracked, data_dir, progress=progress)
    tracked.finish()
    out.seconds = time.perf_counter() - started
    tracked.log_metrics({"wall_time_s": out.seconds})
    if spec.scale.storage:
        from raygen import storage
        # the run folder's outputs (run.json, grids, summary, logs) beside the checkpoints; run.json last
        storage.upload_dir(run_dir, run_folder_uri(spec, run_dir), last=("run.json",), skip=("checkpoints", "ray"))
    return out


def run_folder_uri(spec: JobSpec, run_dir: Path) -> str:
    """Where a run's folder is copied when `scale.storage` is set."""
    from raygen import storage
    return storage.join(spec.scale.storage, "runs", run_dir.name)


def train_storage(spec: JobSpec, run_dir: Path) -> dict[str, Any]:
    """RunConfig's storage arguments and checkpoint policy: the run folder,
    or `scale.storage` (s3://) through a pyarrow filesystem built from the
    AWS variables, where Ray Train uploads every reported checkpoint."""
    from ray.train import CheckpointConfig
    if not spec.scale.storage:
        return {"storage_path": str(run_dir / "ray")}
    from raygen import storage
    fs, path = storage.filesystem(storage.join(spec.scale.storage, "ray"))
    return {"storage_path": path, "storage_filesystem": fs,
            "checkpoint_config": CheckpointConfig(num_to_keep=spec.train.keep_checkpoints)}


def family_sources(spec: JobSpec, components: dict) -> list[str]:
    """Files that register the run's families outside entry points, for the workers to import."""
    from raygen.models.registry import family_source
    names = [spec.model.family, *(c.family for c in components.values())]
    return sorted({src for src in map(family_source, names) if src})


class TrainingFailed(RuntimeError):
    pass


def release_placement_group(run_dir: Path) -> None:
    """Remove the worker group's placement group if it outlived the run.

    Inside a Tune trial the trial actor can exit before Ray Train's
    controller has released its workers' resources, and the fallback cleaner
    needs the dashboard's state API: the CPUs then stay reserved and the next
    trial waits forever on 2 cores."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table

    from raygen.train.worker import PLACEMENT_GROUP_FILE

    marker = run_dir / PLACEMENT_GROUP_FILE
    if not marker.is_file():
        return
    pg_hex = marker.read_text().strip()
    marker.unlink()
    deadline = time.time() + 10
    while time.time() < deadline:  # give Ray Train the chance to release it itself
        state = placement_group_table().get(pg_hex, {}).get("state")
        if state in (None, "REMOVED"):
            return
        time.sleep(0.5)
    ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex))))


def _root_cause(err: BaseException) -> str:
    """The user-facing line of a worker failure (Ray wraps it several times)."""
    text = str(err)
    for marker in ("NonFiniteError: ", "SpecError: ", "DataError: ", "RuntimeError: ", "ValueError: "):
        if marker in text:
            tail = text.rsplit(marker, 1)[1].strip().splitlines()
            return tail[0] if tail else text
    return text.splitlines()[0] if text else type(err).__name__
