"""Cross-cutting training behaviour attached as callbacks on loop events.

Events, in order of a step: `on_train_start`, `on_before_optimizer_step`
(gradients final: reduced, unscaled; before the update), `on_step_end`,
`on_eval`, `on_checkpoint`, `on_train_end`. They fire the same way under
every strategy (DDP, DeepSpeed ZeRO 0-3): a skipped step (non-finite
gradients, an fp16 overflow) fires no `on_before_optimizer_step`. A
gradient-free family (capability 'fit') has no optimizer and fires no
`on_before_optimizer_step` at all.

Hooks read and write the trainer's public state; the loop itself knows
nothing of EMA, clipping, logging or grids.

State: a hook that must survive a resume returns it from `state_dict()`, a
flat dict whose values are tensors or plain JSON data. The checkpoint saves
it from rank 0 (tensors to `hooks/<state_key>.safetensors`, the rest to
`hooks/<state_key>.json`; no pickles) and, on a resume, hands it back to
`load_state_dict` on every rank, right after `on_train_start`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from raygen.train import console
from raygen.train.ema import EMA

if TYPE_CHECKING:
    from raygen.train.trainer import Trainer


class Hook:
    #: name of this hook's state files in a checkpoint; the class name unless set
    state_key: str = ""

    def on_train_start(self, trainer: "Trainer") -> None: ...
    def on_before_optimizer_step(self, trainer: "Trainer", params: list[torch.Tensor]) -> None: ...
    def on_step_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None: ...
    def on_eval(self, trainer: "Trainer", metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, trainer: "Trainer", folder: Path) -> None: ...
    def on_train_end(self, trainer: "Trainer") -> None: ...

    def state_dict(self) -> dict[str, Any] | None:
        """What a resume needs of this hook (tensors or plain JSON values); None: nothing."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called on resume, after `on_train_start`, with what `state_dict` returned."""

    @property
    def key(self) -> str:
        return self.state_key or type(self).__name__


class GradClipHook(Hook):
    """Clip by value, then by global norm (the loop logs the pre-clip norm).

    The same under every strategy: `params` are what the optimizer is about to
    update, and under ZeRO they are this rank's partition of the weights, so
    clipping by value is elementwise as ever and the global norm is the
    strategy's (`Strategy.clip_grad_norm_`: an all-reduce over partitions)."""

    def __init__(self, norm: float | None, value: float | None):
        self.norm, self.value = norm, value

    def on_before_optimizer_step(self, trainer, params):
        if self.value is not None:
            torch.nn.utils.clip_grad_value_(params, self.value)
        if self.norm is not None:
            if trainer is None:
                torch.nn.utils.clip_grad_norm_(params, self.norm)
            else:
                trainer.strategy.clip_grad_norm_(params, self.norm)


class EMAHook(Hook):
    """Keeps an EMA of the weights and provides them as the eval weights
    (eval, sample grids, FID and the export use them); checkpointed as hook state."""

    state_key = "ema"
    name = "ema"  # how the export records the weights it holds

    def __init__(self, decay: float, start_step: int):
        self.decay, self.start_step = decay, start_step
        self.ema: EMA | None = None

    def on_train_start(self, trainer):
        self.ema = EMA(trainer.strategy.generator, self.decay, self.start_step)
        trainer.set_eval_weights_provider(self)

    def on_step_end(self, trainer, metrics):
        if metrics.get("step_applied", 1.0):
            self.ema.update(trainer.strategy.generator, trainer.state.step)

    def eval_weights(self) -> dict[str, torch.Tensor]:
        return self.ema.state_dict()

    def state_dict(self):
        return dict(self.ema.state_dict()) if self.ema is not None else None

    def load_state_dict(self, state):
        missing = sorted(set(self.ema.shadow) - set(state))
        if missing:
            raise RuntimeError(f"the checkpoint's EMA weights lack {len(missing)} of the model's tensors "
                               f"(e.g. {missing[0]!r}): was it written by a different model config?")
        self.ema.load_state_dict(state)


class ProgressHook(Hook):
    """Progress from rank 0: a line every `every` steps (the log steps), and
    between them, at most every `bar_interval_s`, an update for the driver's
    progress bar when its console is a terminal (see raygen.train.console);
    one line per eval."""

    def __init__(self, every: int, total: int, enabled: bool = True, bar_interval_s: float = 0.5):
        self.every, self.total, self.enabled, self.bar_interval_s = every, total, enabled, bar_interval_s
        self.start = None
        self.last_sent = 0.0

    def on_train_start(self, trainer):
        self.start = time.perf_counter()

    def on_step_end(self, trainer, metrics):
        if not self.enabled or trainer.rank != 0:
            return
        step, now = trainer.state.step, time.perf_counter()
        log_step = step % self.every == 0 or step == self.total
        if not log_step and (not console.bar_wanted() or now - self.last_sent < self.bar_interval_s):
            return
        self.last_sent = now
        eta = (now - self.start) / max(1, step - trainer.start_step) * (self.total - step)
        fields = {"loss": metrics.get("loss"), "lr": metrics.get("lr")}
        fields.update({k: v for k, v in metrics.items() if k.startswith("fit_")})  # gradient-free families
        fields.update({"images_per_s": metrics.get("images_per_s", 0.0), "eta_s": eta})
        console.progress(step, self.total, fields, log=log_step)

    def on_eval(self, trainer, metrics):
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_"))
        if self.enabled and trainer.rank == 0 and shown:
            console.say(f"eval at step {trainer.state.step}: {shown}")


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

    def __init__(self, sink, out_dir: Path, n: int, data_dir: Path | None = None, data_spec=None):
        self.sink, self.out_dir, self.n = sink, Path(out_dir), n
        self.data_dir, self.data_spec = data_dir, data_spec
        self.val_records = None  # loaded once, for kinds whose grid needs real records (image, scene)

    def on_eval(self, trainer, metrics):
        if trainer.rank != 0:
            return
        from raygen.models import Capability, has
        from raygen.train.sampling import cycling_conditions, sample_grid_png
        model = trainer.eval_model()
        if not has(model, Capability.SAMPLE):  # families that make no images (scorers) draw no grid
            return
        path = self.out_dir / f"samples_step{trainer.state.step:08d}.png"
        if self.val_records is None and self.data_dir is not None and cycling_conditions(model, self.n) is None:
            from raygen.data import load_split_images
            self.val_records = load_split_images(self.data_dir, "val", self.data_spec, limit=self.n)
        sample_grid_png(model, self.n, path, seed=trainer.spec.train.seed, val_records=self.val_records)
        if self.sink is not None:
            self.sink.log_artifact(path, "samples")
