"""One Tune trial: a real `run_training` (a TorchTrainer inside a function
trainable, which is how Train V2 nests under Tune) whose reports reach Tune
with their checkpoints.

Ray's `TuneReportCallback` forwards metrics only, so PBT would find no
checkpoint to clone and a restored sweep none to continue from. Here a Train
callback puts every report (metrics and the reported checkpoint) on a queue;
the trial function trains in a thread and reports each item to Tune itself,
with a Tune checkpoint:
- under PBT, a copy of the checkpoint folder (weights, optimizer, EMA and
  other hook state, data position, RNG), persisted by Tune in the sweep's
  storage, so a donor pruning its own checkpoints cannot break an exploit;
- otherwise a pointer to the trial's own checkpoint folder.

When Tune hands the trial a checkpoint (`tune.get_checkpoint()`), training
resumes from it: the trial's own (a paused or restored trial) continues in
its own folder; a donor's (a PBT exploit) starts a new folder
`trials/<trial>-x<N>` from the donor's state with the perturbed config.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from raygen.tune.objective import with_objective
from raygen.tune.space import overrides_from_config

POINTER = "raygen_checkpoint.json"  # what raygen.train.worker reports to Ray Train, and this to Tune
EXPLOIT_FILE = "exploit.json"       # in an exploiting trial's folder: which donor state it started from
# every report a trial made, in its own folder: Tune rewrites a trial's result.json when PBT restores it,
# so a trial that was exploited several times keeps only its last run's rows there
REPORTS_FILE = "tune_reports.jsonl"


def make_report_callback(queue):
    """A Ray Train callback, built here because UserCallback imports Ray Train V2."""
    from ray.train.v2.api.callback import UserCallback

    class _Forward(UserCallback):
        """Rank 0's metrics and the reported checkpoint, from Ray Train's controller to the trial function."""

        def __init__(self, q):
            self.queue = q

        def after_report(self, run_context, metrics, checkpoint):
            self.queue.put((dict(metrics[0]), checkpoint))

    return _Forward(queue)


def checkpoint_folder(train_checkpoint_dir: Path) -> Path:
    """The raygen checkpoint folder a Ray checkpoint directory stands for: the
    folder itself (a copy, or scale.storage's upload) or the one its pointer names."""
    from raygen.train.checkpoint import MARKER
    if (train_checkpoint_dir / MARKER).is_file():
        return train_checkpoint_dir
    return Path(json.loads((train_checkpoint_dir / POINTER).read_text())["path"])


def _tune_checkpoint(folder: Path, trial_id: str, copy: bool):
    """A Tune checkpoint for a raygen checkpoint folder (see the module doc)."""
    from ray import tune as ray_tune
    tmp = Path(tempfile.mkdtemp(prefix="raygen-tune-ckpt-"))
    if copy:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
    (tmp / POINTER).write_text(json.dumps({"path": str(folder), "trial_id": trial_id, "step": _step_of(folder)}))
    return ray_tune.Checkpoint.from_directory(str(tmp)), tmp


def _step_of(folder: Path) -> int:
    return int(json.loads((folder / "state.json").read_text())["train_state"]["step"])


def _numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not k.startswith("_")}


def _record(run_dir: Path, metrics: dict[str, Any]) -> None:
    with open(run_dir / REPORTS_FILE, "a") as f:
        f.write(json.dumps(metrics, default=str) + "\n")


def final_report(run_metrics: dict[str, Any], newest_checkpoint: Path | None, reported: dict[str, Any],
                 weights: dict[str, float]) -> dict[str, Any]:
    """A trial's last report to Tune: the newest checkpoint's metrics (the donor's, for a PBT exploit of
    a finished trial), under what it reported (its own perturbed lr), under what only the finished run knows."""
    saved: dict[str, Any] = {}
    if newest_checkpoint is not None and (newest_checkpoint / "state.json").is_file():
        saved = {**json.loads((newest_checkpoint / "state.json").read_text()).get("metrics", {}),
                 "step": float(_step_of(newest_checkpoint))}
    return with_objective(_numbers({**saved, **reported, **run_metrics}), weights)


def make_trial(base_raw: dict, *, parent_run_id: str, tracking_uri: str, sweep_dir: str,
               cpus_per_worker: float, gpus_per_worker: float, weights: dict[str, float], copy_checkpoints: bool):
    """The function trainable of a sweep (closed over plain values: Ray pickles it)."""

    def trial(config: dict[str, Any]) -> None:
        from ray import tune as ray_tune
        from ray.util.queue import Queue

        from raygen.spec.loader import apply_overrides, parse_spec
        from raygen.train.runner import run_training

        trial_id = ray_tune.get_context().get_trial_id()
        raw = apply_overrides(base_raw, overrides_from_config(config))
        raw["name"] = f"{base_raw.get('name', 'raygen-run')}-{trial_id}"
        scale = raw.setdefault("scale", {})
        scale["cpus_per_worker"] = cpus_per_worker
        if gpus_per_worker:
            scale["use_gpu"] = True
        raw.setdefault("track", {})["register_model"] = False  # the sweep registers its best trial only
        spec = parse_spec(raw)
        trials_dir = Path(sweep_dir) / "trials"

        with contextlib.ExitStack() as stack:
            run_dir, resume_from = trials_dir / trial_id, None
            # started before (a resumed sweep whose Tune state missed the last checkpoint, a retried trial):
            # its folder's newest checkpoint and MLflow run continue
            resume = (run_dir / "run.json").is_file()
            given = ray_tune.get_checkpoint()
            if given is not None:
                local = Path(stack.enter_context(given.as_directory()))
                pointer = json.loads((local / POINTER).read_text())
                if pointer.get("trial_id") == trial_id:
                    # this trial's own state (paused, or the sweep resumed): the folder it was training in
                    # (path = <run folder>/checkpoints/step-N), from that folder's newest checkpoint
                    run_dir, resume = Path(pointer["path"]).parent.parent, True
                else:
                    # a PBT exploit: the donor's state, the perturbed config, a fresh folder
                    n = 1 + sum(1 for p in trials_dir.glob(f"{trial_id}-x*") if p.is_dir())
                    run_dir, resume = trials_dir / f"{trial_id}-x{n}", False
                    resume_from = checkpoint_folder(local)
                    run_dir.mkdir(parents=True, exist_ok=True)
                    (run_dir / EXPLOIT_FILE).write_text(json.dumps({
                        "donor_trial": pointer.get("trial_id"), "donor_step": pointer.get("step"),
                        "donor_checkpoint": pointer.get("path"), "overrides": overrides_from_config(config)},
                        indent=2, default=str))

            # An earlier run of this trial that Tune stopped (a PBT pause or exploit, a killed sweep)
            # died with its trial actor and may still hold its workers' placement group: free it, or on
            # a small cluster this run's data tasks never get a CPU.
            from raygen.train.runner import release_placement_group
            for earlier in trials_dir.glob(f"{trial_id}*"):
                release_placement_group(earlier)

            queue = Queue(actor_options={"num_cpus": 0})
            outcome: dict[str, Any] = {}

            def train() -> None:
                try:
                    outcome["result"] = run_training(
                        spec, tracking_uri=tracking_uri, progress=False, parent_run_id=parent_run_id,
                        extra_callbacks=[make_report_callback(queue)], run_dir=run_dir, resume=resume,
                        resume_from=resume_from, gpus_per_worker=gpus_per_worker or None)
                except BaseException as err:  # re-raised in the trial's own thread below
                    outcome["error"] = err
                finally:
                    queue.put(None)

            worker = threading.Thread(target=train, name=f"raygen-trial-{trial_id}", daemon=True)
            worker.start()
            last: dict[str, Any] = {}
            while (item := queue.get()) is not None:
                metrics, train_ckpt = item
                metrics = with_objective(_numbers(metrics), weights)
                metrics["trial_run"] = run_dir.name
                last.update(metrics)
                _record(run_dir, metrics)
                if train_ckpt is None:
                    ray_tune.report(metrics)
                    continue
                with train_ckpt.as_directory() as d:
                    ckpt, tmp = _tune_checkpoint(checkpoint_folder(Path(d)), trial_id, copy_checkpoints)
                    try:
                        ray_tune.report(metrics, checkpoint=ckpt)
                    finally:
                        shutil.rmtree(tmp, ignore_errors=True)
            worker.join()
            if "error" in outcome:
                raise outcome["error"]
            result = outcome["result"]
            # one last report carrying what only the finished run knows (final FID, its MLflow run). A run
            # that trained nothing (Tune restored a finished trial; PBT handed this trial a donor's last
            # checkpoint) reported nothing: its metrics are that checkpoint's, which Tune needs too (a
            # report without its metric fails the whole sweep)
            final = final_report(result.metrics, result.checkpoint if result.checkpoint is not None else resume_from,
                                 last, weights)
            final.update({"mlflow_run_id": result.run_id or "", "trial_run": run_dir.name})
            if weights and "objective" in final and result.run_id:
                from raygen.tracking.store import client
                client(tracking_uri).log_metric(result.run_id, "objective", final["objective"])  # for --if-better
            _record(run_dir, final)
            ray_tune.report(final)
    return trial
