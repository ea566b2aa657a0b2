"""Hook events and clipping fire the same way under DDP and DeepSpeed, and a
gradient-free family ('fit') runs through the same loop, checkpoints and
resume. In plain torch: a one-process gloo group stands in for Ray Train's
(tests/test_engine_ray.py runs the same code on 2 Ray workers)."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from raygen.models.registry import build_model
from raygen.spec import parse_spec
from raygen.train.checkpoint import CheckpointManager, find_latest_checkpoint
from raygen.train.hooks import GradClipHook, Hook
from raygen.train.strategy import NoGradStrategy
from raygen.train.trainer import Trainer
from raygen.train.worker import make_hooks, make_strategy

from engine_toys import INFO, ListBatches, toy_images


@pytest.fixture(scope="module")
def process_group():
    """DeepSpeed needs a process group (and the launcher's variables); one process of world size 1, on loopback."""
    import os

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def spec_for(strategy: str, **train):
    return parse_spec({
        "model": {"family": "toy", "options": {"dropout": 0.0}}, "data": {"batch_size": 8},
        "train": {"steps": 6, "grad_accum": 2, "eval_every": 3, "checkpoint_every": 3, "log_every": 1,
                  "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.0}, "schedule": {"name": "constant"},
                  "clip": {"norm": 0.05, "value": 0.002}, "ema": {"enabled": False}, **train},
        "scale": {"workers": 1, "strategy": strategy, "zero_stage": 2},
        "track": {"fid": {"enabled": False}},
    })


class Recorder(Hook):
    """Every event, in order, with the step it belongs to (and the clip state of the gradients it saw)."""

    def __init__(self):
        self.events: list[tuple] = []

    def on_train_start(self, t):
        self.events.append(("train_start", t.state.step))

    def on_before_optimizer_step(self, t, params):
        grads = [p.grad for p in params if p.grad is not None]
        assert grads, "the update event fired without gradients"
        self.events.append(("before_optimizer_step", t.state.step + 1))

    def on_step_end(self, t, metrics):
        self.events.append(("step_end", t.state.step, metrics["step_applied"]))

    def on_eval(self, t, metrics):
        self.events.append(("eval", t.state.step))

    def on_checkpoint(self, t, folder):
        self.events.append(("checkpoint", t.state.step))

    def on_train_end(self, t):
        self.events.append(("train_end", t.state.step))


class ClipProbe(Hook):
    """Runs after GradClipHook: the largest gradient element and the global norm it left."""

    def __init__(self):
        self.seen: list[tuple[float, float]] = []

    def on_before_optimizer_step(self, t, params):
        grads = [p.grad for p in params if p.grad is not None]
        self.seen.append((max(float(g.abs().max()) for g in grads), float(torch.nn.utils.get_total_norm(grads))))


class NaNAt(ListBatches):
    """NaN images at the given micro-batch indices (counted over the run)."""

    def __init__(self, *a, bad=(), **kw):
        super().__init__(*a, **kw)
        self.bad, self.count = set(bad), 0

    def epoch(self, epoch, skip=0):
        for batch in super().epoch(epoch, skip):
            if self.count in self.bad:
                batch["image"] = batch["image"] * float("nan")
            self.count += 1
            yield batch


def run(spec, tmp_path, bad=()):
    recorder, probe = Recorder(), ClipProbe()
    hooks = [h for h in make_hooks(spec, sink=None, run_dir=tmp_path, progress=False) if isinstance(h, GradClipHook)]
    trainer = Trainer(spec=spec, data_info=INFO, make_generator=lambda: build_model("toy", spec.model.config, INFO),
                      strategy=make_strategy(spec, 1, torch.device("cpu")),
                      train_data=NaNAt(toy_images(64), 8, bad=bad), val_data=ListBatches(toy_images(16, 9), 8, shuffle=False),
                      hooks=[*hooks, probe, recorder], checkpoints=CheckpointManager(tmp_path / "checkpoints"))
    trainer.fit()
    return trainer, recorder.events, probe.seen


def test_events_and_clipping_are_the_same_under_ddp_and_deepspeed(process_group, tmp_path):
    # micro-batch 6 is NaN: step 4 (micro-batches 6 and 7) is skipped under both strategies
    ddp, ddp_events, ddp_clip = run(spec_for("ddp"), tmp_path / "ddp", bad={6})
    ds, ds_events, ds_clip = run(spec_for("deepspeed"), tmp_path / "ds", bad={6})
    assert type(ds.strategy).__name__ == "DeepSpeedStrategy"
    assert ddp_events == ds_events
    updates = [e[1] for e in ddp_events if e[0] == "before_optimizer_step"]
    assert updates == [1, 2, 3, 5, 6]  # once per applied step, none for the skipped one
    assert [e[2] for e in ddp_events if e[0] == "step_end"] == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    # GradClipHook ran in the event under both: every element within ±value, the norm within the max
    for largest, norm in ddp_clip + ds_clip:
        assert largest <= 0.002 + 1e-7 and norm <= 0.05 + 1e-6
    assert len(ds_clip) == 5
    # and the same update: clip by value, then by norm, then the same SGD step
    a, b = ddp.strategy.generator.state_dict(), ds.strategy.generator.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert ddp.step_losses == pytest.approx(ds.step_losses, abs=1e-6)
    assert ddp.last_metrics["grad_norm"] == pytest.approx(ds.last_metrics["grad_norm"], rel=1e-5)


def test_deepspeed_config_leaves_clipping_to_the_hook(tmp_path):
    from raygen.spec.errors import SpecError
    from raygen.train.deepspeed_strategy import build_deepspeed_config

    config = build_deepspeed_config(spec_for("deepspeed"), 2)  # clip.value is accepted now
    assert config["gradient_clipping"] == 0.0
    user = tmp_path / "ds.json"
    user.write_text('{"gradient_clipping": 1.0}')
    spec = spec_for("deepspeed")
    spec = spec.model_copy(update={"scale": spec.scale.model_copy(update={"deepspeed_config": str(user)})})
    with pytest.raises(SpecError, match="gradient_clipping.*train.clip.norm"):
        build_deepspeed_config(spec, 2)


# ---------------------------------------------------------------- fitting without gradients
def fit_spec(steps=6, keep=0.5, strategy="deepspeed"):
    return parse_spec({
        "model": {"family": "toy-means", "options": {"keep": keep}}, "data": {"batch_size": 8},
        "train": {"steps": steps, "grad_accum": 2, "eval_every": 3, "checkpoint_every": 100, "log_every": 1},
        "scale": {"workers": 1, "strategy": strategy},
        "track": {"fid": {"enabled": False}},
    })


def fit_trainer(spec, tmp_path, hooks=()):
    strategy = make_strategy(spec, 1, torch.device("cpu"))
    return Trainer(spec=spec, data_info=INFO, make_generator=lambda: build_model("toy-means", spec.model.config, INFO),
                   strategy=strategy, train_data=ListBatches(toy_images(48), 8),
                   val_data=ListBatches(toy_images(16, 9), 8, shuffle=False),
                   hooks=[*make_hooks(spec, sink=None, run_dir=tmp_path, progress=False), *hooks],
                   checkpoints=CheckpointManager(tmp_path / "checkpoints"))


def test_fit_family_gets_the_no_gradient_strategy_and_no_gradient_hooks(tmp_path):
    spec = fit_spec()  # scale.strategy says deepspeed: a family without 'train' ignores it
    assert isinstance(make_strategy(spec, 2, torch.device("cpu")), NoGradStrategy)
    kinds = {type(h).__name__ for h in make_hooks(spec, sink=None, run_dir=tmp_path, progress=True)}
    assert "EMAHook" not in kinds and "GradClipHook" not in kinds and "ProgressHook" in kinds


def test_fit_runs_through_the_loop_and_computes_the_statistics(tmp_path):
    spec = fit_spec(steps=3, keep=1.0)
    recorder = Recorder()
    trainer = fit_trainer(spec, tmp_path, hooks=[recorder])
    trainer.fit()
    # 3 steps × 2 micro-batches of 8 images, in the order ListBatches gives them (seed 0, epoch 0)
    images = toy_images(48)
    order = torch.randperm(48, generator=torch.Generator().manual_seed(0))[:48]
    seen = images[order]
    model = trainer.strategy.generator
    assert float(model.count.sum()) == 3 * 2 * 8 * 64
    assert model.mean.tolist() == pytest.approx([float(seen.double().mean())], abs=1e-6)
    assert not any(e[0] == "before_optimizer_step" for e in recorder.events)  # no optimizer, no update event
    assert [e[0] for e in recorder.events].count("step_end") == 3 and ("eval", 3) in recorder.events
    assert "fit_pixels" in trainer.last_metrics and trainer.last_metrics["step_applied"] == 1.0
    ckpt = find_latest_checkpoint(tmp_path)
    assert not (ckpt / "optimizer.pt").exists() and not (ckpt / "deepspeed").exists()
    saved = load_file(str(ckpt / "model.safetensors"))
    assert set(saved) == {"mean", "total", "count"} and torch.equal(saved["count"], model.count)


def test_fit_resume_is_exact(tmp_path):
    spec = fit_spec(steps=7)
    full = fit_trainer(spec, tmp_path / "full")
    full.fit()
    first = fit_trainer(spec, tmp_path / "split")
    first.fit(stop_after=4)  # mid-epoch (3 batches of 2 micro-batches per epoch)
    ckpt = find_latest_checkpoint(tmp_path / "split")
    assert ckpt.name == "step-00000004"
    second = fit_trainer(spec, tmp_path / "split")
    second.fit(resume_from=ckpt)
    assert second.start_step == 4
    assert first.step_losses + second.step_losses == full.step_losses
    a, b = full.strategy.generator.state_dict(), second.strategy.generator.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fit_skips_non_finite_statistics(tmp_path):
    spec = fit_spec(steps=4, keep=1.0)
    trainer = fit_trainer(spec, tmp_path)
    trainer.train_data = NaNAt(toy_images(48), 8, bad={2})  # step 2's first micro-batch
    trainer.fit()
    assert trainer.state.bad_steps == 1
    assert float(trainer.strategy.generator.count.sum()) == 3 * 2 * 8 * 64  # the bad step added nothing
    assert torch.isfinite(trainer.strategy.generator.mean).all()


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_resume_takes_the_specs_hyperparameters_and_the_checkpoints_moments(process_group, tmp_path,
                                                                                      stage):
    """A PBT exploit under DeepSpeed: the donor's moments and schedule position, the perturbed lr and betas."""
    def spec(lr, betas):
        base = spec_for("deepspeed", steps=4, grad_accum=1, eval_every=2, checkpoint_every=2, clip={"norm": None},
                        optimizer={"name": "adam", "lr": lr, "betas": betas})
        return base.model_copy(update={"scale": base.scale.model_copy(update={"zero_stage": stage})})

    def make(lr, betas, folder):
        s = spec(lr, betas)
        return Trainer(spec=s, data_info=INFO, make_generator=lambda: build_model("toy", s.model.config, INFO),
                       strategy=make_strategy(s, 1, torch.device("cpu")),
                       train_data=ListBatches(toy_images(64), 8), val_data=ListBatches(toy_images(16, 9), 8),
                       hooks=[], checkpoints=CheckpointManager(folder / "checkpoints"))

    donor = make(1e-2, (0.9, 0.99), tmp_path / "donor")
    donor.fit(stop_after=2)
    ckpt = find_latest_checkpoint(tmp_path / "donor")
    def moments(opt):  # ZeRO-2/3 key the state by their own flat fp32 partitions
        return [v["exp_avg"].clone() for v in opt.state.values() if "exp_avg" in v]

    donor_moments = moments(donor.strategy.scheduler.optimizer)
    clone = make(3e-3, (0.8, 0.95), tmp_path / "clone")
    clone.setup(ckpt)
    optimizer = clone.strategy.scheduler.optimizer  # the torch Adam DeepSpeed drives
    assert clone.strategy.lr() == pytest.approx(3e-3)
    assert all(g["lr"] == pytest.approx(3e-3) and tuple(g["betas"]) == (0.8, 0.95) for g in optimizer.param_groups)
    loaded = moments(optimizer)
    assert len(loaded) == len(donor_moments) > 0
    assert all(torch.equal(a, b) for a, b in zip(loaded, donor_moments))  # the donor's, not fresh zeros
