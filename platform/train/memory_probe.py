"""Measure what each worker holds under a strategy, without Ray: `world`
processes on a loopback gloo group run the real Trainer and Strategy for a
few steps on random batches, and report, per rank, `state_bytes` at the
optimizer-step event (parameters, gradients, optimizer state, master copy)
and the peak RSS of the run. The ZeRO test and `bench/scaling.py` use it.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

from raygen.train.hooks import Hook


@dataclass
class ProbeResult:
    rank: int
    params: int
    grads: int
    optimizer: int
    master: int
    peak_rss_mb: float
    peak_gpu_mb: float
    loss: float
    images: int          # images this rank trained on after its first step
    seconds: float       # the wall time of those steps (start-up and the first step excluded)


class _StateProbe(Hook):
    """Records the strategy's per-worker bytes at each optimizer step; the
    last one counts (an optimizer such as Adam makes its state at its first step)."""
    key = "state_probe"

    def __init__(self):
        self.bytes = None
        self.step_ends: list[float] = []

    def on_step_end(self, trainer, metrics):
        import time
        self.step_ends.append(time.perf_counter())

    def on_before_optimizer_step(self, trainer, params):
        from raygen.train.memory import state_bytes
        self.bytes = state_bytes(trainer.strategy, params)


class RandomBatches:
    """Seeded random batches shaped like the pipeline's: images in [0, 1] and labels."""
    corrupt_count = 0

    def __init__(self, info, batch_size: int, seed: int):
        self.info, self.batch_size, self.seed = info, batch_size, seed

    def epoch(self, epoch: int, skip: int = 0):
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        for b in range(10**6):
            x = torch.rand(self.batch_size, self.info.channels, self.info.height, self.info.width, generator=g)
            if b >= skip:
                yield {"image": x, "label": torch.randint(max(self.info.num_classes, 1), (self.batch_size,),
                                                          generator=g), "caption": [""] * self.batch_size}


def _worker(rank: int, world: int, port: int, raw_specs: list[dict], info: dict, out, plain: bool = False) -> None:
    import torch.distributed as dist

    from raygen.models.base import DataInfo

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # one process group for every spec: the imports and start-up (most of the time) are paid once
        probe = _probe_plain if plain else _probe_one
        out.put([probe(raw, DataInfo.from_dict(info), rank, world) for raw in raw_specs])
    except BaseException as err:  # the parent reports it; a dead child would only time out
        out.put(f"rank {rank}: {type(err).__name__}: {err}")
        raise
    finally:
        dist.destroy_process_group()


def _probe_one(raw_spec: dict, data_info, rank: int, world: int) -> ProbeResult:
    import gc

    from raygen.models.registry import build_model
    from raygen.spec import parse_spec
    from raygen.train.memory import peak_gpu_mb, peak_rss_mb, reset_peak_rss
    from raygen.train.trainer import Trainer
    from raygen.train.worker import make_strategy

    spec = parse_spec(raw_spec)
    gc.collect()
    reset_peak_rss()  # Trainer.fit resets it too; here for the strategy built before fit
    probe = _StateProbe()
    device = torch.device("cuda", rank) if spec.scale.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(spec=spec, data_info=data_info,
                      make_generator=lambda: build_model(spec.model.family, spec.model.config, data_info),
                      strategy=make_strategy(spec, world, device),
                      train_data=RandomBatches(data_info, spec.data.batch_size, seed=rank),
                      val_data=None, hooks=[probe], checkpoints=None, rank=rank, world_size=world)
    metrics = trainer.fit()
    ends = probe.step_ends
    b = probe.bytes
    result = ProbeResult(rank=rank, params=b.params, grads=b.grads, optimizer=b.optimizer, master=b.master,
                         peak_rss_mb=peak_rss_mb(), peak_gpu_mb=peak_gpu_mb(device), loss=float(metrics["loss"]),
                         images=(len(ends) - 1) * spec.data.batch_size, seconds=ends[-1] - ends[0])
    del trainer, probe
    return result


def _probe_plain(raw_spec: dict, data_info, rank: int, world: int) -> ProbeResult:
    """The same model, batches and optimizer in a plain PyTorch loop (one
    process, no strategy, hooks or metrics): what the engine's memory is
    compared with."""
    import time

    from raygen.models.registry import build_model
    from raygen.spec import parse_spec
    from raygen.train.memory import peak_rss_mb, reset_peak_rss
    from raygen.train.optim import build_optimizer

    spec = parse_spec(raw_spec)
    reset_peak_rss()
    torch.manual_seed(spec.train.seed)
    model = build_model(spec.model.family, spec.model.config, data_info).train()
    opt = build_optimizer(model.parameters(), spec.train.optimizer, spec.data.batch_size)
    batches = RandomBatches(data_info, spec.data.batch_size, seed=rank).epoch(0)
    for step in range(spec.train.steps):
        if step == 1:
            started = time.perf_counter()  # as the engine's: after the first step
        loss = model.training_step(next(batches))["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return ProbeResult(rank=rank, params=0, grads=0, optimizer=0, master=0, peak_rss_mb=peak_rss_mb(),
                       peak_gpu_mb=0.0, loss=float(loss.detach()), images=(spec.train.steps - 1) * spec.data.batch_size,
                       seconds=time.perf_counter() - started)


def _collect(out, procs, timeout_s: float) -> list:
    """One result per process; fails as soon as a process died without one."""
    import queue
    import time

    results, deadline = [], time.monotonic() + timeout_s
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=2.0))
            continue
        except queue.Empty:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"memory probe: no result after {timeout_s:.0f}s")
        dead = [p.exitcode for p in procs if not p.is_alive()]
        if dead and any(code != 0 for code in dead):
            raise RuntimeError(f"memory probe: a worker exited with code(s) {dead} before reporting")
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(raw_specs: list[dict[str, Any]], info, world: int = 2, timeout_s: float = 600,
            plain: bool = False) -> list[list[ProbeResult]]:
    """Run each of `raw_specs` (job specs as dicts; steps, batch size and
    strategy from them) in turn on the same `world` local processes; per
    spec, one ProbeResult per rank. `plain`: a plain PyTorch loop instead
    of the engine (no byte counts)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the spawned children
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, list(raw_specs), info.to_dict(), out, plain), daemon=True)
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        results = _collect(out, procs, timeout_s)
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:  # only the processes started here
            if p.is_alive():
                p.terminate()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        raise RuntimeError("; ".join(errors))
    by_rank = sorted(results, key=lambda per_spec: per_spec[0].rank)
    return [list(per_rank) for per_rank in zip(*by_rank)]
