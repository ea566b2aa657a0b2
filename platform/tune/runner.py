"""Driver of `raygen tune`: each trial is a real training run (raygen.tune.trial),
searched by Tune's variant generator or Optuna, scheduled by ASHA, HyperBand,
median stopping or PBT; results as a table, plots, an MLflow parent run and
the best trial registered (and promoted to champion only if it is better)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raygen.spec.errors import SpecError
from raygen.spec.loader import spec_to_dict
from raygen.spec.schema import JobSpec
from raygen.tune import results as res
from raygen.tune.objective import (best_index, objective_metrics, shown_metrics, tune_metric_and_mode,
                                   with_objective_cadence)
from raygen.tune.resources import TRIAL_CPU, plan_trial_resources
from raygen.tune.schedulers import build_scheduler, pbt_ready
from raygen.tune.search import build_search, tune_config_metric
from raygen.tune.space import overrides_from_config

SWEEP_STATE = "sweep.json"


@dataclass
class TuneResult:
    best_overrides: dict[str, Any]
    best_metrics: dict[str, float]
    trials: list[dict[str, Any]] = field(default_factory=list)
    parent_run_id: str | None = None
    tracking_uri: str = ""
    sweep_dir: Path | None = None
    model_uri: str | None = None
    table: str = ""
    promotion: str = ""


def _trial_rows(grid) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per trial (overrides, numeric metrics, error), and each trial's reports as a DataFrame."""
    rows, frames = [], {}
    for r in grid:
        metrics = r.metrics or {}
        trial_id = str(metrics.get("trial_id") or Path(r.path).name)
        rows.append({"trial_id": trial_id, "overrides": overrides_from_config(r.config or {}),
                     "metrics": {k: v for k, v in metrics.items()
                                 if (isinstance(v, (int, float)) and not isinstance(v, bool))
                                 or k in ("mlflow_run_id", "trial_run")},
                     "error": str(r.error).splitlines()[0] if r.error else None})
        if r.metrics_dataframe is not None:
            frames[trial_id] = r.metrics_dataframe
    return rows, frames


def _histories(frames: dict[str, Any], metric: str) -> dict[str, list[tuple[float, float]]]:
    out = {}
    for trial_id, df in frames.items():
        if metric in df.columns and "step" in df.columns:
            pts = df[["step", metric]].dropna()
            out[trial_id] = [(float(s), float(v)) for s, v in zip(pts["step"], pts[metric])]
    return out


def _log_results(parent, sweep_dir: Path, rows, frames, spec: JobSpec, best: int | None) -> str:
    """The table (CSV, markdown) and plots into the sweep folder and the MLflow parent run; the console table back."""
    objectives = shown_metrics(spec.tune)
    header, body = res.table_rows(rows, objectives, best)
    out = sweep_dir / "results"
    out.mkdir(exist_ok=True)
    (out / "trials.csv").write_text(res.to_csv(header, body))
    (out / "trials.md").write_text(res.to_markdown(header, body))
    keys, _ = res.table_columns(rows, objectives)
    res.parallel_coordinates(rows, keys, objectives[0], out / "parallel_coordinates.png")
    for metric in dict.fromkeys([*objectives, "val_loss", "loss"]):
        hist = _histories(frames, metric)
        if any(hist.values()):
            res.metric_curves(hist, metric, out / f"curves_{metric}.png")
    for f in sorted(out.iterdir()):
        parent.log_artifact(f, "tune")
    return res.to_console(header, body)


def _register_best(spec: JobSpec, tracking_uri: str, best_run: str) -> tuple[str, str]:
    """Register the best trial's model; move `champion` to it only if it beats the
    current champion on the objective (the rule of `raygen promote --if-better`)."""
    from raygen.jobs.cmd_promote import promote
    from raygen.tracking.models import register

    model_uri = register(tracking_uri, best_run, spec.name)
    version = int(model_uri.rsplit("/", 1)[1])
    metric, mode = tune_metric_and_mode(spec.tune)
    metric, mode = (metric[0], mode[0]) if isinstance(metric, list) else (metric, mode)
    decision = promote(tracking_uri, spec.name, version, alias="champion", if_better=metric, mode=mode)
    return model_uri, f"{'champion' if decision.promoted else 'not champion'}: {decision.reason}"


def run_tune(spec: JobSpec, *, tracking_uri: str | None = None, address: str | None = None,
             progress: bool = True, verbose: bool = False, resume: bool = False) -> TuneResult:
    import ray
    from ray import tune

    from raygen.data import ensure_dataset
    from raygen.spec.checks import check_runnable
    from raygen.tracking.store import default_tracking_uri, open_run
    from raygen.train.cluster import ensure_ray
    from raygen.train.runner import pick_run_dir
    from raygen.tune.trial import make_trial

    spec = with_objective_cadence(pbt_ready(spec))  # FID at each report when it is the objective; PBT checkpoints
    check_runnable(spec, tune=True)  # the same checks as `raygen spec validate`, every trial included
    param_space, search_alg = build_search(spec.tune)
    scheduler = build_scheduler(spec)
    sweep_dir = pick_run_dir(spec.model_copy(update={"name": f"{spec.name}-tune"}), resume=resume).resolve()
    previous = json.loads((sweep_dir / SWEEP_STATE).read_text()) if resume and (sweep_dir / SWEEP_STATE).is_file() else {}
    if resume and not previous:
        raise SpecError([f"--resume: {sweep_dir} holds no {SWEEP_STATE}: it is not a sweep that was started"])
    ensure_dataset(spec.data)  # prepare once, before trials race to do it
    cluster = ensure_ray(address or spec.scale.address, quiet=not verbose)  # trials' output: their run.log
    plan = plan_trial_resources(spec, cluster, [n["Resources"] for n in ray.nodes() if n.get("Alive")])

    sweep_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = previous.get("tracking_uri") or tracking_uri or spec.track.tracking_uri or default_tracking_uri(spec.run_dir)
    parent = open_run(tracking_uri, spec.track.experiment, sweep_dir.name, spec=None if resume else spec,
                      run_id=previous.get("parent_run_id"), tags={"raygen.kind": "tune-sweep"})
    ray_name = previous.get("ray_name") or f"{sweep_dir.name}-{int(time.time())}"
    experiment = sweep_dir / "ray" / ray_name
    (sweep_dir / res.BASE_SPEC).write_text(yaml.safe_dump(spec_to_dict(spec), sort_keys=False))
    (sweep_dir / SWEEP_STATE).write_text(json.dumps({"parent_run_id": parent.run_id, "tracking_uri": tracking_uri,
                                                     "ray_name": ray_name}, indent=2))
    if progress:
        what = "resuming" if resume else "starting"
        print(f"[raygen] {what} tune sweep {sweep_dir.name}: search {spec.tune.search}, scheduler "
              f"{spec.tune.scheduler.name}, {spec.tune.num_samples} sample(s), {plan.concurrent} at a time, "
              f"each trial {plan.describe()}; MLflow parent run {parent.run_id}", flush=True)

    trainable = tune.with_resources(
        make_trial(spec_to_dict(spec), parent_run_id=parent.run_id, tracking_uri=tracking_uri,
                   sweep_dir=str(sweep_dir), cpus_per_worker=plan.cpus_per_worker,
                   gpus_per_worker=plan.gpus_per_worker if spec.tune.resources.gpus_per_trial else 0.0,
                   weights=dict(spec.tune.objective), copy_checkpoints=spec.tune.scheduler.name == "pbt"),
        {"CPU": TRIAL_CPU})
    if resume:
        if not tune.Tuner.can_restore(str(experiment)):
            raise SpecError([f"--resume: no Tune experiment to continue at {experiment} (the sweep stopped before "
                             "Tune saved its state); start the sweep again without --resume"])
        # finished trials keep their results; unfinished and errored ones continue from their last checkpoint
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, param_space=param_space)
    else:
        metric, mode = tune_config_metric(spec.tune)
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=spec.tune.num_samples,
                                        search_alg=search_alg, scheduler=scheduler,
                                        max_concurrent_trials=plan.concurrent),
            run_config=tune.RunConfig(name=ray_name, storage_path=str(sweep_dir / "ray"),
                                      verbose=1 if progress else 0),
        )
    grid = tuner.fit()
    rows, frames = _trial_rows(grid)
    best = best_index([r["metrics"] for r in rows], spec.tune)
    if best is None:
        parent.finish("FAILED")
        errors = "; ".join(r["error"] for r in rows if r["error"])[:2000]
        raise SpecError([f"tune: no trial reported {', '.join(objective_metrics(spec.tune))} "
                         f"({errors or 'no errors recorded'})"])
    chosen = rows[best]
    table = _log_results(parent, sweep_dir, rows, frames, spec, best)
    parent.log_params({f"best.{k}": v for k, v in chosen["overrides"].items()})
    best_run = chosen["metrics"].get("mlflow_run_id")
    model_uri, promotion = None, ""
    if spec.track.register_model and best_run:
        model_uri, promotion = _register_best(spec, tracking_uri, best_run)
        parent.set_tags({"raygen.best_run_id": best_run, "raygen.model_uri": model_uri, "raygen.promotion": promotion})
    parent.log_metrics({**{f"best_{m}": float(chosen["metrics"][m]) for m in shown_metrics(spec.tune)},
                        "trials": float(len(rows)), "trials_failed": float(sum(1 for r in rows if r["error"]))})
    (sweep_dir / res.RESULTS).write_text(json.dumps({"best": chosen, "trials": rows}, indent=2, default=str))
    parent.log_artifact(sweep_dir / res.RESULTS)  # spec.yaml is there since the start (open_run)
    parent.finish()
    return TuneResult(best_overrides=chosen["overrides"], best_metrics=chosen["metrics"], trials=rows,
                      parent_run_id=parent.run_id, tracking_uri=tracking_uri, sweep_dir=sweep_dir,
                      model_uri=model_uri, table=table, promotion=promotion)
