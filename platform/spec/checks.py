""""Will this spec run?": every check that needs no data and no cluster.

`raygen spec validate`, `raygen train` and `raygen tune` all call
`check_runnable`, so validate can never say "ok" to a spec that train or
tune then reject. A check added here is a check all three make.
"""
from __future__ import annotations

import math
import sys
from typing import Any

from raygen.spec.errors import SpecError
from raygen.spec.schema import JobSpec


def check_runnable(spec: JobSpec, *, tune: bool | None) -> None:
    """Raise one SpecError listing every problem.

    tune=False: will `raygen train` run it. tune=True: will `raygen tune`
    run it (`tune.space`, `tune.filter`, and every trial spec the sweep would
    train; the base spec itself is never trained). tune=None, what `raygen
    spec validate` asks: both, the sweep part when the spec has a tune.space.
    """
    if tune is None:
        problems = _training_problems(spec)
        if spec.tune.space or spec.tune.filter:
            problems += [p for p in _tune_problems(spec) if p not in problems]
    else:
        problems = _tune_problems(spec) if tune else _training_problems(spec)
    if problems:
        raise SpecError(problems)
    for warning in spec_warnings(spec):
        print(f"raygen: warning: {warning}", file=sys.stderr, flush=True)


def spec_warnings(spec: JobSpec) -> list[str]:
    """What will run but is known to go wrong: printed by validate, train and tune, never fatal."""
    warnings = []
    if spec.train.precision == "fp16" and spec.scale.strategy == "deepspeed":
        warnings.append("train.precision: fp16 under DeepSpeed keeps the model's weights in fp16 (pure fp16, apex "
                        "O2; fp32 master weights in the optimizer), which diverged in seed 002 where fp16 autocast "
                        "(O1) trained fine; for O1 use scale.strategy: ddp (weights stay fp32, the forward pass "
                        "autocasts). Both scale the loss dynamically down to train.loss_scale_floor "
                        f"({spec.train.loss_scale_floor:g})")
    return warnings


def _training_problems(spec: JobSpec) -> list[str]:
    problems = []
    for check in (_ema_with_zero3, _deepspeed_config, _fid_sampling):
        try:
            check(spec)
        except SpecError as err:
            problems += err.problems
    return problems


def _fid_sampling(spec: JobSpec) -> None:
    """track.fid.sampling holds the family's sampling parameters: checked before anything trains."""
    if not spec.track.fid.sampling:
        return
    from raygen.models.registry import get_family
    from raygen.models.sampling import SamplingParamsError, parse_params
    try:
        parse_params(get_family(spec.model.family).sampling_params, spec.track.fid.sampling, strict=False)
    except SamplingParamsError as err:
        raise SpecError([f"track.fid.sampling: {err}"]) from None


def _ema_with_zero3(spec: JobSpec) -> None:
    if spec.train.ema.enabled and spec.scale.strategy == "deepspeed" and spec.scale.zero_stage == 3:
        raise SpecError(["train.ema.enabled: EMA needs full weights on each worker; with scale.zero_stage 3 "
                         "set train.ema.enabled=false or use zero_stage 2"])


def _deepspeed_config(spec: JobSpec) -> None:
    # fp16 on CPU, clip.value, a deepspeed_config file that contradicts the spec
    if spec.scale.strategy == "deepspeed":
        from raygen.train.deepspeed_strategy import build_deepspeed_config
        build_deepspeed_config(spec, spec.scale.workers)


def _metric_problem(spec: JobSpec) -> str | None:
    """Tune needs its metrics in every report a trial makes (each eval and checkpoint
    step, and the last): FID and its kin are there only when the FID hook runs at
    each of those steps. With track.fid.every 0 the sweep sets that cadence itself
    (raygen.tune.objective.with_objective_cadence)."""
    from raygen.tune.objective import FID_METRICS, objective_metrics  # FID_METRICS: measured by the FID hook
    fid, train = spec.track.fid, spec.train
    for metric in objective_metrics(spec.tune):
        if metric not in FID_METRICS:
            continue
        field = ("tune.metric" if not (spec.tune.objective or spec.tune.objectives)
                 else "tune.objective" if spec.tune.objective else "tune.objectives")
        if not fid.enabled:
            return f"{field}: {metric} needs track.fid.enabled: true, or optimize val_loss"
        if metric == "clip_score" and not spec.track.clip_score.scorer:
            return f"{field}: clip_score needs a scorer: set track.clip_score.scorer (hf:PATH or clip:PATH)"
        steps = {"train.eval_every": train.eval_every, "train.checkpoint_every": train.checkpoint_every,
                 "train.steps": train.steps}
        missed = [name for name, value in steps.items() if fid.every and value % fid.every]
        if missed:
            return (f"{field}: {metric} is measured every track.fid.every steps ({fid.every}), but Tune "
                    f"needs it in every report, at each step of {', '.join(missed)}; set track.fid.every to a divisor "
                    f"of them (e.g. {math.gcd(*steps.values())}), or 0 to let the sweep measure it at each report")
    return None


def _tune_problems(spec: JobSpec) -> list[str]:
    from raygen.spec.loader import apply_overrides, parse_spec, spec_to_dict
    from raygen.tune.space import grid_points

    if not spec.tune.space:
        return ["tune.space: empty; give at least one key, e.g. {train.optimizer.lr: {loguniform: [1e-4, 1e-2]}}"]
    metric_problem = _metric_problem(spec)
    if metric_problem:
        return [metric_problem]
    try:
        points = grid_points(spec.tune)  # filter keys that are not grid axes, a filter that rejects everything
    except SpecError as err:
        return err.problems
    base = spec_to_dict(spec)
    sampled = {k: _probe_value(v) for k, v in spec.tune.space.items() if k not in points[0]}
    problems: list[str] = []
    # Every grid point the sweep will run (with a value of each sampled key):
    # a combination can be invalid where each value alone is fine (dim % heads).
    for point in points:
        overrides = {**point, **sampled}
        try:
            trial = parse_spec(apply_overrides(base, overrides))
            new = _training_problems(trial)
        except SpecError as err:
            new = err.problems
        for p in new:
            line = _space_problem(p, overrides)
            if line not in problems:
                problems.append(line)
    return problems


def _space_problem(problem: str, overrides: dict[str, Any]) -> str:
    """Name the searched key at fault, else the whole trial."""
    for key in overrides:
        if problem.startswith(key + ": "):
            return f"tune.space.{key}: {problem[len(key) + 2:]}"
        if problem.startswith(key + "."):
            return f"tune.space.{key}: {problem}"
    trial = " ".join(f"{k}={v}" for k, v in overrides.items())
    return f"tune.space: the trial {trial} would fail: {problem}"


def _probe_value(dist: dict[str, Any]) -> Any:
    """A value the sweep may draw: the first choice, or the low bound."""
    kind, args = next(iter(dist.items()))
    return args[0]
