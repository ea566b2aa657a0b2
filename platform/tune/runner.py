"""Driver of `raygen tune`: each trial is a real training run (TorchTrainer
inside a function trainable, which is how Train V2 nests under Tune)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raygen.spec.errors import SpecError
from raygen.spec.loader import apply_overrides, parse_spec, spec_to_dict
from raygen.spec.schema import JobSpec
from raygen.tune.space import build_param_space, overrides_from_config


@dataclass
class TuneResult:
    best_overrides: dict[str, Any]
    best_metrics: dict[str, float]
    trials: list[dict[str, Any]] = field(default_factory=list)
    parent_run_id: str | None = None
    tracking_uri: str = ""
    sweep_dir: Path | None = None
    model_uri: str | None = None


def _scheduler(spec: JobSpec):
    from ray.tune.schedulers import (ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule,
                                     PopulationBasedTraining)
    s, t = spec.tune.scheduler, spec.tune
    # reports per trial: one per eval, plus the final one with FID. A trial
    # reaching max_t is stopped, so it must not cut the run's wrap-up short.
    max_t = -(-spec.train.steps // spec.train.eval_every) + 1
    builders = {
        "asha": lambda: ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=min(s.grace_period, max_t),
                                      reduction_factor=s.reduction_factor),
        "hyperband": lambda: HyperBandScheduler(time_attr="training_iteration", max_t=max_t,
                                                reduction_factor=s.reduction_factor),
        "median": lambda: MedianStoppingRule(time_attr="training_iteration", grace_period=s.grace_period),
        "pbt": lambda: PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=s.perturbation_interval,
            hyperparam_mutations={k: build_param_space(spec.tune)[k] for k, v in spec.tune.space.items() if "grid" not in v}),
        "fifo": FIFOScheduler,
    }
    return builders[s.name]()


def _trial_fn(base_raw: dict, parent_run_id: str, tracking_uri: str, sweep_dir: str, cpus_per_worker: float):
    def trial(config: dict[str, Any]) -> None:
        from ray import tune as ray_tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from raygen.train.runner import run_training

        overrides = overrides_from_config(config)
        trial_id = ray_tune.get_context().get_trial_id()
        raw = apply_overrides(base_raw, overrides)
        raw["name"] = f"{base_raw.get('name', 'raygen-run')}-{trial_id}"
        raw.setdefault("scale", {})["cpus_per_worker"] = cpus_per_worker
        raw.setdefault("track", {})["register_model"] = False  # the sweep registers its best trial only
        spec = parse_spec(raw)
        result = run_training(spec, tracking_uri=tracking_uri, progress=False, parent_run_id=parent_run_id,
                              extra_callbacks=[TuneReportCallback()], run_dir=Path(sweep_dir) / "trials" / trial_id)
        # one last report carrying what only the finished run knows (FID, the registered model)
        final = dict(result.metrics)
        final.update({"mlflow_run_id": result.run_id, "model_uri": result.model_uri or ""})
        ray_tune.report(final)
    return trial


def run_tune(spec: JobSpec, *, tracking_uri: str | None = None, address: str | None = None,
             progress: bool = True, verbose: bool = False) -> TuneResult:
    from ray import tune

    from raygen.data import ensure_dataset
    from raygen.tracking.store import default_tracking_uri, open_run
    from raygen.train.cluster import ensure_ray
    from raygen.spec.checks import check_runnable
    from raygen.train.runner import pick_run_dir

    check_runnable(spec, tune=True)  # the same checks as `raygen spec validate`, every trial included
    param_space = build_param_space(spec.tune)
    ensure_dataset(spec.data)  # prepare once, before trials race to do it
    resources = ensure_ray(address or spec.scale.address, quiet=not verbose)  # trials' output: their run.log
    concurrent = spec.tune.max_concurrent
    trial_cpu = 0.1
    spare = resources.get("CPU", 1) - 1.0 - trial_cpu * concurrent  # one CPU stays free for Ray Data
    cpus = spec.scale.cpus_per_worker or round(max(0.1, spare / (spec.scale.workers * concurrent)), 3)
    if cpus * spec.scale.workers * concurrent + trial_cpu * concurrent > resources.get("CPU", 1):
        raise SpecError([f"tune.max_concurrent: {concurrent} trials × {spec.scale.workers} workers do not fit on "
                         f"{resources.get('CPU', 1):g} CPUs; lower tune.max_concurrent or scale.workers"])

    sweep_dir = pick_run_dir(spec.model_copy(update={"name": f"{spec.name}-tune"}), resume=False).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri or spec.track.tracking_uri or default_tracking_uri(spec.run_dir)
    parent = open_run(tracking_uri, spec.track.experiment, sweep_dir.name, spec=spec, tags={"raygen.kind": "tune-sweep"})
    if progress:
        print(f"[raygen] tune sweep {sweep_dir.name}: {spec.tune.num_samples} sample(s) per grid point, "
              f"scheduler {spec.tune.scheduler.name}, {concurrent} at a time; MLflow parent run {parent.run_id}", flush=True)

    trainable = tune.with_resources(
        _trial_fn(spec_to_dict(spec), parent.run_id, tracking_uri, str(sweep_dir), cpus), {"CPU": trial_cpu})
    tuner = tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric=spec.tune.metric, mode=spec.tune.mode, num_samples=spec.tune.num_samples,
                                    scheduler=_scheduler(spec), max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=f"{sweep_dir.name}-{int(time.time())}", storage_path=str(sweep_dir / "ray"),
                                  verbose=1 if progress else 0),
    )
    grid = tuner.fit()
    trials = []
    for r in grid:
        row = {"overrides": overrides_from_config(r.config or {}),
               "metrics": {k: v for k, v in (r.metrics or {}).items() if isinstance(v, (int, float)) or k == "mlflow_run_id"},
               "error": str(r.error).splitlines()[0] if r.error else None}
        trials.append(row)
    ok = [t for t in trials if spec.tune.metric in t["metrics"]]
    if not ok:
        parent.finish("FAILED")
        errors = "; ".join(t["error"] for t in trials if t["error"])[:2000]
        raise SpecError([f"tune: no trial reported {spec.tune.metric} ({errors or 'no errors recorded'})"])
    pick = min if spec.tune.mode == "min" else max
    best = pick(ok, key=lambda t: t["metrics"][spec.tune.metric])
    parent.log_params({f"best.{k}": v for k, v in best["overrides"].items()})
    best_run = best["metrics"].get("mlflow_run_id")
    model_uri = None
    if spec.track.register_model and best_run:
        from raygen.tracking.models import register
        model_uri = register(tracking_uri, best_run, spec.name)
        parent.set_tags({"raygen.best_run_id": best_run, "raygen.model_uri": model_uri})
    parent.log_metrics({f"best_{spec.tune.metric}": best["metrics"][spec.tune.metric],
                        "trials": float(len(trials)), "trials_failed": float(sum(1 for t in trials if t["error"]))})
    (sweep_dir / "results.json").write_text(json.dumps({"best": best, "trials": trials}, indent=2, default=str))
    parent.log_artifact(sweep_dir / "results.json")
    parent.finish()
    return TuneResult(best_overrides=best["overrides"], best_metrics=best["metrics"], trials=trials,
                      parent_run_id=parent.run_id, tracking_uri=tracking_uri, sweep_dir=sweep_dir, model_uri=model_uri)
