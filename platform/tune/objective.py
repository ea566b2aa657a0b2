"""What a sweep optimizes: one metric, a weighted sum of metrics, or several
metrics at once (Optuna's multi-objective mode), and how trials are ranked."""
from __future__ import annotations

import math
from typing import Any

from raygen.spec.schema import JobSpec, TuneSpec

#: the name a weighted sum is reported under
OBJECTIVE = "objective"
#: measured by the FID hook on its cadence (track.fid.every), not by validation
FID_METRICS = ("fid", "kid", "fid_floor", "fid_stderr", "clip_score")


def objective_metrics(tune: TuneSpec) -> list[str]:
    """The metrics every trial must report for this sweep."""
    if tune.objectives:
        return [o.metric for o in tune.objectives]
    if tune.objective:
        return list(tune.objective)
    return [tune.metric]


def shown_metrics(tune: TuneSpec) -> list[str]:
    """What the results table, plots and summary lead with: the optimized metric(s), and
    for a weighted sum the sum ('objective') before its terms."""
    return [OBJECTIVE, *tune.objective] if tune.objective else objective_metrics(tune)


def tune_metric_and_mode(tune: TuneSpec) -> tuple[str | list[str], str | list[str]]:
    """Metric and mode for Tune/Optuna: lists in multi-objective mode."""
    if tune.objectives:
        return [o.metric for o in tune.objectives], [o.mode for o in tune.objectives]
    return tune.metric, tune.mode


def with_objective(metrics: dict[str, Any], weights: dict[str, float]) -> dict[str, Any]:
    """`metrics` plus 'objective' = Σ weight·metric, when every weighted metric is there.
    A report lacking one (an eval step without FID) gets none, so no scheduler
    compares a partial sum with a full one."""
    if not weights or not all(isinstance(metrics.get(k), (int, float)) for k in weights):
        return metrics
    return {**metrics, OBJECTIVE: float(sum(w * float(metrics[k]) for k, w in weights.items()))}


def with_objective_cadence(spec: JobSpec) -> JobSpec:
    """A sweep whose objective is FID (or KID, CLIP score) measures it at every
    report (the eval cadence): track.fid.every 0 ('only at the end') becomes the
    largest step count that divides train.eval_every, checkpoint_every and steps.
    The sample count stays track.fid.samples: keep it small for sweeps."""
    fid = spec.track.fid
    if fid.every or not fid.enabled or not set(objective_metrics(spec.tune)) & set(FID_METRICS):
        return spec
    every = math.gcd(spec.train.eval_every, spec.train.checkpoint_every, spec.train.steps)
    track = spec.track.model_copy(update={"fid": fid.model_copy(update={"every": every})})
    return spec.model_copy(update={"track": track})


def pareto_front(rows: list[dict[str, float]], metrics: list[str], modes: list[str]) -> list[int]:
    """Indices of the rows no other row dominates (at least as good everywhere, better somewhere)."""
    signs = [1.0 if m == "min" else -1.0 for m in modes]

    def key(r):
        return [s * float(r[m]) for s, m in zip(signs, metrics)]
    keys = [key(r) for r in rows]
    front = []
    for i, a in enumerate(keys):
        dominated = any(all(b_ <= a_ for a_, b_ in zip(a, b)) and any(b_ < a_ for a_, b_ in zip(a, b))
                        for j, b in enumerate(keys) if j != i)
        if not dominated:
            front.append(i)
    return front


def best_index(rows: list[dict[str, float]], tune: TuneSpec) -> int | None:
    """The best row: by tune.metric, or in multi-objective mode the Pareto-front
    row best on the first objective. None when no row has the metrics."""
    metrics, modes = tune_metric_and_mode(tune)
    metrics = metrics if isinstance(metrics, list) else [metrics]
    modes = modes if isinstance(modes, list) else [modes]
    ok = [i for i, r in enumerate(rows)
          if all(isinstance(r.get(m), (int, float)) and math.isfinite(float(r[m])) for m in metrics)]
    if not ok:
        return None
    candidates = [ok[i] for i in pareto_front([rows[i] for i in ok], metrics, modes)]
    sign = 1.0 if modes[0] == "min" else -1.0
    return min(candidates, key=lambda i: sign * float(rows[i][metrics[0]]))
