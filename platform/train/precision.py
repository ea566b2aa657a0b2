"""Mixed precision: autocast contexts and a dynamic loss scaler with a floor.

The floor matters: seed 002 saw "continuous gradient overflow and then
eventually loss scale going to zero"; a minimum scale (128 there) keeps the
run alive while overflowing steps are skipped.
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device_type: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[precision])


class DynamicLossScaler:
    """Scale the loss up so fp16 gradients do not underflow; back off on overflow.

    `unscale_and_check` divides gradients by the scale and says whether they
    are all finite; the caller skips the optimizer step when they are not.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, floor: float = 1.0,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5, growth_interval: int = 1000):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.floor = float(floor)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_(self, params) -> None:
        if self.enabled:
            inv = 1.0 / self.scale
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(inv)

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if finite:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= self.growth_factor
        else:
            self.good_steps = 0
            self.scale = max(self.floor, self.scale * self.backoff_factor)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
