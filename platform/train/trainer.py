"""The one training loop every model family runs under.

It knows the Generator protocol, a Strategy (how gradients are applied), a
batch source, hooks and a checkpoint manager; nothing of a model's internals
and nothing of Ray (the Ray worker in `raygen.train.worker` assembles it).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from raygen.models.base import DataInfo, Generator
from raygen.spec.schema import JobSpec
from raygen.train.checkpoint import (CheckpointManager, capture_rng, load_hook_state, load_torch, restore_rng,
                                     save_hook_state, save_torch)
from raygen.train.console import say
from raygen.train.hooks import Hook
from raygen.train.strategy import Strategy, all_ranks_true, barrier, batch_rows, batch_to_device, collective_device


class BatchSource(Protocol):
    corrupt_count: int
    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, Any]]: ...


class NonFiniteError(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0             # optimizer steps taken (skipped ones included)
    epoch: int = 0
    batch_in_epoch: int = 0   # micro-batches of `epoch` already consumed
    consecutive_bad: int = 0
    bad_steps: int = 0
    images_seen: int = 0
    last_good_checkpoint: str | None = None


def memory_per_worker(device: torch.device) -> dict[str, float]:
    """Current and peak resident memory of every worker (and peak GPU memory), gathered to all ranks."""
    from raygen.train.memory import memory_metrics
    return memory_metrics(device)


class EvalWeightsProvider(Protocol):
    """Supplies the weights eval, sample grids, FID and the export use instead
    of the raw training weights (EMAHook does)."""
    name: str
    def eval_weights(self) -> dict[str, torch.Tensor]: ...


#: per-step metrics a report carries to the driver and to Tune (beside the eval metrics)
REPORTED = ("loss", "lr", "fid", "fid_stderr", "kid", "fid_floor", "fid_samples", "fid_reference", "clip_score",
            "scene_psnr", "scene_ssim", "images_per_s")


def weights_norm(state: dict[str, torch.Tensor]) -> float:
    """L2 norm of all floating-point weights, in float64: a cheap fingerprint of a state dict."""
    total = sum(float(v.detach().double().pow(2).sum()) for v in state.values() if v.is_floating_point())
    return math.sqrt(total)


class Trainer:
    def __init__(self, *, spec: JobSpec, data_info: DataInfo, make_generator: Callable[[], Generator],
                 strategy: Strategy, train_data: BatchSource, val_data: BatchSource | None,
                 hooks: list[Hook], checkpoints: CheckpointManager | None,
                 report: Callable[[dict[str, float], Path | None], None] | None = None,
                 rank: int = 0, world_size: int = 1, run_meta: dict[str, Any] | None = None):
        self.spec = spec
        self.data_info = data_info
        self.make_generator = make_generator
        self.strategy = strategy
        self.train_data = train_data
        self.val_data = val_data
        self.hooks = hooks
        self.checkpoints = checkpoints
        self.report = report or (lambda metrics, ckpt: None)
        self.rank, self.world_size = rank, world_size
        self.run_meta = run_meta or {}
        self.state = TrainState()
        self.start_step = 0
        self.eval_weights_provider: EvalWeightsProvider | None = None  # set by a hook (EMAHook)
        self.last_metrics: dict[str, float] = {}
        self.step_losses: list[float] = []  # loss of every step run in this process (tests, exact resume)
        self._eval_cache: tuple[int, dict[str, torch.Tensor]] | None = None

    # ------------------------------------------------------------ set-up
    def _fire(self, event: str, *args) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def set_eval_weights_provider(self, provider: EvalWeightsProvider) -> None:
        current = self.eval_weights_provider
        if current is not None and current is not provider:
            raise RuntimeError(f"two hooks provide the eval weights ({current.name} and {provider.name}); keep one")
        self.eval_weights_provider = provider

    def setup(self, resume_from: Path | None) -> None:
        from raygen.train.optim import build_optimizer, build_scheduler

        keys = [h.key for h in self.hooks if type(h).state_dict is not Hook.state_dict]  # hooks that keep state
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:  # their state files would overwrite each other
            raise ValueError(f"two hooks share the state key {twice[0]!r}: give one a distinct `state_key`")
        torch.manual_seed(self.spec.train.seed + self.rank)
        generator = self.make_generator()
        if resume_from is not None:
            generator.load_state_dict(load_file(str(resume_from / "model.safetensors")))
        global_batch = self.spec.data.batch_size * self.spec.train.grad_accum * self.world_size
        self.strategy.setup(
            generator,
            lambda params: build_optimizer(params, self.spec.train.optimizer, global_batch),
            lambda opt: build_scheduler(opt, self.spec.train.schedule, self.spec.train.steps),
            before_update=lambda params: self._fire("on_before_optimizer_step", params))
        if resume_from is not None:
            self._restore(resume_from)

    def _restore(self, folder: Path) -> None:
        import json
        self.strategy.load(folder, self.rank)
        state = json.loads((folder / "state.json").read_text())
        self.state = TrainState(**state["train_state"])
        self.start_step = self.state.step
        rng_file = folder / f"rng-{self.rank}.pt"
        if state.get("world_size") == self.world_size and rng_file.is_file():
            restore_rng(load_torch(rng_file))
        elif self.rank == 0:
            say(f"resuming with {self.world_size} worker(s) instead of {state.get('world_size')}: "
                "random streams restart, so the run continues but is not bit-identical")

    def _restore_hooks(self, folder: Path) -> None:
        """Every hook's saved state, after on_train_start built the hooks' own state."""
        for hook in self.hooks:
            if hook.state_dict() is None:
                continue
            state = load_hook_state(folder, hook.key)
            if state is None:
                if self.rank == 0:
                    say(f"{folder.name} holds no state for hook {hook.key!r}: it starts afresh")
                continue
            hook.load_state_dict(state)

    # ------------------------------------------------------------ batches
    def _stream(self) -> Iterator[dict[str, Any]]:
        """Micro-batches across epochs, starting at the saved data position."""
        while True:
            produced = False
            for batch in self.train_data.epoch(self.state.epoch, skip=self.state.batch_in_epoch):
                produced = True
                self.state.batch_in_epoch += 1
                yield batch
            if not produced and self.state.batch_in_epoch == 0:
                raise RuntimeError("the training split yielded no batch: is data.batch_size larger than a worker's share of the data?")
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    # ------------------------------------------------------------ loop
    def fit(self, resume_from: Path | None = None, stop_after: int | None = None) -> dict[str, float]:
        """Train to `train.steps`; `stop_after` pauses the run at that step
        (with a checkpoint) so it can be resumed later."""
        from raygen.train.memory import reset_peak_rss
        reset_peak_rss()  # the run's own peak, not what this (possibly reused) process did before
        self.setup(resume_from)
        self._fire("on_train_start")
        if resume_from is not None:
            self._restore_hooks(resume_from)
            # the first report says where this process started (a Tune PBT exploit is checked against it)
            self._resumed = {"resumed_step": float(self.state.step),
                             "resumed_weights_norm": weights_norm(self.strategy.full_state_dict())}
        spec = self.spec.train
        stream = self._stream()
        one_step = self._gradient_step if self.strategy.uses_gradients else self._fit_step
        t_last = time.perf_counter()
        while self.state.step < spec.steps:
            t0 = time.perf_counter()
            metrics, applied, images = one_step(stream)
            self.state.step += 1
            self.state.images_seen += images * self.world_size
            if applied:
                self.state.consecutive_bad = 0
            else:
                self.state.consecutive_bad += 1
                self.state.bad_steps += 1
                if self.state.consecutive_bad >= self.spec.train.nan_guard.max_consecutive:
                    raise NonFiniteError(
                        f"stopped at step {self.state.step}: {self.state.consecutive_bad} non-finite steps in a row "
                        f"(loss or gradients were NaN/inf). Last good checkpoint: {self.state.last_good_checkpoint or 'none'}. "
                        "Lower train.optimizer.lr, set train.clip.norm, or use fp32/bf16."
                        if self.strategy.uses_gradients else
                        f"stopped at step {self.state.step}: {self.state.consecutive_bad} steps in a row gave non-finite "
                        f"fit statistics. Last good checkpoint: {self.state.last_good_checkpoint or 'none'}. "
                        "Check the data for NaN/inf values.")
            now = time.perf_counter()
            metrics.update({"step_applied": 1.0 if applied else 0.0, "bad_steps": float(self.state.bad_steps),
                            "step_time_s": now - t0,
                            "images_per_s": images * self.world_size / max(now - t_last, 1e-9),
                            "epoch": float(self.state.epoch),
                            "corrupt_records": float(getattr(self.train_data, "corrupt_count", 0))})
            if self.state.step % spec.log_every == 0 or self.state.step == spec.steps:  # a tiny all-gather
                metrics.update(memory_per_worker(self.strategy.device))
            t_last = now
            self.last_metrics = metrics
            self._fire("on_step_end", metrics)
            step = self.state.step
            evaluating = step % spec.eval_every == 0 or step == spec.steps
            eval_metrics = self.evaluate() if evaluating else {}
            pausing = stop_after is not None and step >= stop_after
            # No periodic checkpoint in the middle of a non-finite streak: the last good one stays the newest.
            periodic = step % spec.checkpoint_every == 0 and self.state.consecutive_bad == 0
            if periodic or step == spec.steps or pausing:
                folder = self.save_checkpoint({**metrics, **eval_metrics})
                self.report({**self._report_metrics(metrics), **eval_metrics}, folder)
            elif evaluating:
                self.report({**self._report_metrics(metrics), **eval_metrics}, None)
            if pausing:
                break
        if getattr(self, "_resumed", None) and resume_from is not None:
            # resumed at its last step (a PBT exploit of a donor's final checkpoint): no step ran, so
            # no report said where it started; one report does, with that checkpoint's metrics
            saved = json.loads((resume_from / "state.json").read_text()).get("metrics", {})
            self.report({**saved, **self._report_metrics({**saved, "lr": self.strategy.lr()})}, None)
        self._fire("on_train_end")
        return self.last_metrics

    def _gradient_step(self, stream: Iterator[dict[str, Any]]) -> tuple[dict[str, float], bool, int]:
        """Forward and backward over `grad_accum` micro-batches, then one optimizer step."""
        accum = self.strategy.grad_accum
        data_wait, loss_total, bad, extra, images = 0.0, 0.0, False, {}, 0
        for micro in range(accum):
            tw = time.perf_counter()
            batch = next(stream)
            data_wait += time.perf_counter() - tw
            images += batch_rows(batch)
            batch = batch_to_device(batch, self.strategy.device)
            out = self.strategy.forward(batch)
            loss = out["loss"]
            last = micro == accum - 1
            if all_ranks_true(bool(torch.isfinite(loss.detach()).all())):
                self.strategy.backward(loss, last)
                loss_total += float(loss.detach()) / accum
                for k, v in out.items():
                    if k != "loss":
                        extra[k] = extra.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / accum
            else:
                bad = True
                self.strategy.skip_micro(last)
        result = self.strategy.step(skip=bad)
        metrics = {"loss": loss_total if not bad else float("nan"), "lr": result.lr, "data_wait_s": data_wait,
                   "loss_scale": result.loss_scale, **{f"train_{k}": v for k, v in extra.items()}}
        if result.grad_norm is not None:
            metrics["grad_norm"] = result.grad_norm
        if not bad:
            self.step_losses.append(loss_total)
        return metrics, result.applied, images

    def _fit_step(self, stream: Iterator[dict[str, Any]]) -> tuple[dict[str, float], bool, int]:
        """Gradient-free: sum `fit_statistics` over micro-batches and workers,
        then every rank applies the same total (see NoGradStrategy)."""
        strategy = self.strategy
        data_wait, total, images = 0.0, None, 0
        for _ in range(strategy.grad_accum):
            tw = time.perf_counter()
            batch = next(stream)
            data_wait += time.perf_counter() - tw
            images += batch_rows(batch)
            total = strategy.add(total, strategy.statistics(batch_to_device(batch, strategy.device)))
        finite = all(bool(torch.isfinite(v).all()) for v in total.values() if v.is_floating_point())
        metrics: dict[str, float] = {"lr": 0.0, "data_wait_s": data_wait}
        if not all_ranks_true(finite):
            metrics["loss"] = float("nan")
            return metrics, False, images
        fitted = strategy.apply(strategy.all_reduce(total), self.state.step + 1)
        metrics.update({k if k == "loss" else f"fit_{k}": v for k, v in fitted.items()})
        if "loss" in fitted:
            self.step_losses.append(fitted["loss"])
        return metrics, True, images

    def _report_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        # the memory peaks reach the driver's final summary through the last report
        peaks = {k: v for k, v in metrics.items() if k.startswith(("mem_peak_rss_mb_rank", "gpu_mem_max_mb_rank"))}
        # and what hooks measured at this step (FID on its cadence), so a sweep can optimize it
        resumed, self._resumed = getattr(self, "_resumed", {}), {}
        return {"step": float(self.state.step), **{k: metrics[k] for k in REPORTED if k in metrics}, **peaks, **resumed}

    # ------------------------------------------------------------ eval
    def eval_weights(self) -> dict[str, torch.Tensor]:
        """The eval weights provider's (EMA) when there is one, else the full
        weights. Gathering sharded (ZeRO-3) weights is a collective, so it
        happens once per step on every rank and rank-0-only hooks reuse the result."""
        if self.eval_weights_provider is not None:
            return self.eval_weights_provider.eval_weights()
        if self._eval_cache is None or self._eval_cache[0] != self.state.step:
            self._eval_cache = (self.state.step, self.strategy.full_state_dict())
        return self._eval_cache[1]

    def eval_model(self) -> Generator:
        """A float32 copy of the generator holding the eval weights (EMA when kept)."""
        model = self.make_generator()
        state = self.eval_weights()
        own = model.state_dict()
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
        return model.eval()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        self.eval_weights()  # every rank takes part in gathering the weights, before any rank-0 hook needs them
        if self.val_data is not None and self.strategy.uses_gradients:  # validation loss needs a training_step
            from itertools import islice

            from raygen.train.validation import validation_metrics, validation_sums
            # on the training device: a float32 copy, so GPU runs do not validate on the CPU
            model = self.eval_model().to(self.strategy.device)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                # buffers (batch norm's running statistics) drift apart per rank after DDP's last
                # broadcast: every rank validates rank 0's, the model that is exported
                for buffer in model.buffers():
                    shared = buffer.to(collective_device())
                    dist.broadcast(shared, src=0)
                    buffer.copy_(shared)
            sums = validation_sums(model, islice(self.val_data.epoch(0), self.spec.train.val_batches))
            if dist.is_available() and dist.is_initialized():
                sums = sums.to(collective_device())
                dist.all_reduce(sums)
                sums = sums.cpu()
            metrics.update(validation_metrics(sums))
        self._fire("on_eval", metrics)
        return metrics

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, metrics: dict[str, float]) -> Path | None:
        if self.checkpoints is None:
            return None
        step = self.state.step
        if self._eval_cache is not None and self._eval_cache[0] == step:
            full = self._eval_cache[1]
        else:
            full = self.strategy.full_state_dict()  # a collective under ZeRO-3: every rank calls it
        if self.rank == 0:
            self.checkpoints.begin(step)
        barrier()
        tmp = self.checkpoints.temp_dir(step)
        self.strategy.save(tmp, self.rank)
        save_torch(capture_rng(), tmp / f"rng-{self.rank}.pt")
        barrier()
        final = None
        if self.rank == 0:
            from raygen.exports import export_generator
            save_file({k: v.detach().cpu().contiguous() for k, v in full.items()}, str(tmp / "model.safetensors"))
            for hook in self.hooks:
                hook_state = hook.state_dict()
                if hook_state is not None:
                    save_hook_state(tmp, hook.key, hook_state)
            provider = self.eval_weights_provider
            weights = provider.eval_weights() if provider is not None else full
            export_generator(tmp / "export", weights, self.spec, self.data_info,
                             {**self.run_meta, "step": step, "weights": provider.name if provider is not None else "raw"})
            self._fire("on_checkpoint", tmp)
            finite = {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}
            final = self.checkpoints.commit(step, {"train_state": asdict(self.state), "world_size": self.world_size,
                                                   "metrics": finite}, finite)
            self.state.last_good_checkpoint = str(final)
        barrier()
        return final
