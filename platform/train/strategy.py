"""How gradients are computed and applied: local/DDP or DeepSpeed.

The training loop talks to a Strategy only; wrapping for distribution lives
here, applied from outside the model. A `StepModule` turns the family's
`training_step` into `forward`, so DDP's and DeepSpeed's gradient hooks see it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from raygen.models.base import Generator
from raygen.train.precision import DynamicLossScaler, autocast


class StepModule(nn.Module):
    def __init__(self, generator: Generator):
        super().__init__()
        self.generator = generator

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.generator.training_step(batch)


@dataclass
class StepResult:
    applied: bool          # False: the optimizer step was skipped (overflow / non-finite)
    grad_norm: float | None  # global gradient norm before clipping
    loss_scale: float
    lr: float = 0.0            # the learning rate this step applied


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where a tensor handed to a collective must live. A plain NCCL process
    group (what Ray Train starts for GPU workers) moves CUDA tensors only; gloo
    and mixed "cpu:gloo,cuda:nccl" groups take CPU tensors."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch with its tensors moved to `device` (captions and other lists stay)."""
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def all_ranks_true(flag: bool) -> bool:
    """True only when `flag` holds on every rank (one tiny all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=collective_device())
    dist.all_reduce(t)
    return t.item() == 0.0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Strategy:
    """Interface; see DDPStrategy for the reference behaviour."""
    name = "base"
    grad_accum = 1
    device = torch.device("cpu")

    def setup(self, generator: Generator, make_optimizer: Callable, make_scheduler: Callable) -> None: ...
    def forward(self, batch) -> dict[str, torch.Tensor]: ...
    def backward(self, loss: torch.Tensor, last_micro: bool) -> None: ...
    def skip_micro(self, last_micro: bool) -> None: ...
    def step(self, before_update: Callable[[list], None], skip: bool) -> StepResult: ...

    def step_with_hooks(self, trainer, skip: bool) -> StepResult:
        return self.step(lambda params: trainer._fire("on_before_optimizer_step", params), skip)
    def lr(self) -> float: ...
    @property
    def generator(self) -> Generator: ...
    def full_state_dict(self) -> dict[str, torch.Tensor]: ...
    def save(self, folder: Path, rank: int) -> None: ...
    def load(self, folder: Path, rank: int) -> None: ...


class DDPStrategy(Strategy):
    """Plain PyTorch: DistributedDataParallel when a process group exists."""
    name = "ddp"

    def __init__(self, *, precision: str, grad_accum: int, loss_scale_floor: float, initial_loss_scale: float,
                 device: torch.device | None = None):
        self.precision = precision
        self.grad_accum = grad_accum
        self.device = device or torch.device("cpu")
        self.scaler = DynamicLossScaler(precision == "fp16", initial_loss_scale, loss_scale_floor)

    def setup(self, generator, make_optimizer, make_scheduler):
        self._generator = generator.to(self.device)
        module = StepModule(self._generator)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.module = module
        self.params = [p for p in self._generator.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params)
        self.scheduler = make_scheduler(self.optimizer)

    @property
    def generator(self):
        return self._generator

    def forward(self, batch):
        with autocast(self.precision, self.device.type):
            return self.module(batch)

    def backward(self, loss, last_micro):
        # Average over micro-batches so accumulation equals one large batch.
        scaled = self.scaler.scale_loss(loss.float() / self.grad_accum)
        sync = last_micro or not isinstance(self.module, nn.parallel.DistributedDataParallel)
        ctx = contextlib.nullcontext() if sync else self.module.no_sync()
        with ctx:
            scaled.backward()

    def skip_micro(self, last_micro):
        pass  # nothing accumulated for this micro-batch; grads are zeroed in step()

    def step(self, before_update, skip):
        lr = self.lr()
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()  # the schedule follows loop steps, skipped or not
            return StepResult(False, None, self.scaler.scale, lr)
        self.scaler.unscale_(self.params)
        # One pass over the gradients: a NaN/inf anywhere makes the norm non-finite.
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        finite = all_ranks_true(bool(torch.isfinite(norm)))
        grad_norm = float(norm) if finite else None
        if finite:
            before_update(self.params)  # hooks: clipping
            self.optimizer.step()
        self.scheduler.step()
        scale = self.scaler.scale
        self.scaler.update(finite)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(finite, grad_norm, scale, lr)

    def lr(self):
        return float(self.optimizer.param_groups[0]["lr"])

    def full_state_dict(self):
        return self._generator.state_dict()

    def save(self, folder, rank):
        if rank == 0:
            from raygen.train.checkpoint import save_torch
            save_torch({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict()}, folder / "optimizer.pt")

    def load(self, folder, rank):
        from raygen.train.checkpoint import load_torch
        state = load_torch(folder / "optimizer.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
