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
        names, values = [], []
        for name, p in model.named_parameters(remove_duplicate=False):  # tied weights: every name
            if p.is_floating_point():
                names.append(name)
                values.append(p.detach().float())
        # shadow <- decay * shadow + (1 - decay) * param, for all parameters in one fused call
        torch._foreach_lerp_([self.shadow[n] for n in names], values, 1.0 - decay)
        for name, buf in model.named_buffers(remove_duplicate=False):  # e.g. batch-norm statistics: copied, not averaged
            # non-persistent buffers (causal masks, rotary frequencies, ALiBi
            # slopes) are rebuilt by the model and are not in its state_dict
            if name in self.shadow:
                self.shadow[name].copy_(buf.detach())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k] = v.detach().clone().float() if v.is_floating_point() else v.detach().clone()

    def copy_to(self, model: nn.Module) -> None:
        model_state = model.state_dict()
        model.load_state_dict({k: self.shadow[k].to(model_state[k].dtype) for k in model_state})
