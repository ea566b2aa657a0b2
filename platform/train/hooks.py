"""Cross-cutting training behaviour attached as callbacks on loop events.

Events, in order of a step: `on_train_start`, `on_before_optimizer_step`
(gradients final, before the update), `on_step_end`, `on_eval`,
`on_checkpoint`, `on_train_end`. Hooks read and write the trainer's public
state; the loop itself knows nothing of EMA, clipping, logging or grids.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from raygen.train.ema import EMA

if TYPE_CHECKING:
    from raygen.train.trainer import Trainer


class Hook:
    def on_train_start(self, trainer: "Trainer") -> None: ...
    def on_before_optimizer_step(self, trainer: "Trainer", params: list[torch.nn.Parameter]) -> None: ...
    def on_step_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None: ...
    def on_eval(self, trainer: "Trainer", metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, trainer: "Trainer", folder: Path) -> None: ...
    def on_train_end(self, trainer: "Trainer") -> None: ...
    def state_dict(self) -> dict[str, Any] | None:
        return None


class GradClipHook(Hook):
    """Clip by value, then by global norm (the loop logs the pre-clip norm).

    Under DeepSpeed, clipping by norm is done by the engine from the same
    setting, and this hook is never called."""

    def __init__(self, norm: float | None, value: float | None):
        self.norm, self.value = norm, value

    def on_before_optimizer_step(self, trainer, params):
        if self.value is not None:
            torch.nn.utils.clip_grad_value_(params, self.value)
        if self.norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.norm)


class EMAHook(Hook):
    """Keeps an EMA of the weights; eval and sampling use it (trainer.eval_weights)."""

    def __init__(self, decay: float, start_step: int):
        self.decay, self.start_step = decay, start_step
        self.ema: EMA | None = None

    def on_train_start(self, trainer):
        self.ema = EMA(trainer.strategy.generator, self.decay, self.start_step)
        if trainer.restored_ema is not None:
            self.ema.load_state_dict(trainer.restored_ema)
        trainer.ema = self.ema

    def on_step_end(self, trainer, metrics):
        if metrics.get("step_applied", 1.0):
            self.ema.update(trainer.strategy.generator, trainer.state.step)


class ProgressHook(Hook):
    """A progress line every `every` steps on rank 0 (also readable in Ray logs)."""

    def __init__(self, every: int, total: int, enabled: bool = True):
        self.every, self.total, self.enabled = every, total, enabled
        self.start = None

    def on_train_start(self, trainer):
        self.start = time.perf_counter()

    def on_step_end(self, trainer, metrics):
        step = trainer.state.step
        if not self.enabled or trainer.rank != 0 or (step % self.every and step != self.total):
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(1, step - trainer.start_step) * (self.total - step)
        print(f"[raygen] step {step}/{self.total} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
              f"img/s {metrics.get('images_per_s', 0):.0f} eta {eta:.0f}s", flush=True)

    def on_eval(self, trainer, metrics):
        if self.enabled and trainer.rank == 0:
            shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_"))
            print(f"[raygen] eval at step {trainer.state.step}: {shown}", flush=True)


class MetricsSinkHook(Hook):
    """Sends step metrics and eval metrics to a sink (MLflow on rank 0)."""

    def __init__(self, sink, every: int):
        self.sink, self.every = sink, every
        self.buffer: list[tuple[int, dict[str, float]]] = []

    def on_train_start(self, trainer):
        if trainer.rank == 0 and trainer.start_step > 0:
            # a resume (or a restart after a worker failure) leaves a mark in the run's history
            self.sink.log_metrics({"resumed_from_step": float(trainer.start_step)}, trainer.start_step)

    def on_step_end(self, trainer, metrics):
        if trainer.rank != 0:
            return
        self.buffer.append((trainer.state.step, dict(metrics)))
        if len(self.buffer) >= self.every:
            self.flush()

    def on_eval(self, trainer, metrics):
        if trainer.rank == 0:
            self.flush()
            self.sink.log_metrics(metrics, trainer.state.step)

    def on_train_end(self, trainer):
        if trainer.rank == 0:
            self.flush()

    def flush(self):
        if self.buffer:
            self.sink.log_step_metrics(self.buffer)
            self.buffer = []


class SampleGridHook(Hook):
    """At each eval, sample a grid with the eval weights and hand it to the sink."""

    def __init__(self, sink, out_dir: Path, n: int):
        self.sink, self.out_dir, self.n = sink, Path(out_dir), n

    def on_eval(self, trainer, metrics):
        if trainer.rank != 0:
            return
        from raygen.train.images import sample_grid_png
        model = trainer.eval_model()
        if getattr(model, "is_scorer", False):  # scorer families (clip) draw no images
            return
        path = self.out_dir / f"samples_step{trainer.state.step:08d}.png"
        sample_grid_png(model, self.n, path, seed=trainer.spec.train.seed)
        if self.sink is not None:
            self.sink.log_artifact(path, "samples")
