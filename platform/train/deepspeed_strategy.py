"""DeepSpeed (ZeRO 0-3, optional offload) as a training Strategy.

DeepSpeed owns loss scaling, accumulation and the partitioning of gradients
and optimizer state here; the config is written from the spec and a user JSON
may be merged over it. Clipping is not DeepSpeed's: the step of the torch
optimizer DeepSpeed drives is wrapped, so the trainer's
`on_before_optimizer_step` fires there, with the final (reduced, unscaled)
gradients on the tensors about to be updated (under ZeRO, this rank's
partition), exactly once per applied step as under DDP; `GradClipHook` clips
by value and by global norm in that event under every strategy.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from raygen.spec.schema import JobSpec
from raygen.spec.errors import SpecError
from raygen.train.strategy import StepModule, StepResult, Strategy, total_grad_norm


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Keys the platform sets from the spec; a user file may not contradict them silently.
_OWNED = {"train_micro_batch_size_per_gpu": "data.batch_size", "gradient_accumulation_steps": "train.grad_accum"}
# Keys a user file may not set at all, with what to set instead.
_FORBIDDEN = {"gradient_clipping": "raygen clips in its own hook under every strategy: set train.clip.norm "
                                   "(and train.clip.value) in the spec instead"}


def build_deepspeed_config(spec: JobSpec, world_size: int) -> dict[str, Any]:
    scale, train = spec.scale, spec.train
    if train.precision == "fp16" and not scale.use_gpu:
        raise SpecError(["train.precision: fp16 with DeepSpeed needs a GPU (DeepSpeed's CPU accelerator has no fp16); "
                         "use bf16, or scale.strategy=ddp for fp16 with dynamic loss scaling on CPU"])
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.data.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": spec.data.batch_size * train.grad_accum * world_size,
        "gradient_clipping": 0.0,  # GradClipHook clips, in on_before_optimizer_step, as under DDP
        "steps_per_print": 10**9,  # the platform logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": scale.zero_stage},
        "zero_allow_untested_optimizer": True,
    }
    zero = config["zero_optimization"]
    if scale.zero_stage == 3:
        # one optimizer call per step (ZeRO-3 splits larger groups into sub-groups): one hook event per step
        zero["sub_group_size"] = 10**12
    if scale.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": scale.use_gpu}
        config["zero_force_ds_cpu_optimizer"] = False  # keep the spec's torch optimizer
    if scale.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": scale.use_gpu}
    if train.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": int(round(torch.log2(torch.tensor(train.initial_loss_scale)).item())),
                          "min_loss_scale": train.loss_scale_floor, "loss_scale_window": 1000, "hysteresis": 2}
    if scale.deepspeed_config:
        path = Path(scale.deepspeed_config)
        if not path.is_file():
            raise SpecError([f"scale.deepspeed_config: file not found: {path}"])
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SpecError([f"scale.deepspeed_config: {path} is not valid JSON ({err})"]) from None
        if not isinstance(user, dict):
            raise SpecError([f"scale.deepspeed_config: {path} must hold a JSON object"])
        for key, why in _FORBIDDEN.items():
            if key in user and user[key]:
                raise SpecError([f"scale.deepspeed_config: '{key}' = {user[key]}: {why}"])
        for key, field in _OWNED.items():
            if key in user and user[key] != config[key]:
                raise SpecError([f"scale.deepspeed_config: '{key}' = {user[key]} contradicts {field} "
                                 f"({config[key]}); set it in the spec instead"])
        user.pop("train_batch_size", None)
        config = _merge(config, user)
    return config


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def __init__(self, *, ds_config: dict[str, Any], grad_accum: int, device: torch.device | None = None):
        self.ds_config = ds_config
        self.grad_accum = grad_accum
        self.device = device or torch.device("cpu")

    def setup(self, generator, make_optimizer, make_scheduler, *, before_update=lambda params: None):
        import deepspeed

        self._generator = generator
        self.before_update = before_update
        module = StepModule(generator)
        params = [p for p in generator.parameters() if p.requires_grad]
        optimizer = make_optimizer(params)
        scheduler = make_scheduler(optimizer)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        self.precision_dtype = {True: torch.bfloat16}.get(self.ds_config.get("bf16", {}).get("enabled", False))
        self._bad_in_step = False
        self._model_params = {id(p) for p in generator.parameters()}
        self._wrap_update(optimizer)

    def _wrap_update(self, optimizer: torch.optim.Optimizer) -> None:
        """Fire the update event inside the step of the torch optimizer that
        DeepSpeed drives: by then DeepSpeed has reduced and unscaled the
        gradients (and skipped the call on an fp16 overflow)."""
        inner = optimizer.step

        @functools.wraps(inner)  # keeps the LR scheduler's marks on it
        def step(*args, **kwargs):
            self._update_calls += 1
            if self._update_calls > 1:
                raise RuntimeError("DeepSpeed split one optimizer step into several calls (several optimizer "
                                   "param groups); raygen's update hooks need a single param group")
            if self._bad_in_step:
                return None  # a skipped step: weights and optimizer state stay exactly as they are
            params = [p for group in optimizer.param_groups for p in group["params"]]
            # Under ZeRO (and DeepSpeed's bf16 optimizer) these are this rank's slice of the fp32 weights.
            self._partitioned = any(id(p) not in self._model_params for p in params)
            self._norm = float(total_grad_norm(params, self._partitioned))
            self.before_update(params)
            return inner(*args, **kwargs)

        optimizer.step = step
        self._update_calls, self._norm, self._partitioned = 0, None, False

    def clip_grad_norm_(self, params, max_norm):
        # the tensors handed to the hook are a partition: their norm is summed over ranks
        norm = total_grad_norm(params, self._partitioned)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        return norm

    @property
    def generator(self):
        return self._generator

    def _cast(self, batch):
        # DeepSpeed runs the model itself in bf16/fp16: inputs must match its dtype.
        dtype = self.precision_dtype or (torch.float16 if self.ds_config.get("fp16", {}).get("enabled") else None)
        if dtype is None:
            return batch
        return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}

    def forward(self, batch):
        return self.engine(self._cast(batch))

    def backward(self, loss, last_micro):
        self._micro(loss, last_micro)

    def skip_micro(self, last_micro):
        # Keep DeepSpeed's micro-step count in step with the other ranks: a zero
        # loss that still reaches every parameter gives exactly zero gradients.
        self._bad_in_step = True
        zero = sum((p * 0.0).sum() for p in self.engine.module.parameters() if p.requires_grad)
        self._micro(zero, last_micro)

    def _micro(self, loss, last_micro):
        if last_micro:
            self._applied_lr = self.lr()
            self._update_calls, self._norm = 0, None
        self.engine.backward(loss)
        # DeepSpeed applies the optimizer at the accumulation boundary only; a
        # skipped step (see skip_micro) returns from the wrapped optimizer step
        # without touching anything, and the schedule still advances, as under DDP.
        self.engine.step()

    def step(self, skip):
        # DeepSpeed already applied the update (hooks included) in backward().
        bad = skip or self._bad_in_step
        self._bad_in_step = False
        overflow = bool(getattr(self.engine.optimizer, "overflow", False))
        applied = not bad and not overflow and self._update_calls > 0
        scale = float(getattr(self.engine.optimizer, "cur_scale", getattr(self.engine.optimizer, "loss_scale", 1.0)) or 1.0)
        return StepResult(applied, self._norm if applied else None, scale, self._applied_lr)

    def lr(self):
        return float(self.engine.get_lr()[0])

    def full_state_dict(self):
        if self.ds_config["zero_optimization"]["stage"] == 3:
            import deepspeed
            params = list(self.engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().float().clone() for k, v in self._generator.state_dict().items()}
        return {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
                for k, v in self._generator.state_dict().items()}

    def save(self, folder, rank):
        # every rank writes its own optimizer partition
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state", save_latest=False)

    def load(self, folder, rank):
        from raygen.train.strategy import spec_hyperparameters_win
        with spec_hyperparameters_win(self.scheduler):  # a PBT exploit's perturbed lr, betas... (see there)
            path, _ = self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state",
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load its state from {folder / 'deepspeed'}")
