"""Driver side of `raygen data encode MODEL DATA --out DIR` and of a
pipeline's `encode:` stage: a frozen encoder turns a dataset into a latent
dataset (raygen.data.latents), as a Ray Train job.

The job is set up like training (`ensure_ray`, a ScalingConfig of workers,
both splits handed to the workers as Ray Data datasets); each worker
encodes its share (raygen.train.encode_worker) and saves its progress in
the output folder, so an interrupted encode, rerun with the same model and
data, redoes nothing that is finished, whatever the worker count. The
driver writes the manifest last, once every shard is there.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raygen.data.errors import DataError
from raygen.data.latents import (DTYPES, STATE_DIR, EncodePlan, dataset_digest, finish_output, plan_ranges,
                                 progress_counts, start_output, state_dir)
from raygen.data.manifest import MANIFEST_NAME, Manifest, read_manifest

TRACKING_FILE = "tracking.json"


@dataclass
class EncodeResult:
    out: Path
    finished: bool
    status: str                                   # "encoded", "resumed", "complete" (nothing to do) or "stopped"
    plan: EncodePlan
    progress: dict[str, int] = field(default_factory=dict)   # shards/batches done of all
    batches: int = 0                              # batches encoded by this call
    manifest: Manifest | None = None
    digest: str | None = None                     # content digest of the latent dataset (when finished)
    run_id: str | None = None
    tracking_uri: str | None = None
    seconds: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        return self.manifest.counts if self.manifest is not None else {}


@dataclass
class EncodeJob:
    """Everything decided before any worker starts."""
    model_uri: str
    export: Path
    model: Any                                    # the loaded encoder (driver copy)
    family_sources: list[str]
    data_dir: Path
    data_spec: Any
    source: Manifest
    plan: EncodePlan
    out: Path
    state: str                                    # what start_output found: "new", "resume" or "complete"


def export_digest(export: Path) -> str:
    """A content digest of an exported model: every weights file (its own and
    its components'), the family, its options and its data_info, and not
    where it lies or which run made it."""
    export = Path(export)
    h = hashlib.sha256()
    for f in sorted(export.rglob("*.safetensors")):
        h.update(str(f.relative_to(export)).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    for f in sorted(export.rglob("spec.yaml")):
        model = (yaml.safe_load(f.read_text()) or {}).get("model", {})
        info_file = f.parent / "data_info.json"
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        h.update(json.dumps({"at": str(f.parent.relative_to(export)), "family": model.get("family"),
                             "options": model.get("options", {}), "data_info": info}, sort_keys=True).encode())
    return h.hexdigest()


def _data_spec(loaded, data: str, *, batch_size: int, data_root: str | None, count: int | None):
    """The data section that reads DATA as the encoder expects its images: the
    model's size and channels, no augmentation; a built-in name is prepared
    (or reused) with the model's own data settings (root, seed, count)."""
    from raygen.spec.schema import AugmentSpec
    info, own = loaded.data_info, loaded.spec.data
    same = data == own.dataset
    update: dict[str, Any] = {
        "dataset": str(Path(data).expanduser().resolve()) if Path(data).expanduser().exists() else data,
        "resolution": info.height if info.height == info.width else [info.height, info.width],
        "channels": info.channels, "augment": AugmentSpec(), "batch_size": batch_size,
        "source": own.source if same else None,
    }
    if not same:
        update["count"] = None
    if count is not None:
        update["count"] = count
    if data_root is not None:
        update["root"] = str(Path(data_root).expanduser().resolve())
    return own.model_copy(update=update)


def prepare_encode(model: str, data: str, out: str | Path, *, batch_size: int = 64, dtype: str = "float32",
                   shard_rows: int | None = None, threads: int = 1, data_root: str | None = None,
                   count: int | None = None, tracking_uri: str | None = None) -> EncodeJob:
    """Load and check the encoder, find (or prepare) the data, fix the plan,
    and get `out` ready (see raygen.data.latents.start_output)."""
    import torch

    from raygen.data import ensure_dataset
    from raygen.exports import load_exported, locate_export
    from raygen.models import Capability, require
    from raygen.train.runner import family_sources

    if dtype not in DTYPES:
        raise DataError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if batch_size < 1:
        raise DataError(f"batch_size: {batch_size} must be at least 1")
    if threads < 1:
        raise DataError(f"threads: {threads} must be at least 1")
    export = locate_export(model, tracking_uri).resolve()
    loaded = load_exported(export)
    loaded.model.model_name = model  # so a CapabilityError names the model as the user gave it
    require(loaded.model, Capability.ENCODE)
    data_spec = _data_spec(loaded, data, batch_size=batch_size, data_root=data_root, count=count)
    data_dir = ensure_dataset(data_spec)
    source = read_manifest(data_dir)
    if source.kind == "latents":
        raise DataError(f"{data_dir} is already a latent dataset; give an image dataset to encode")
    info = loaded.data_info
    with torch.inference_mode():
        probe = loaded.model.encode(torch.zeros(1, info.channels, info.height, info.width))
    shape = [int(d) for d in probe.shape[1:]]
    row_bytes = max(1, int(torch.tensor(shape).prod()) * (2 if dtype == "float16" else 4))
    plan = EncodePlan(
        encoder={"uri": model, "export": str(export), "family": loaded.spec.model.family,
                 "digest": export_digest(export)},
        source={"path": str(data_dir), "name": source.name, "digest": dataset_digest(source)},
        image={"height": info.height, "width": info.width, "channels": info.channels},
        shape=shape, dtype=dtype, batch_size=batch_size, threads=threads,
        splits={split: plan_ranges(s.rows, batch_size, row_bytes, shard_rows=shard_rows)
                for split, s in source.splits.items()})
    out = Path(out).expanduser().resolve()
    if out == Path(data_dir).resolve():
        raise DataError(f"--out {out} is the dataset being encoded; write the latents to another folder")
    state = start_output(out, plan)
    components = dict(loaded.model.components.items()) if hasattr(loaded.model, "components") else {}
    return EncodeJob(model_uri=model, export=export, model=loaded.model,
                     family_sources=family_sources(loaded.spec, components), data_dir=Path(data_dir),
                     data_spec=data_spec, source=source, plan=plan, out=out, state=state)


def run_local(job: EncodeJob, *, world_size: int = 1, stop_after_batches: int | None = None,
              ranks: list[int] | None = None) -> EncodeResult:
    """The encode job in this process, without Ray: each rank's share in
    turn (what the Ray workers do, for tests and small jobs), then the
    manifest when everything is there."""
    from raygen.data.pipeline import make_recipe
    from raygen.train.encode_worker import encode_rank, local_rows, make_encoder
    started = time.perf_counter()
    if job.state == "complete":
        return _result(job, "complete", 0, started)
    import torch
    encode = make_encoder(job.model.eval(), torch.device("cpu"))
    params = _params(job)
    recipes = {split: make_recipe(job.source, split, params) for split, r in job.plan.splits.items() if r}
    batches = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(job.plan.threads)  # as the workers do
    try:
        for rank in ranks if ranks is not None else range(world_size):
            share = encode_rank(encode, job.plan, job.out, lambda split: local_rows(recipes[split]),
                                dict(job.source.extra_columns), rank=rank, world_size=world_size,
                                stop_after=stop_after_batches)
            batches += share.batches
    finally:
        torch.set_num_threads(threads)
    return _finish(job, batches, started)


def _params(job: EncodeJob):
    from raygen.data.decode import DecodeParams
    return DecodeParams.for_spec(job.source, job.data_spec)


def _finish(job: EncodeJob, batches: int, started: float) -> EncodeResult:
    counts = progress_counts(job.out, job.plan)
    if counts["shards_done"] < counts["shards"]:
        return _result(job, "stopped", batches, started, counts)
    manifest = finish_output(job.out, job.plan, job.source)
    out = _result(job, "resumed" if job.state == "resume" else "encoded", batches, started, counts)
    out.manifest, out.finished, out.digest = manifest, True, dataset_digest(manifest)
    return out


def _result(job: EncodeJob, status: str, batches: int, started: float,
            counts: dict[str, int] | None = None) -> EncodeResult:
    finished = status == "complete"
    manifest = read_manifest(job.out) if finished else None
    return EncodeResult(out=job.out, finished=finished, status=status, plan=job.plan,
                        progress=counts or progress_counts_complete(job.plan), batches=batches,
                        manifest=manifest, digest=dataset_digest(manifest) if manifest else None,
                        seconds=time.perf_counter() - started)


def progress_counts_complete(plan: EncodePlan) -> dict[str, int]:
    shards = sum(len(r) for r in plan.splits.values())
    return {"shards_done": shards, "shards": shards, "batches_done": plan.total_batches, "batches": plan.total_batches}


def run_encode(model: str, data: str, out: str | Path, *, workers: int = 1, batch_size: int = 64,
               dtype: str = "float32", shard_rows: int | None = None, threads: int = 1, data_root: str | None = None,
               count: int | None = None, use_gpu: bool = False, cpus_per_worker: float | None = None,
               max_failures: int = 0, address: str | None = None, tracking_uri: str | None = None,
               experiment: str = "raygen", run_name: str | None = None, parent_run_id: str | None = None,
               stop_after_batches: int | None = None, progress: bool = True, verbose: bool = False) -> EncodeResult:
    """Encode `data` with the `encode` capability of `model` into the latent
    dataset `out`, over `workers` Ray Train workers. An MLflow run (a child
    of `parent_run_id` in a pipeline) is logged when `tracking_uri` is given.
    Returns with `finished` False when `stop_after_batches` stopped it: run
    it again to resume."""
    from raygen.train.console import RUN_LOG, library_logs_to

    started = time.perf_counter()
    if workers < 1:
        raise DataError(f"workers: {workers} must be at least 1")
    job = prepare_encode(model, data, out, batch_size=batch_size, dtype=dtype, shard_rows=shard_rows,
                         threads=threads, data_root=data_root, count=count, tracking_uri=tracking_uri)
    tracked = _open_tracking(job, tracking_uri, experiment, run_name, parent_run_id, workers)
    if job.state == "complete":
        if progress:
            print(f"[raygen] {job.out} already holds these latents (same encoder and data): nothing to do", flush=True)
        result = _result(job, "complete", 0, started)
    else:
        with library_logs_to(state_dir(job.out) / RUN_LOG, verbose):
            result = _run_ray(job, workers=workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
                              max_failures=max_failures, address=address, stop_after_batches=stop_after_batches,
                              progress=progress, verbose=verbose, tracked=tracked)
    result.seconds = time.perf_counter() - started
    if tracked is not None:
        _log_result(tracked, result, workers)
        result.run_id, result.tracking_uri = tracked.run_id, tracked.tracking_uri
    return result


def _run_ray(job: EncodeJob, *, workers: int, use_gpu: bool, cpus_per_worker: float | None, max_failures: int,
             address: str | None, stop_after_batches: int | None, progress: bool, verbose: bool,
             tracked) -> EncodeResult:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raygen.data.latents import pending_batches
    from raygen.data.pipeline import DeterministicDataConfig, ImageDataset, make_recipe
    from raygen.spec.errors import SpecError
    from raygen.train.cluster import cpus_per_worker as worker_cpus, ensure_ray
    from raygen.train.console import RUN_LOG, ConsoleFollower, stderr_to
    from raygen.train.encode_worker import EncodeWorkerConfig, encode_worker
    from raygen.train.runner import TrainingFailed, _root_cause, quiet_data_progress

    started = time.perf_counter()
    folder = state_dir(job.out)
    with stderr_to(folder / RUN_LOG, enabled=not verbose):
        resources = ensure_ray(address, quiet=not verbose)
    quiet_data_progress()
    if cpus_per_worker is None:  # what an encoder call uses (the plan's threads), if the cluster has room
        cpus_per_worker = min(float(job.plan.threads), max(0.05, (resources.get("CPU", 1) - 1.0) / workers))
    cpus = worker_cpus(cpus_per_worker, workers, resources.get("CPU", 1))
    if use_gpu and resources.get("GPU", 0) < workers:
        raise SpecError([f"use_gpu: the cluster has {resources.get('GPU', 0):g} GPUs for {workers} workers; "
                         "use fewer workers or encode on CPU"])
    before = progress_counts(job.out, job.plan)
    params = _params(job)
    # every rank gets each split whole (with its recipe) and reads only its own shards' rows
    datasets = {split: ImageDataset.from_recipe(make_recipe(job.source, split, params))
                for split, ranges in job.plan.splits.items() if ranges}
    rank0 = sum(len(pending_batches(job.out, job.plan, s, 0, workers)) for s in job.plan.splits)
    if progress:
        verb = "resuming" if job.state == "resume" else "encoding"
        print(f"[raygen] {verb} {job.source.name} ({', '.join(f'{k} {v}' for k, v in job.source.counts.items())}) "
              f"with {job.plan.encoder['family']} into {job.out}: latents {'x'.join(map(str, job.plan.shape))} "
              f"{job.plan.dtype}, {before['batches'] - before['batches_done']} of {before['batches']} batch(es) "
              f"to go over {workers} worker(s) × {cpus:g} CPU", flush=True)
    trainer = TorchTrainer(
        encode_worker,
        train_loop_config=EncodeWorkerConfig(
            out=job.out, export=job.export, use_gpu=use_gpu, stop_after_batches=stop_after_batches, progress=progress,
            family_sources=tuple(job.family_sources)).to_dict(),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=f"encode-{int(time.time() * 1000)}", storage_path=str(folder / "ray"),
                             failure_config=FailureConfig(max_failures=max_failures)),
        datasets=datasets,
        dataset_config=DeterministicDataConfig(datasets_to_split=[]),
    )
    try:
        with ConsoleFollower(folder, total=max(rank0, 1), verbose=verbose) if progress else contextlib.nullcontext():
            trainer.fit()
    except Exception as err:
        if tracked is not None:
            tracked.finish("FAILED")
        cause = _root_cause(err)
        if cause.endswith(":"):  # "Training failed due to controller error:" and the reason on the next line
            rest = [line for line in str(err).splitlines() if line.strip() and line.strip() not in cause]
            cause = f"{cause} {rest[0].strip()}" if rest else cause
        raise TrainingFailed(f"{cause} (log: {folder / RUN_LOG}; run the same command again to resume)") from err
    after = progress_counts(job.out, job.plan)
    return _finish(job, after["batches_done"] - before["batches_done"], started)


def _open_tracking(job: EncodeJob, tracking_uri: str | None, experiment: str, run_name: str | None,
                   parent_run_id: str | None, workers: int):
    """The MLflow run of this encode (reopened when resuming one), or None without a tracking URI."""
    if not tracking_uri:
        return None
    from raygen.tracking.store import open_run
    marker = state_dir(job.out) / TRACKING_FILE
    previous = json.loads(marker.read_text()) if job.state == "resume" and marker.is_file() else {}
    tracked = open_run(tracking_uri, experiment, run_name or f"encode-{job.out.name}",
                       run_id=previous.get("run_id") if previous.get("tracking_uri") == tracking_uri else None,
                       parent_run_id=parent_run_id,
                       tags={"raygen.kind": "encode", "raygen.encoder": job.model_uri, "raygen.latents": str(job.out)})
    plan = job.plan
    tracked.log_params({"encode.model": job.model_uri, "encode.export": str(job.export),
                        "encode.family": plan.encoder["family"], "encode.data": str(job.data_dir),
                        "encode.batch_size": plan.batch_size, "encode.dtype": plan.dtype,
                        "encode.latent_shape": "x".join(map(str, plan.shape)),
                        "encode.encoder_digest": plan.encoder["digest"], "encode.source_digest": plan.source["digest"]})
    if job.state != "complete":
        (state_dir(job.out) / TRACKING_FILE).write_text(json.dumps({"run_id": tracked.run_id,
                                                                    "tracking_uri": tracking_uri}))
    return tracked


def _log_result(tracked, result: EncodeResult, workers: int) -> None:
    metrics = {"batches_encoded": float(result.batches), "shards_done": float(result.progress.get("shards_done", 0)),
               "shards": float(result.progress.get("shards", 0)), "wall_time_s": result.seconds,
               "workers": float(workers)}
    if result.manifest is not None:
        for split, info in result.manifest.splits.items():
            metrics[f"rows_{split}"] = float(info.rows)
            metrics[f"skipped_{split}"] = float(info.skipped)
        tracked.set_tags({"raygen.latents_digest": result.digest})
        tracked.log_params({"encode.latents_digest": result.digest})
    tracked.log_metrics(metrics)
    tracked.finish("FINISHED" if result.finished else "KILLED")


def is_latent_dataset(path: str | Path) -> bool:
    """A complete latent dataset folder."""
    p = Path(path)
    if not (p / MANIFEST_NAME).is_file():
        return False
    try:
        return read_manifest(p).kind == "latents"
    except DataError:
        return False


__all__ = ["EncodeJob", "EncodeResult", "STATE_DIR", "export_digest", "is_latent_dataset", "prepare_encode",
           "run_encode", "run_local"]
