"""`tune.scheduler` to a Ray Tune trial scheduler."""
from __future__ import annotations

from raygen.spec.errors import SpecError
from raygen.spec.schema import JobSpec

#: a PBT exploit loads the donor's weights, optimizer and data position: keys that
#: change the model's shapes or the data stream cannot be mutated
_NOT_MUTABLE = ("model.", "data.", "scale.", "train.steps", "train.grad_accum")


def reports_per_trial(spec: JobSpec) -> int:
    """A trial reports at each eval step, plus once more with the final metrics."""
    return -(-spec.train.steps // spec.train.eval_every) + 1


def pbt_mutations(spec: JobSpec) -> dict:
    from raygen.tune.space import build_param_space, finite_axes
    fixed = set(finite_axes(spec.tune))  # grid axes are one value per trial, copied from the donor
    keys = [k for k in spec.tune.space if k not in fixed]
    bad = [k for k in keys if k.startswith(_NOT_MUTABLE)]
    if bad:
        raise SpecError([f"tune.space.{bad[0]}: PBT continues a donor's checkpoint, so it can mutate only keys that "
                         "keep the weights and data stream valid (train.optimizer.*, train.clip.*, train.ema.*, ...); "
                         "give this one as {grid: [...]} or use another scheduler"])
    if not keys:
        raise SpecError(["tune.space: PBT needs at least one sampled key to perturb (e.g. "
                         "train.optimizer.lr: {loguniform: [1e-4, 1e-2]})"])
    space = build_param_space(spec.tune)
    return {k: space[k] for k in keys}


def build_scheduler(spec: JobSpec):
    from ray.tune.schedulers import (ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule,
                                     PopulationBasedTraining)
    s = spec.tune.scheduler
    # A trial reaching max_t is stopped, so max_t counts the final report too: the run's wrap-up is not cut short.
    max_t = reports_per_trial(spec)
    builders = {
        "asha": lambda: ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                      grace_period=min(s.grace_period, max_t), reduction_factor=s.reduction_factor),
        "hyperband": lambda: HyperBandScheduler(time_attr="training_iteration", max_t=max_t,
                                                reduction_factor=s.reduction_factor),
        "median": lambda: MedianStoppingRule(time_attr="training_iteration", grace_period=s.grace_period),
        "pbt": lambda: PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=s.perturbation_interval,
            quantile_fraction=s.quantile_fraction, hyperparam_mutations=pbt_mutations(spec)),
        "fifo": FIFOScheduler,
    }
    return builders[s.name]()


def pbt_ready(spec: JobSpec) -> JobSpec:
    """Under PBT every report carries a checkpoint (checkpoint_every = eval_every),
    so whichever report triggers an exploit has the donor's state to hand over."""
    if spec.tune.scheduler.name != "pbt" or spec.train.checkpoint_every == spec.train.eval_every:
        return spec
    return spec.model_copy(update={"train": spec.train.model_copy(update={"checkpoint_every": spec.train.eval_every})})
