"""`raygen train PIPELINE.yaml`: run a pipeline's stages in order.

Stages already finished are skipped (their models stay where they are), the
first unfinished one resumes from its newest checkpoint, and the rest run
fresh. An `encode:` stage (raygen.train.encode) writes a latent dataset to
`<run_dir>/<name>/<stage>/data`, resumes from the batches already encoded
there, and is referred to as `${stages.NAME.data}`. MLflow gets a parent run
for the pipeline and a child run per stage. State lives in
`<run_dir>/<name>/pipeline.json`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from raygen.spec.pipeline import PipelineSpec, encode_stage, stage_spec, validate_pipeline
from raygen.train.checkpoint import find_latest_checkpoint

STATE = "pipeline.json"


@dataclass
class PipelineResult:
    folder: Path
    parent_run_id: str
    tracking_uri: str
    models: dict[str, str] = field(default_factory=dict)     # stage -> exported model folder
    data: dict[str, str] = field(default_factory=dict)       # encode stage -> latent dataset folder
    ran: list[str] = field(default_factory=list)               # stages run (or resumed) this time
    skipped: list[str] = field(default_factory=list)           # stages already finished
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def _finished(checkpoint: Path | None, steps: int) -> bool:
    if checkpoint is None:
        return False
    return json.loads((checkpoint / "state.json").read_text())["train_state"]["step"] >= steps


def run_pipeline(pipeline: PipelineSpec, base: Path, *, tracking_uri: str | None = None, address: str | None = None,
                 progress: bool = True, log=print) -> PipelineResult:
    from raygen.tracking.store import default_tracking_uri, open_run
    from raygen.train.runner import run_training

    validate_pipeline(pipeline, base)  # every stage's spec, before the first one trains
    folder = (Path(pipeline.run_dir) / pipeline.name).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    state_file = folder / STATE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"stages": {}}
    tracking_uri = tracking_uri or state.get("tracking_uri") or default_tracking_uri(pipeline.run_dir)
    parent = state.get("parent_run_id")
    if parent is None:
        parent = open_run(tracking_uri, "raygen", pipeline.name,
                          tags={"raygen.pipeline": pipeline.name, "raygen.stages": ",".join(pipeline.stages)}).run_id
    state.update({"parent_run_id": parent, "tracking_uri": tracking_uri, "name": pipeline.name})

    def save() -> None:
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(state_file)

    save()
    result = PipelineResult(folder=folder, parent_run_id=parent, tracking_uri=tracking_uri)
    outputs: dict[str, dict[str, str]] = {}  # stage -> {"model": ...} or {"data": ...}, for references
    for i, name in enumerate(pipeline.stages, 1):
        done = state["stages"].get(name, {})
        if pipeline.stages[name].encode is not None:
            data = _encode_stage(pipeline, name, i, done, state, save, outputs, folder=folder,
                                 tracking_uri=tracking_uri, parent=parent, address=address, progress=progress,
                                 log=log, result=result)
            outputs[name] = {"data": data}
            result.data[name] = data
            continue
        if done.get("status") == "finished" and Path(done["model"]).is_dir():
            result.models[name] = done["model"]
            outputs[name] = {"model": done["model"]}
            result.skipped.append(name)
            log(f"[raygen] stage {i}/{len(pipeline.stages)} {name}: finished earlier, model {done['model']}")
            continue
        spec = stage_spec(pipeline, base, name, outputs)
        stage_dir = folder / name
        resume = find_latest_checkpoint(stage_dir) is not None
        log(f"[raygen] stage {i}/{len(pipeline.stages)} {name}: {spec.model.family}, {spec.train.steps} steps"
            + (" (resuming)" if resume else ""))
        out = run_training(spec, resume=resume, tracking_uri=tracking_uri, address=address, progress=progress,
                           parent_run_id=parent, run_dir=stage_dir)
        if not _finished(out.checkpoint, spec.train.steps):
            state["stages"][name] = {"status": "unfinished", "run_dir": str(stage_dir)}
            save()
            raise RuntimeError(f"stage {name!r} stopped before its last step; run the pipeline again to resume it")
        model = str(out.checkpoint / "export")
        state["stages"][name] = {"status": "finished", "model": model, "model_uri": out.model_uri,
                                 "run_id": out.run_id, "run_dir": str(stage_dir)}
        save()
        result.models[name] = model
        outputs[name] = {"model": model}
        result.ran.append(name)
        result.metrics[name] = out.metrics
    return result


def _encode_stage(pipeline: PipelineSpec, name: str, i: int, done: dict, state: dict, save, outputs: dict, *,
                  folder: Path, tracking_uri: str, parent: str, address: str | None, progress: bool, log,
                  result: PipelineResult) -> str:
    """Run (or skip, or resume) an encode stage; returns its dataset folder."""
    from raygen.data import DataError, read_manifest
    from raygen.models import CapabilityError
    from raygen.train.encode import run_encode

    total = len(pipeline.stages)
    if done.get("status") == "finished":
        try:
            read_manifest(done["data"])
            result.skipped.append(name)
            log(f"[raygen] stage {i}/{total} {name}: finished earlier, latents {done['data']}")
            return done["data"]
        except DataError:
            pass  # its folder is gone or damaged: encode again
    enc = encode_stage(pipeline, name, outputs)
    out_dir = folder / name / "data"
    resume = (out_dir / ".encode").is_dir()
    log(f"[raygen] stage {i}/{total} {name}: encode {enc.data} with {enc.model}" + (" (resuming)" if resume else ""))
    try:
        out = run_encode(enc.model, enc.data, out_dir, workers=enc.workers, batch_size=enc.batch_size,
                         dtype=enc.dtype, shard_rows=enc.shard_rows, threads=enc.threads, count=enc.count,
                         use_gpu=enc.use_gpu,
                         address=address, tracking_uri=tracking_uri, run_name=name, parent_run_id=parent,
                         progress=progress)
    except CapabilityError as err:
        raise RuntimeError(f"stage {name!r}: {err}") from None
    if not out.finished:
        state["stages"][name] = {"status": "unfinished", "kind": "encode", "data": str(out_dir)}
        save()
        raise RuntimeError(f"stage {name!r} stopped before encoding everything; run the pipeline again to resume it")
    state["stages"][name] = {"status": "finished", "kind": "encode", "data": str(out.out), "run_id": out.run_id,
                             "digest": out.digest}
    save()
    result.ran.append(name)
    result.metrics[name] = {f"rows_{k}": float(v) for k, v in out.counts.items()}
    return str(out.out)
