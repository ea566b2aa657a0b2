"""`tune.search` to a Ray Tune search algorithm (None: Tune's own random/grid variant generator)."""
from __future__ import annotations

from typing import Any

from raygen.spec.schema import TuneSpec
from raygen.tune.objective import tune_metric_and_mode
from raygen.tune.space import build_param_space


def build_search(spec: TuneSpec) -> tuple[dict[str, Any], Any]:
    """The param space and the search algorithm.

    random and grid use Tune's variant generator (grid points expanded and
    filtered by raygen.tune.space; with `search: grid` there is nothing to
    sample, so num_samples repeats each point). optuna is Optuna's TPE through
    Ray Tune's OptunaSearch, which converts the Tune domains itself; with
    several objectives the study is multi-objective (TPE handles both)."""
    space = build_param_space(spec)
    if spec.search != "optuna":
        return space, None
    from ray.tune.search.optuna import OptunaSearch

    metric, mode = tune_metric_and_mode(spec)
    if isinstance(metric, list):  # Tune's own metric stays unset: schedulers take one metric only
        return space, OptunaSearch(metric=metric, mode=mode, seed=spec.seed)
    return space, OptunaSearch(seed=spec.seed)  # metric and mode come from TuneConfig


def tune_config_metric(spec: TuneSpec) -> tuple[str | None, str | None]:
    """What TuneConfig gets: the one metric, or nothing in multi-objective mode (the searcher holds them)."""
    metric, mode = tune_metric_and_mode(spec)
    return (None, None) if isinstance(metric, list) else (metric, mode)
