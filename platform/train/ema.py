"""Exponential moving average of weights, used for eval and sampling."""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, start_step: int = 0):
        self.decay = decay
        self.start_step = start_step
        # Buffers (e.g. batch-norm statistics) are copied, parameters averaged.
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # Before start_step the EMA tracks the weights exactly, so early noise is not averaged in.
        decay = self.decay if step >= self.start_step else 0.0
        params = dict(model.named_parameters())
        for key, value in model.state_dict().items():
            if key in params and value.is_floating_point():
                self.shadow[key].mul_(decay).add_(value.detach().float(), alpha=1 - decay)
            else:
                self.shadow[key].copy_(value.detach())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k] = v.detach().clone().float() if v.is_floating_point() else v.detach().clone()

    def copy_to(self, model: nn.Module) -> None:
        model_state = model.state_dict()
        model.load_state_dict({k: self.shadow[k].to(model_state[k].dtype) for k in model_state})
