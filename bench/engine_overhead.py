"""Per-step overhead of raygen's training engine against a plain PyTorch loop.

Both loops train the same seqimg model (same seed, so the same initial
weights) on the same fixed in-memory batches, with the same work per step:

    plain   model.training_step(batch)["loss"], backward, clip_grad_norm_(1.0),
            AdamW step, zero_grad, an EMA update (decay 0.99) written by hand,
            a warmup-cosine LambdaLR step
    engine  raygen.train.trainer.Trainer + DDPStrategy(fp32, grad_accum 1)
            with GradClipHook(1.0) and EMAHook(0.99); the optimizer and the
            schedule come from the job spec (raygen.spec.parse_spec)

The engine runs without checkpoints (checkpoints=None) and with eval_every /
checkpoint_every beyond the last step, so the cost of eval and checkpoints is
excluded: what is timed is the per-step loop. The two loops advance in
lockstep inside one run: a hook fired after the engine's others runs the plain
loop for a block of `--steps` steps after every block of `--steps` engine
steps (after `--warmup` untimed steps of each), so both see the same load on
a shared machine. An engine block is timed from the end of the plain block
before it to its last `on_step_end`, so it holds all the engine does per step.
The table shows medians over blocks and the median of the per-block (paired)
overhead and ratio; both loops produce the same losses and EMA weights, which
is checked and printed.

When an overhead exceeds 5% (or with `--breakdown`) the pair is timed again
with the hooks removed on both sides (no clipping, no EMA); the engine-only
pieces of a step (and two cheaper replacements) are always timed alone. Their
sum can fall short of the measured overhead: large per-step temporaries also
make glibc's allocator hand fresh pages to later allocations, and the extra
minor page faults land in the next forward/backward (the faults are printed).

    .venv/bin/python bench/engine_overhead.py                  # 1 thread, both configs
    .venv/bin/python bench/engine_overhead.py --threads 2 --steps 20 --repeats 21 --breakdown
    .venv/bin/python bench/engine_overhead.py --smoke          # seconds: that it runs (CI), not a figure

The last line printed is the headline: the engine / plain wall-clock ratio
per config (1.00 = no overhead).
"""
from __future__ import annotations

import argparse
import math
import resource
import statistics
import time

import torch

from raygen.models.base import DataInfo
from raygen.models.registry import build_model
from raygen.spec import parse_spec
from raygen.train import trainer as trainer_module
from raygen.train.ema import EMA
from raygen.train.hooks import EMAHook, GradClipHook, Hook
from raygen.train.strategy import DDPStrategy, all_ranks_true
from raygen.train.trainer import Trainer

QUICKSTART = dict(backbone="gpt2", patch_mode="rowwise", pos_embedding="learned", conditioning="label",
                  head="categorical", dim=96, depth=3, heads=4)
CONFIGS = {
    "quickstart d96 L3": QUICKSTART,
    "small d32 L1": {**QUICKSTART, "dim": 32, "depth": 1},
}
INFO = DataInfo(channels=1, resolution=16, num_classes=10)
OPTIMIZER = {"name": "adamw", "lr": 2.0e-3, "weight_decay": 0.01}
SCHEDULE = {"name": "warmup_cosine", "warmup_steps": 30, "min_lr_ratio": 0.05}
CLIP, DECAY, SEED = 1.0, 0.99, 0
NEVER = 10**9  # eval_every / checkpoint_every: never inside the timed steps


# ---------------------------------------------------------------- data
def make_batches(n_batches: int, batch_size: int, seed: int = 1234) -> list[dict[str, torch.Tensor]]:
    """Fixed random images in [0, 1] quantized to /255, with labels; shared by both loops."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        images = torch.randint(0, 256, (batch_size, INFO.channels, INFO.resolution, INFO.resolution), generator=g)
        out.append({"image": images.float() / 255.0,
                    "label": torch.randint(0, INFO.num_classes, (batch_size,), generator=g)})
    return out


class FixedBatches:
    """The engine's batch source: the same prebuilt batches, in order, every epoch
    (no copy, no shuffle, so the data path costs the same as the plain loop's)."""

    def __init__(self, batches):
        self.batches, self.corrupt_count = batches, 0

    def epoch(self, epoch: int, skip: int = 0):
        yield from self.batches[skip:]


def make_spec(options: dict, steps: int, batch_size: int):
    return parse_spec({
        "name": "engine-overhead",
        "data": {"resolution": INFO.resolution, "channels": INFO.channels, "batch_size": batch_size},
        "model": {"family": "seqimg", "options": options},
        "train": {"steps": steps, "precision": "fp32", "grad_accum": 1, "seed": SEED,
                  "optimizer": OPTIMIZER, "schedule": SCHEDULE, "clip": {"norm": CLIP}, "ema": {"decay": DECAY},
                  "eval_every": NEVER, "checkpoint_every": NEVER},
    })


# ---------------------------------------------------------------- the two loops
class PlainLoop:
    """The plain PyTorch loop, advanced `n` steps at a time by `run(n)`."""

    def __init__(self, spec, batches, hooks: bool = True):
        torch.manual_seed(spec.train.seed)  # as Trainer.setup does: the same initial weights
        self.model = build_model("seqimg", spec.model.config, INFO)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o, s, total = spec.train.optimizer, spec.train.schedule, spec.train.steps
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)

        def warmup_cosine(step: int) -> float:
            if step < s.warmup_steps:
                return (step + 1) / s.warmup_steps
            progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
            return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine)
        self.ema = [p.detach().clone() for p in self.params]
        self.batches, self.hooks = batches, hooks
        self.losses: list[float] = []

    def run(self, n: int) -> None:
        model, params, opt, sched, ema = self.model, self.params, self.opt, self.sched, self.ema
        for _ in range(n):
            loss = model.training_step(self.batches[len(self.losses) % len(self.batches)])["loss"]
            loss.backward()
            if self.hooks:
                torch.nn.utils.clip_grad_norm_(params, CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if self.hooks:
                with torch.no_grad():
                    for e, p in zip(ema, params):
                        e.mul_(DECAY).add_(p.detach(), alpha=1 - DECAY)
            sched.step()
            self.losses.append(float(loss.detach()))

    def ema_state(self) -> dict[str, torch.Tensor]:
        names = [k for k, p in self.model.named_parameters() if p.requires_grad]
        return dict(zip(names, self.ema))


class Lockstep(Hook):
    """Fired last on every engine step: after `warmup` steps of each loop, times
    blocks of `block` engine steps and `block` plain steps, alternately, so both
    see the same machine load. An engine block runs from the end of the plain
    block before it to the `on_step_end` of its last step: everything the
    engine does per step (its other hooks included) lies inside it."""

    def __init__(self, plain: PlainLoop, warmup: int, block: int):
        self.plain, self.warmup, self.block = plain, warmup, block
        # per block, per step: wall-clock seconds, this process's CPU seconds, minor page faults
        self.engine_s: dict[str, list[float]] = {"wall": [], "cpu": [], "faults": []}
        self.plain_s: dict[str, list[float]] = {"wall": [], "cpu": [], "faults": []}
        self.mark = (0.0, 0.0, 0)

    @staticmethod
    def _now() -> tuple[float, float, int]:
        return time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def _add(self, into: dict[str, list[float]], start: tuple, end: tuple) -> None:
        for i, kind in enumerate(("wall", "cpu", "faults")):
            into[kind].append((end[i] - start[i]) / self.block)

    def on_step_end(self, trainer, metrics):
        now = self._now()
        done = trainer.state.step - self.warmup
        if done < 0 or done % self.block:
            return
        if done > 0:
            self._add(self.engine_s, self.mark, now)
            start = self._now()
            self.plain.run(self.block)
            self._add(self.plain_s, start, self._now())
        else:
            self.plain.run(self.warmup)  # untimed
        self.mark = self._now()


def run_pair(spec, batches, warmup: int, block: int, hooks: bool) -> tuple[Lockstep, Trainer]:
    plain = PlainLoop(spec, batches, hooks)
    t = spec.train
    strategy = DDPStrategy(precision=t.precision, grad_accum=t.grad_accum,
                           loss_scale_floor=t.loss_scale_floor, initial_loss_scale=t.initial_loss_scale)
    clock = Lockstep(plain, warmup, block)
    extra = [GradClipHook(t.clip.norm, None), EMAHook(t.ema.decay, 0)] if hooks else []
    trainer = Trainer(spec=spec, data_info=INFO, make_generator=lambda: build_model("seqimg", spec.model.config, INFO),
                      strategy=strategy, train_data=FixedBatches(batches), val_data=None,
                      hooks=[*extra, clock], checkpoints=None)
    trainer.fit()
    return clock, trainer


# ---------------------------------------------------------------- breakdown of engine-only pieces
def _time_us(fn, n: int, repeats: int = 7) -> float:
    fn()
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best.append((time.perf_counter() - t0) / n)
    return statistics.median(best) * 1e6


def piece_costs(spec, batches, n: int = 200) -> list[tuple[str, float, float | None]]:
    """(piece, engine µs per step, plain-loop equivalent µs per step) on a model with gradients."""
    torch.manual_seed(spec.train.seed)
    model = build_model("seqimg", spec.model.config, INFO)
    params = [p for p in model.parameters() if p.requires_grad]
    out = model.training_step(batches[0])
    out["loss"].backward()
    loss = out["loss"].detach()
    ema = EMA(model, DECAY, 0)
    hand = [p.detach().clone() for p in params]

    def hand_ema():
        with torch.no_grad():
            for e, p in zip(hand, params):
                e.mul_(DECAY).add_(p.detach(), alpha=1 - DECAY)

    def grad_norm_and_finite():  # what DDPStrategy.step does before the update: one fused norm, finite iff it is
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        return all_ranks_true(bool(torch.isfinite(norm))), float(norm)

    def grad_norm_only():  # the plain loop's equivalent: the norm clip_grad_norm_ computes inside
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])

    measured = grad_norm_only()

    def loss_checks():
        all_ranks_true(bool(torch.isfinite(loss).all()))
        float(loss)
        for k, v in out.items():
            if k != "loss":
                float(v.detach() if torch.is_tensor(v) else v)

    def metrics_dict():
        now = time.perf_counter()
        return {"loss": 1.0, "lr": 1e-3, "step_applied": 1.0, "bad_steps": 0.0, "step_time_s": now,
                "data_wait_s": 0.0, "images_per_s": 32 / max(now, 1e-9), "loss_scale": 1.0, "epoch": 0.0,
                "corrupt_records": 0.0, **{f"train_{k}": 0.0 for k in out if k != "loss"}}

    # The memory figure: every log_every steps (memory_per_worker) in the current trainer, every step before.
    if hasattr(trainer_module, "memory_per_worker"):
        every = spec.train.log_every
        memory = (f"memory_per_worker every {every} steps, per step (trainer)",
                  _time_us(lambda: trainer_module.memory_per_worker(torch.device("cpu")), max(1, n // 10)) / every)
    else:
        memory = ("_rss_mb every step (trainer)", _time_us(trainer_module._rss_mb, n))

    # max_norm so large that clip_grad_norm_ leaves the gradients as they are
    clip = _time_us(lambda: torch.nn.utils.clip_grad_norm_(params, 1e30), n)
    return [
        ("grad norm + finite check (strategy) vs the norm in clip_grad_norm_",
         _time_us(grad_norm_and_finite, n), _time_us(grad_norm_only, n)),
        ("loss isfinite + float() of loss and metrics (trainer)", _time_us(loss_checks, n), 0.0),
        ("metrics dict (trainer)", _time_us(metrics_dict, n), 0.0),
        (*memory, 0.0),
        ("EMA update: EMA.update (foreach lerp) vs by hand", _time_us(lambda: ema.update(model, 1), n), _time_us(hand_ema, n)),
        ("clipping: clip_grads_with_norm_ with the step's norm vs clip_grad_norm_",
         _time_us(lambda: torch.nn.utils.clip_grads_with_norm_(params, 1e30, measured), n), clip),
    ]


# ---------------------------------------------------------------- driver
def _median_ci(values: list[float]) -> tuple[float, float]:
    """About 95% confidence interval of a median: median -+ 1.58 IQR / sqrt(n) (boxplot notches)."""
    med = statistics.median(values)
    if len(values) < 2:
        return med, med
    q1, _, q3 = statistics.quantiles(values, n=4)
    half = 1.58 * (q3 - q1) / math.sqrt(len(values))
    return med - half, med + half


def measure(options: dict, batches, warmup: int, block: int, repeats: int, batch_size: int, hooks: bool) -> dict:
    spec = make_spec(options, warmup + block * repeats, batch_size)
    clock, trainer = run_pair(spec, batches, warmup, block, hooks)
    # Same work: the same loss at every step, and the same EMA weights at the end.
    lp, le = clock.plain.losses, trainer.step_losses
    assert len(lp) == len(le) == spec.train.steps, (len(lp), len(le))
    out = {"loss_diff": max(abs(a - b) for a, b in zip(lp, le)), "ema_diff": 0.0, "steps": spec.train.steps}
    if hooks:
        mine, theirs = clock.plain.ema_state(), trainer.eval_weights()  # EMAHook provides the eval weights
        out["ema_diff"] = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    out["faults"] = (statistics.median(clock.plain_s["faults"]), statistics.median(clock.engine_s["faults"]))
    for kind in ("wall", "cpu"):
        plain, engine = clock.plain_s[kind], clock.engine_s[kind]
        diffs = [e - p for p, e in zip(plain, engine)]
        out[kind] = {"plain": statistics.median(plain), "engine": statistics.median(engine),
                     "over": statistics.median(diffs), "ratio": statistics.median(e / p for p, e in zip(plain, engine)),
                     "ci": _median_ci(diffs)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed block of each loop")
    ap.add_argument("--repeats", type=int, default=31, help="timed blocks of each loop, interleaved; medians are shown")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps of each loop first")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the pair with hooks removed even when the overhead is under 5%%")
    ap.add_argument("--smoke", action="store_true",
                    help="a few steps of the small config: checks that the benchmark runs (CI), in seconds")
    args = ap.parse_args(argv)
    if args.smoke:
        args.configs, args.steps, args.repeats, args.warmup, args.batch_size = ["small d32 L1"], 2, 3, 2, 8
    if min(args.warmup, args.steps, args.repeats) < 1:
        ap.error("--warmup, --steps and --repeats must be at least 1")
    torch.set_num_threads(args.threads)
    batches = make_batches(8, args.batch_size)

    def pair(name: str, hooks: bool) -> dict:
        return measure(CONFIGS[name], batches, args.warmup, args.steps, args.repeats, args.batch_size, hooks)

    print(f"engine overhead: seqimg 16x16x1, batch {args.batch_size}, fp32 CPU, {torch.get_num_threads()} thread(s); "
          f"{args.repeats} blocks of {args.steps} steps per loop, interleaved, after {args.warmup} warm-up steps; "
          "medians over blocks")
    print("engine: Trainer + DDPStrategy(fp32) + GradClipHook(1.0) + EMAHook(0.99), no checkpoints, eval/checkpoint "
          "intervals beyond the last step: eval and checkpoint cost excluded")
    results = {name: pair(name, True) for name in args.configs}

    head = (f"{'config':<18} {'clock':<5} {'plain ms/step':>13} {'engine ms/step':>14} {'overhead ms/step':>16}"
            f" {'ratio':>6}  {'overhead ~95% CI':>17}")
    print()
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        for kind in ("wall", "cpu"):
            c = r[kind]
            print(f"{name:<18} {kind:<5} {c['plain'] * 1e3:>13.2f} {c['engine'] * 1e3:>14.2f} {c['over'] * 1e3:>16.3f} "
                  f"{c['ratio']:>6.3f}  {c['ci'][0] * 1e3:>7.2f}..{c['ci'][1] * 1e3:<7.2f}")
    print("wall: perf_counter; cpu: this process's CPU time (less disturbed by other processes on a shared machine).\n"
          "overhead, ratio: medians of the per-block pairs (engine - plain, engine / plain); "
          "CI: of that median, from its IQR")
    for name, r in results.items():
        print(f"same work, {name}: max |loss diff| over {r['steps']} steps {r['loss_diff']:.1e}, "
              f"max |EMA weight diff| {r['ema_diff']:.1e}; minor page faults per step (median): "
              f"plain {r['faults'][0]:.0f}, engine {r['faults'][1]:.0f}")

    if not args.smoke and (args.breakdown or any(r[k]["ratio"] > 1.05 for r in results.values() for k in ("wall", "cpu"))):
        print()
        print("with hooks removed on both sides (no clipping, no EMA):")
        for name in args.configs:
            bare, full = pair(name, False), results[name]
            for kind in ("wall", "cpu"):
                b, f = bare[kind], full[kind]
                print(f"  {name:<18} {kind:<4} plain {b['plain'] * 1e3:6.2f}, engine {b['engine'] * 1e3:6.2f} ms/step: "
                      f"loop overhead {b['over'] * 1e3:6.3f} ms/step (ratio {b['ratio']:.3f}); "
                      f"hooks' share of the overhead {(f['over'] - b['over']) * 1e3:+.3f} ms/step")
    print()
    print("engine-only pieces of a step, timed alone (µs; 'plain' = the plain loop's equivalent):")
    for name in args.configs:
        spec = make_spec(CONFIGS[name], 1, args.batch_size)
        print(f"  {name}")
        for piece, eng, plain in piece_costs(spec, batches, n=5 if args.smoke else 200):
            shown = "-" if plain is None else f"{plain:.0f}"
            print(f"    {piece:<70} {eng:>7.0f} {shown:>7}")
    print()
    print("engine / plain, wall clock (median of paired blocks): " +
          ", ".join(f"{name} {r['wall']['ratio']:.3f}" for name, r in results.items()) +
          (" (smoke run: not a measurement)" if args.smoke else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
