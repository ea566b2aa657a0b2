"""Training-engine properties, in plain torch (no Ray): accumulation, exact
resume, NaN/inf guard, clipping, schedules, loss scaling, checkpoints."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from raygen.models.registry import build_model
from raygen.spec import parse_spec
from raygen.train.checkpoint import CheckpointManager, find_latest_checkpoint, list_checkpoints
from raygen.train.hooks import EMAHook, GradClipHook, Hook
from raygen.train.optim import build_optimizer, build_scheduler, scaled_lr
from raygen.train.precision import DynamicLossScaler
from raygen.train.strategy import DDPStrategy
from raygen.train.trainer import NonFiniteError, Trainer

from engine_toys import INFO, ListBatches, toy_images


def make_spec(**train):
    base = {"model": {"family": "toy"}, "data": {"batch_size": 8},
            "train": {"steps": 6, "eval_every": 1000, "checkpoint_every": 1000, "log_every": 1,
                      "optimizer": {"name": "adam", "lr": 1e-2}, "schedule": {"name": "warmup_cosine", "warmup_steps": 2},
                      "ema": {"enabled": False}, "clip": {"norm": None}, **train}}
    return parse_spec(base)


def make_trainer(spec, data, tmp_path=None, hooks=None, accum=None):
    strategy = DDPStrategy(precision=spec.train.precision, grad_accum=accum or spec.train.grad_accum,
                           loss_scale_floor=spec.train.loss_scale_floor, initial_loss_scale=spec.train.initial_loss_scale)
    ckpts = CheckpointManager(tmp_path / "checkpoints", keep_last=2) if tmp_path else None
    return Trainer(spec=spec, data_info=INFO, make_generator=lambda: build_model("toy", spec.model.config, INFO),
                   strategy=strategy, train_data=data, val_data=ListBatches(toy_images(16, 9), 8, shuffle=False),
                   hooks=hooks or [], checkpoints=ckpts)


def test_accumulation_equals_large_batch():
    images = toy_images(64)
    big = make_spec(steps=2, grad_accum=1, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.0}, schedule={"name": "constant"})
    big = big.model_copy(update={"data": big.data.model_copy(update={"batch_size": 32})})
    big.model.options.update(noise=0.0, dropout=0.0)
    small = make_spec(steps=2, grad_accum=4, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.0}, schedule={"name": "constant"})
    cfg = big.model.config.model_copy(update={"noise": 0.0, "dropout": 0.0})
    make = lambda: build_model("toy", cfg, INFO)  # noqa: E731
    t_big = make_trainer(big, ListBatches(images, 32, shuffle=False))
    t_big.make_generator = make
    t_small = make_trainer(small, ListBatches(images, 8, shuffle=False), accum=4)
    t_small.make_generator = make
    t_big.fit()
    t_small.fit()
    for (k, a), b in zip(t_big.strategy.generator.state_dict().items(), t_small.strategy.generator.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    assert t_big.step_losses == pytest.approx(t_small.step_losses, abs=1e-6)


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    images = toy_images(48)
    spec = make_spec(steps=8, checkpoint_every=4, ema={"enabled": True, "decay": 0.9})
    full = make_trainer(spec, ListBatches(images, 8), tmp_path / "full", hooks=[EMAHook(0.9, 0)])
    full.fit()
    first = make_trainer(spec, ListBatches(images, 8), tmp_path / "split", hooks=[EMAHook(0.9, 0)])
    first.fit(stop_after=3)  # pauses with a checkpoint at step 3 (mid-epoch: 6 batches per epoch)
    ckpt = find_latest_checkpoint(tmp_path / "split")
    assert ckpt.name == "step-00000003"
    second = make_trainer(spec, ListBatches(images, 8), tmp_path / "split", hooks=[EMAHook(0.9, 0)])
    second.fit(resume_from=ckpt)
    assert second.start_step == 3
    assert first.step_losses + second.step_losses == full.step_losses  # bit-identical on CPU fp32
    for k, v in full.strategy.generator.state_dict().items():
        assert torch.equal(v, second.strategy.generator.state_dict()[k]), k
    ema_full, ema_second = full.eval_weights(), second.eval_weights()  # EMAHook provides the eval weights
    assert ema_full.keys() == ema_second.keys()
    for k, v in ema_full.items():
        assert torch.equal(v, ema_second[k]), k


def test_ema_state_is_hook_state_in_the_checkpoint(tmp_path):
    """EMA is a hook like any other: its state is saved generically (safetensors,
    no pickle) and the resumed EMA comes from the checkpoint, not from the
    resumed weights; a checkpoint of the old layout (ema.safetensors) loads too."""
    import shutil

    images = toy_images(48)
    spec = make_spec(steps=6, checkpoint_every=100, ema={"enabled": True, "decay": 0.9})
    full = make_trainer(spec, ListBatches(images, 8), tmp_path / "full", hooks=[EMAHook(0.9, 0)])
    full.fit()
    first = make_trainer(spec, ListBatches(images, 8), tmp_path / "split", hooks=[EMAHook(0.9, 0)])
    first.fit(stop_after=3)
    ckpt = find_latest_checkpoint(tmp_path / "split")
    assert (ckpt / "hooks" / "ema.safetensors").is_file() and not (ckpt / "ema.safetensors").exists()
    assert not list(ckpt.rglob("*.pkl"))
    saved = load_file(str(ckpt / "hooks" / "ema.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in first.eval_weights().items())

    def resume(folder):
        t = make_trainer(spec, ListBatches(images, 8), tmp_path / "resumed", hooks=[EMAHook(0.9, 0)])
        t.fit(resume_from=folder)
        return t.eval_weights()

    old_layout = tmp_path / "old" / ckpt.name
    shutil.copytree(ckpt, old_layout)
    (old_layout / "hooks" / "ema.safetensors").rename(old_layout / "ema.safetensors")
    no_state = tmp_path / "none" / ckpt.name
    shutil.copytree(ckpt, no_state)
    shutil.rmtree(no_state / "hooks")
    want = full.eval_weights()
    for folder in (ckpt, old_layout):
        got = resume(folder)
        assert all(torch.equal(want[k], got[k]) for k in want), folder
    # without its state the EMA restarts from the resumed weights: a different average
    fresh = resume(no_state)
    assert not all(torch.equal(want[k], fresh[k]) for k in want)


class CountingHook(Hook):
    """A hook with JSON and tensor state: how many steps it saw, and their losses."""
    state_key = "counter"

    def __init__(self):
        self.steps, self.losses = 0, torch.zeros(0)

    def on_step_end(self, trainer, metrics):
        self.steps += 1
        self.losses = torch.cat([self.losses, torch.tensor([metrics["loss"]])])

    def state_dict(self):
        return {"steps": self.steps, "losses": self.losses}

    def load_state_dict(self, state):
        self.steps, self.losses = state["steps"], state["losses"]


def test_every_hooks_state_is_checkpointed_and_restored(tmp_path):
    images = toy_images(48)
    spec = make_spec(steps=5, checkpoint_every=100)
    first = make_trainer(spec, ListBatches(images, 8), tmp_path, hooks=[CountingHook()])
    first.fit(stop_after=2)
    ckpt = find_latest_checkpoint(tmp_path)
    assert json.loads((ckpt / "hooks" / "counter.json").read_text()) == {"steps": 2}
    hook = CountingHook()
    make_trainer(spec, ListBatches(images, 8), tmp_path, hooks=[hook]).fit(resume_from=ckpt)
    assert hook.steps == 5 and hook.losses.shape == (5,)
    assert hook.losses[:2].tolist() == first.hooks[0].losses.tolist()
    with pytest.raises(ValueError, match="state key 'counter'"):
        make_trainer(spec, ListBatches(images, 8), hooks=[CountingHook(), CountingHook()]).fit()


class PoisonedBatches(ListBatches):
    """Yields NaN images at the given micro-batch indices (counted over the whole run)."""

    def __init__(self, *a, bad=(), **kw):
        super().__init__(*a, **kw)
        self.bad, self.count = set(bad), 0

    def epoch(self, epoch, skip=0):
        for batch in super().epoch(epoch, skip):
            if self.count in self.bad:
                batch["image"] = batch["image"] * float("nan")
            self.count += 1
            yield batch


def test_nan_step_is_skipped_and_counted():
    spec = make_spec(steps=4)
    trainer = make_trainer(spec, PoisonedBatches(toy_images(64), 8, bad={2}))
    snapshots = []

    class Snap(Hook):
        def on_step_end(self, t, metrics):
            snapshots.append({k: v.clone() for k, v in t.strategy.generator.state_dict().items()})
    trainer.hooks = [Snap()]
    trainer.fit()
    assert trainer.state.bad_steps == 1
    assert trainer.last_metrics["bad_steps"] == 1
    # the poisoned step (third) left the weights exactly as the second step did
    assert all(torch.equal(snapshots[1][k], snapshots[2][k]) for k in snapshots[1])
    assert all(torch.isfinite(v).all() for v in snapshots[-1].values())


def test_consecutive_nan_steps_stop_the_run_naming_step_and_checkpoint(tmp_path):
    spec = make_spec(steps=20, checkpoint_every=2, nan_guard={"max_consecutive": 3})
    trainer = make_trainer(spec, PoisonedBatches(toy_images(64), 8, bad=set(range(3, 100))), tmp_path)
    with pytest.raises(NonFiniteError) as err:
        trainer.fit()
    msg = str(err.value)
    assert "step 6" in msg and "3 non-finite steps in a row" in msg
    assert "step-00000002" in msg  # the last good checkpoint is named


def test_grad_clip_logs_preclip_norm_and_clips():
    spec = make_spec(steps=1, optimizer={"name": "sgd", "lr": 1.0, "momentum": 0.0}, schedule={"name": "constant"})
    trainer = make_trainer(spec, ListBatches(toy_images(64), 8), hooks=[GradClipHook(1e-3, None)])
    before = {k: v.clone() for k, v in build_model("toy", spec.model.config, INFO).state_dict().items()}
    torch.manual_seed(0)
    trainer.fit()
    norm = trainer.last_metrics["grad_norm"]
    assert norm > 1e-3  # pre-clip norm is logged
    after = trainer.strategy.generator.state_dict()
    # with lr 1 and SGD, the update is the clipped gradient: its norm is the clip value
    torch.manual_seed(0)
    start = build_model("toy", spec.model.config, INFO).state_dict()
    update = torch.sqrt(sum(((after[k] - start[k]) ** 2).sum() for k in start))
    assert update == pytest.approx(1e-3, rel=1e-3)
    assert before.keys() == after.keys()


def test_clip_by_value_bounds_each_gradient():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([5.0, -5.0, 0.1, -0.1])
    GradClipHook(None, 0.5).on_before_optimizer_step(None, [p])
    assert p.grad.tolist() == pytest.approx([0.5, -0.5, 0.1, -0.1])


def test_bf16_and_fp16_train_finite():
    for precision in ("bf16", "fp16"):
        spec = make_spec(steps=3, precision=precision)
        trainer = make_trainer(spec, ListBatches(toy_images(64), 8))
        trainer.fit()
        assert all(math.isfinite(x) for x in trainer.step_losses), precision
        assert trainer.last_metrics["loss_scale"] == (2.0**16 if precision == "fp16" else 1.0)


def test_loss_scaler_backs_off_to_floor_and_grows():
    s = DynamicLossScaler(True, init_scale=1024, floor=128, growth_interval=2)
    for _ in range(10):
        s.update(False)
    assert s.scale == 128  # never below the floor (seed 002's fix for collapsing scales)
    s.update(True)
    s.update(True)
    assert s.scale == 256


@pytest.mark.parametrize("name,checks", [
    ("constant", {0: 1.0, 50: 1.0}),
    ("warmup_cosine", {0: 0.1, 9: 1.0, 55: 0.5, 100: 0.0}),
    ("cosine", {0: 1.0, 50: 0.5, 100: 0.0}),
    ("step", {0: 1.0, 29: 1.0, 30: 0.5, 60: 0.25}),
])
def test_schedules(name, checks):
    spec = parse_spec({"model": {"family": "toy"}, "train": {"schedule": {"name": name, "warmup_steps": 10 if name == "warmup_cosine" else 0, "step_size": 30}}})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, spec.train.schedule, 100)
    lrs = []
    for _ in range(101):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for step, want in checks.items():
        assert lrs[step] == pytest.approx(want, abs=1e-6), (name, step)


def test_onecycle_peaks_at_pct_start():
    spec = parse_spec({"model": {"family": "toy"}, "train": {"schedule": {"name": "onecycle", "pct_start": 0.3}}})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, spec.train.schedule, 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(range(100), key=lambda i: lrs[i]) == 30
    assert lrs[0] == pytest.approx(0.04) and lrs[-1] < 1e-3


def test_lr_scaling_rule_and_optimizers():
    spec = parse_spec({"model": {"family": "toy"}, "train": {"optimizer": {"name": "sgd", "lr": 0.1, "base_batch": 32, "scale_lr_with_batch": "linear"}}})
    assert scaled_lr(spec.train.optimizer, 128) == pytest.approx(0.4)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], spec.train.optimizer, 128)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9


def test_logged_lr_follows_the_schedule():
    spec = make_spec(steps=4, schedule={"name": "warmup_cosine", "warmup_steps": 4})
    seen = []

    class Rec(Hook):
        def on_step_end(self, t, metrics):
            seen.append(metrics["lr"])
    make_trainer(spec, ListBatches(toy_images(64), 8), hooks=[Rec()]).fit()
    # the lr logged for a step is the one that step applied (warm-up over 4 steps)
    assert seen == pytest.approx([1e-2 * f for f in (0.25, 0.5, 0.75, 1.0)], abs=1e-9)


def test_checkpoint_is_atomic_and_pruned_keeping_best(tmp_path):
    spec = make_spec(steps=8, checkpoint_every=2, ema={"enabled": True})
    trainer = make_trainer(spec, ListBatches(toy_images(64), 8), tmp_path, hooks=[EMAHook(0.9, 0)])
    trainer.checkpoints.best_metric = "loss_for_best"
    scores = iter([0.5, 0.1, 0.7, 0.9])  # best at step 4
    original = trainer.checkpoints.commit
    trainer.checkpoints.commit = lambda step, state, metrics: original(step, state, {**metrics, "loss_for_best": next(scores)})
    trainer.fit()
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-00000004", "step-00000006", "step-00000008"]  # last 2 + best
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text())["step"] == 4
    # a save that crashed before its marker leaves nothing loadable
    trainer.checkpoints.begin(10)
    (trainer.checkpoints.temp_dir(10) / "model.safetensors").write_bytes(b"partial")
    assert find_latest_checkpoint(tmp_path).name == "step-00000008"
    latest = find_latest_checkpoint(tmp_path)
    for f in ("model.safetensors", "hooks/ema.safetensors", "optimizer.pt", "rng-0.pt", "state.json", "COMPLETE",
              "export/weights.safetensors"):
        assert (latest / f).is_file(), f
    assert set(load_file(str(latest / "export" / "weights.safetensors"))) == set(trainer.strategy.generator.state_dict())
    trainer.checkpoints.clean_stale()
    assert not trainer.checkpoints.temp_dir(10).exists()


def test_checkpoint_pickles_load_with_weights_only(tmp_path):
    spec = make_spec(steps=2, checkpoint_every=2)
    trainer = make_trainer(spec, ListBatches(toy_images(64), 8), tmp_path)
    trainer.fit()
    ckpt = find_latest_checkpoint(tmp_path)
    for f in ("optimizer.pt", "rng-0.pt"):
        torch.load(ckpt / f, weights_only=True)  # raises if anything but tensors and plain data is inside


def test_collectives_use_cuda_tensors_under_a_plain_nccl_group(monkeypatch):
    """Ray Train starts a plain NCCL group for GPU workers, and NCCL refuses CPU
    tensors ("No backend type associated with device type cpu", seen on an
    H200): the engine's own collectives must put their tensors on the GPU."""
    import torch.distributed as dist

    from raygen.train.strategy import collective_device

    assert collective_device() == torch.device("cpu")  # no group: stays on the CPU
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collective_device() == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    assert collective_device() == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert collective_device() == torch.device("cuda", 0)


def test_clip_by_norm_reuses_the_norm_the_step_measured(monkeypatch):
    """DDPStrategy measured the gradient norm already: clipping by norm alone does
    not compute it again; after clipping by value (gradients changed) it must."""
    calls = []
    original = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(1) or original(*a, **k))
    spec = make_spec(steps=2)
    make_trainer(spec, ListBatches(toy_images(64), 8), hooks=[GradClipHook(1e-3, None)]).fit()
    assert calls == []
    make_trainer(spec, ListBatches(toy_images(64), 8), hooks=[GradClipHook(1e-3, 1e-4)]).fit()
    assert len(calls) == 2


def test_reports_carry_the_fid_hooks_metrics_for_tune():
    """A sweep that optimizes FID sees it in the report of the step the FID hook measured it."""
    from types import SimpleNamespace

    from raygen.train.trainer import Trainer

    trainer = Trainer.__new__(Trainer)  # only the report's selection is under test
    trainer.state = SimpleNamespace(step=4)
    out = trainer._report_metrics({"loss": 1.0, "lr": 0.1, "fid": 3.0, "kid": 0.01, "data_wait_s": 0.2,
                                   "mem_peak_rss_mb_rank0": 100.0})
    assert out == {"step": 4.0, "loss": 1.0, "lr": 0.1, "fid": 3.0, "kid": 0.01, "mem_peak_rss_mb_rank0": 100.0}


def test_the_final_fid_reuses_what_the_fid_hook_measured_at_the_last_step(monkeypatch, tmp_path):
    """Same weights, seeds, conditions and extractor: the wrap-up does not sample and measure again."""
    from types import SimpleNamespace

    from raygen.spec import parse_spec
    from raygen.train import wrapup

    spec = parse_spec({"data": {"dataset": "digits", "resolution": 8}, "train": {"steps": 8},
                       "model": {"family": "seqimg", "options": {"dim": 32, "depth": 1}},
                       "track": {"fid": {"every": 4, "samples": 64}}})
    monkeypatch.setattr(wrapup, "dataset_extractor", lambda spec, data_dir: SimpleNamespace(name="domain:test"))
    last = {"step": 8.0, "fid": 3.0, "kid": 0.01, "fid_floor": 0.5, "fid_samples": 64.0, "fid_reference": 64.0}
    assert wrapup.hook_fid(spec, last, tmp_path) == {"fid": 3.0, "kid": 0.01, "fid_floor": 0.5, "n_generated": 64,
                                                     "n_reference": 64, "extractor": "domain:test"}
    assert wrapup.hook_fid(spec, {**last, "step": 4.0}, tmp_path) is None  # measured before the end
    assert wrapup.hook_fid(spec, {"step": 8.0, "loss": 1.0}, tmp_path) is None  # never measured
