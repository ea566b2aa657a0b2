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


#: the columns that hold one row per record, in the order a batch is counted by
ROW_COLUMNS = ("image", "latent")


def batch_rows(batch: dict[str, Any]) -> int:
    """How many records a batch holds: its "image" rows, or its "latent" rows
    for a latent dataset (raygen.data.latents)."""
    for name in ROW_COLUMNS:
        if name in batch:
            return int(batch[name].shape[0])
    raise KeyError(f"a batch needs one of the columns {ROW_COLUMNS}; it has {sorted(batch)}")


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


def total_grad_norm(params: list[torch.Tensor], partitioned: bool) -> torch.Tensor:
    """Global L2 norm of the gradients of `params` (float32 scalar). Partitioned
    (ZeRO): each rank holds a disjoint slice, so the squares are summed over ranks."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads).float() if grads else torch.zeros(())
    if partitioned and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sq = (norm.double() ** 2).reshape(1).to(collective_device())
        dist.all_reduce(sq)
        norm = sq.sqrt().reshape(()).float().to(norm.device)
    return norm


class Strategy:
    """Interface; see DDPStrategy for the reference behaviour.

    `setup` receives `before_update(params)`, which the strategy calls once
    per applied step, with the final gradients (reduced, unscaled) on the
    tensors the optimizer is about to update and before it does: the
    trainer's `on_before_optimizer_step` event. A skipped step calls it not."""
    name = "base"
    grad_accum = 1
    device = torch.device("cpu")
    #: False: the family is fitted without gradients (see NoGradStrategy)
    uses_gradients = True

    def setup(self, generator: Generator, make_optimizer: Callable, make_scheduler: Callable, *,
              before_update: Callable[[list], None] = lambda params: None) -> None: ...
    def forward(self, batch) -> dict[str, torch.Tensor]: ...
    def backward(self, loss: torch.Tensor, last_micro: bool) -> None: ...
    def skip_micro(self, last_micro: bool) -> None: ...
    def step(self, skip: bool) -> StepResult: ...
    def lr(self) -> float: ...

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Scale the gradients of `params` so their global norm is at most max_norm."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

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

    def setup(self, generator, make_optimizer, make_scheduler, *, before_update=lambda params: None):
        self.before_update = before_update
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

    def step(self, skip):
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
            # the norm is kept for clip_grad_norm_, valid while no hook changed a gradient in place
            self._norm_cache = (norm, grads, [g._version for g in grads])
            try:
                self.before_update(self.params)  # hooks: clipping
            finally:
                self._norm_cache = None
            self.optimizer.step()
        self.scheduler.step()
        scale = self.scaler.scale
        self.scaler.update(finite)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(finite, grad_norm, scale, lr)

    def clip_grad_norm_(self, params, max_norm):
        """torch's clip_grad_norm_, without computing the norm a second time
        when the gradients are still those step() measured (no clipping by
        value before, say): the same numbers, one pass over the gradients less."""
        cached = getattr(self, "_norm_cache", None)
        if cached is not None and params is self.params:
            norm, grads, versions = cached
            now = [p.grad for p in params if p.grad is not None]
            if len(now) == len(grads) and all(a is b and a._version == v for a, b, v in zip(now, grads, versions)):
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)  # what clip_grad_norm_ does next
                return norm
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

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
        with spec_hyperparameters_win(self.scheduler):
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


@contextlib.contextmanager
def spec_hyperparameters_win(scheduler):
    """Around loading an optimizer and its LambdaLR schedule from a checkpoint: the spec's
    hyperparameters (lr, betas, weight decay, momentum...) win over the checkpoint's, while its
    moments and the schedule's position are kept. A PBT exploit continues a donor's state with
    perturbed hyperparameters; for a plain resume they are equal. Under DeepSpeed too: the torch
    optimizer it drives is the schedule's, whatever wrapper (ZeRO, fp16) sits around it."""
    optimizer = scheduler.optimizer
    spec_groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                   for g in optimizer.param_groups]
    spec_base_lrs = list(scheduler.base_lrs)
    yield
    optimizer = scheduler.optimizer  # a loader may rebind it
    scheduler.base_lrs = spec_base_lrs
    for group, spec_group, base, factor in zip(optimizer.param_groups, spec_groups, spec_base_lrs,
                                               scheduler.lr_lambdas):
        group.update(spec_group, initial_lr=base, lr=base * factor(scheduler.last_epoch))
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


class NoGradStrategy(Strategy):
    """For families fitted without gradients (capability 'fit', not 'train'):
    no optimizer, no DDP wrapper, no DeepSpeed engine, whatever
    `scale.strategy` says.

    Per step every worker sums the `fit_statistics` of its micro-batches, the
    sums are all-reduced (summed) over workers, and every rank calls
    `apply_fit` with the same total, so all ranks hold the same state. The
    model's state_dict (parameters and buffers) is the whole fitted state:
    the trainer's model.safetensors holds it, so a resume is exact."""
    name = "no-grad"
    uses_gradients = False

    def __init__(self, *, grad_accum: int = 1, device: torch.device | None = None):
        self.grad_accum = grad_accum
        self.device = device or torch.device("cpu")

    def setup(self, generator, make_optimizer=None, make_scheduler=None, *, before_update=None):
        self._generator = generator.to(self.device)

    @property
    def generator(self):
        return self._generator

    @torch.no_grad()
    def statistics(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        stats = self._generator.fit_statistics(batch)
        if not isinstance(stats, dict) or not all(torch.is_tensor(v) for v in stats.values()):
            raise TypeError(f"{type(self._generator).__name__}.fit_statistics must return a dict of tensors")
        return stats

    @staticmethod
    def add(total: dict[str, torch.Tensor] | None, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if total is None:
            return {k: v.detach().clone() for k, v in stats.items()}
        if total.keys() != stats.keys():
            raise ValueError(f"fit_statistics returned keys {sorted(stats)} after {sorted(total)}: "
                             "every batch must give the same statistics")
        for k, v in stats.items():
            total[k] += v
        return total

    def all_reduce(self, total: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum the statistics over workers (sorted keys: every rank reduces in the same order)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return total
        out = {}
        for k in sorted(total):
            t = total[k].to(collective_device()).contiguous()
            dist.all_reduce(t)
            out[k] = t.to(total[k].device)
        return out

    @torch.no_grad()
    def apply(self, total: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        metrics = self._generator.apply_fit(total, step) or {}
        return {k: float(v) for k, v in metrics.items()}

    def lr(self):
        return 0.0

    def full_state_dict(self):
        return self._generator.state_dict()

    def save(self, folder, rank):
        pass  # the fitted state is the model's state_dict: the trainer writes it

    def load(self, folder, rank):
        pass
