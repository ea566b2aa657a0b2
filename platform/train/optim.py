"""Optimizers and learning-rate schedules, each registered by name."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from raygen.spec.schema import OptimizerSpec, ScheduleSpec


def scaled_lr(spec: OptimizerSpec, global_batch: int) -> float:
    """Apply the batch-size scaling rule: lr * (global/base) or its square root."""
    ratio = global_batch / spec.base_batch
    return spec.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[spec.scale_lr_with_batch]


OPTIMIZERS: dict[str, Callable[[Iterable, OptimizerSpec, float], torch.optim.Optimizer]] = {
    "adam": lambda params, s, lr: torch.optim.Adam(params, lr=lr, betas=s.betas, weight_decay=s.weight_decay),
    "adamw": lambda params, s, lr: torch.optim.AdamW(params, lr=lr, betas=s.betas, weight_decay=s.weight_decay),
    "sgd": lambda params, s, lr: torch.optim.SGD(params, lr=lr, momentum=s.momentum, weight_decay=s.weight_decay),
}


def build_optimizer(params: Iterable, spec: OptimizerSpec, global_batch: int) -> torch.optim.Optimizer:
    return OPTIMIZERS[spec.name](params, spec, scaled_lr(spec, global_batch))


# Each schedule is a multiplier of the base lr as a function of the optimizer step.
def _constant(s: ScheduleSpec, total: int):
    return lambda step: min(1.0, (step + 1) / s.warmup_steps) if s.warmup_steps else 1.0


def _warmup_cosine(s: ScheduleSpec, total: int):
    def f(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def _cosine(s: ScheduleSpec, total: int):
    # CosineAnnealingLR over the whole run (T_max = total steps), as in seed 001.
    return lambda step: s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def _onecycle(s: ScheduleSpec, total: int):
    # Cosine ramp 1/25 -> 1 over pct_start, then cosine down to 1/(25*1e4): torch's OneCycleLR defaults.
    start, end = 1 / 25.0, 1 / 25.0 / 1e4
    peak_step = max(1, int(s.pct_start * total))

    def f(step: int) -> float:
        if step < peak_step:
            t = step / peak_step
            return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * t))
        t = min(1.0, (step - peak_step) / max(1, total - peak_step))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def _step(s: ScheduleSpec, total: int):
    return lambda step: s.gamma ** (step // s.step_size)


SCHEDULES: dict[str, Callable[[ScheduleSpec, int], Callable[[int], float]]] = {
    "constant": _constant,
    "warmup_cosine": _warmup_cosine,
    "cosine": _cosine,
    "onecycle": _onecycle,
    "step": _step,
}


def build_scheduler(optimizer: torch.optim.Optimizer, spec: ScheduleSpec, total_steps: int) -> LRScheduler:
    """A LambdaLR, so its state is plain numbers and resumes exactly."""
    return LambdaLR(optimizer, SCHEDULES[spec.name](spec, max(1, total_steps)))
