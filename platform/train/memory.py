"""Per-worker memory: peak RSS, peak GPU memory, and the bytes a strategy
keeps per worker (parameters, gradients, optimizer state, master weights).

Three uses: every run logs each worker's peak (the trainer), the ZeRO test
and `bench/scaling.py` compare the byte counts across DDP and ZeRO stages,
and `raygen train --dry-run` estimates a worker's peak before anything starts
(`estimate_worker_memory`) from the same per-strategy table.
"""
from __future__ import annotations

import resource
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

MiB = 2**20


# ---------------------------------------------------------------- process memory
def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: VmHWM), so a run's peak does not
    include what the process did before (a reused Ray worker, earlier tests).
    False where the kernel does not allow it: the peak then covers the whole
    process lifetime."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    """A memory line of /proc/self/status (Linux), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process since start or the last reset."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB


def current_rss_mb() -> float:
    now = _status_mb("VmRSS")
    if now is not None:
        return now
    import psutil
    return psutil.Process().memory_info().rss / MiB


def peak_gpu_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / MiB if device.type == "cuda" else 0.0


# ---------------------------------------------------------------- strategy state
@dataclass
class StateBytes:
    """What one worker holds for the model's training state, in bytes."""
    params: int = 0      # the module's parameters as this worker stores them (a partition under ZeRO-3)
    grads: int = 0       # gradients held when the optimizer steps (full, or this worker's partition)
    optimizer: int = 0   # the optimizer's own state (Adam moments, momentum), this worker's share
    master: int = 0      # fp32 copies of the weights the optimizer updates (DeepSpeed's partition), if separate

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.master

    def as_metrics(self, prefix: str = "mem_state") -> dict[str, float]:
        return {f"{prefix}_{k}_mb": v / MiB for k, v in {**asdict(self), "total": self.total}.items()}


def _storages(tensors: Iterable[torch.Tensor | None], seen: set[int]) -> int:
    """Bytes of the distinct storages behind `tensors` not already in `seen`
    (flattened ZeRO buffers hold many parameters: counted once)."""
    total = 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        storage = t.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def base_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO, bf16), which
    keep it as `.optimizer`."""
    for _ in range(4):
        if type(optimizer).__module__.startswith("torch.optim"):
            return optimizer
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer = inner
    return optimizer


def _module_params(strategy) -> list[torch.Tensor]:
    """The parameter tensors this worker stores: under ZeRO-3 its partition
    (`ds_tensor`) plus whatever is gathered at the moment."""
    out = []
    for p in strategy.generator.parameters():
        out.append(p.data)
        if hasattr(p, "ds_tensor"):
            out.append(p.ds_tensor)
    return out


def strategy_optimizer(strategy):
    engine = getattr(strategy, "engine", None)
    return base_optimizer(engine.optimizer if engine is not None else strategy.optimizer)


def state_bytes(strategy, update_params: list[torch.Tensor] | None = None) -> StateBytes:
    """Bytes this worker holds for `strategy`'s training state.

    `update_params`: the tensors handed to the optimizer-step event (the
    strategy's `before_update`), whose gradients are then the reduced ones
    this worker steps with; measured there, gradients count at their peak,
    together with any still held on the module's own parameters (ZeRO-1
    keeps full gradients there until the reduction)."""
    opt = strategy_optimizer(strategy)
    seen: set[int] = set()
    params = _storages(_module_params(strategy), seen)
    master_params = [p for g in opt.param_groups for p in g["params"]]
    master = _storages(master_params, seen)  # 0 when they are the module's own tensors (DDP)
    grads = _storages((p.grad for p in (update_params or master_params)), seen)
    grads += _storages((p.grad for p in strategy.generator.parameters()), seen)
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    optimizer = _storages(state, seen)
    return StateBytes(params=params, grads=grads, optimizer=optimizer, master=master)


# ---------------------------------------------------------------- gathered figures
def gather(values: list[float]) -> list[torch.Tensor]:
    """`values` from every rank (one all-gather), rank order."""
    import torch.distributed as dist

    from raygen.train.strategy import collective_device
    local = torch.tensor(values, dtype=torch.float64)
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [local]
    local = local.to(collective_device())
    parts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return [p.cpu() for p in parts]


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Current and peak RSS of every worker (and peak GPU memory on a GPU), per rank."""
    parts = gather([current_rss_mb(), peak_rss_mb(), peak_gpu_mb(device)])
    out: dict[str, float] = {}
    for r, p in enumerate(parts):
        out[f"mem_rss_mb_rank{r}"] = float(p[0])
        out[f"mem_peak_rss_mb_rank{r}"] = float(p[1])
        if device.type == "cuda":
            out[f"gpu_mem_max_mb_rank{r}"] = float(p[2])
    return out


def peak_summary(metrics: dict[str, float]) -> str | None:
    """'rank0 812 MiB, rank1 790 MiB' (plus GPU peaks) from a run's metrics, for the final summary."""
    def ranks(prefix: str) -> list[tuple[int, float]]:
        found = [(int(k[len(prefix):]), v) for k, v in metrics.items()
                 if k.startswith(prefix) and k[len(prefix):].isdigit()]
        return sorted(found)
    rss = ranks("mem_peak_rss_mb_rank")
    if not rss:
        return None
    text = ", ".join(f"rank{r} {v:.0f} MiB" for r, v in rss)
    gpu = ranks("gpu_mem_max_mb_rank")
    if gpu:
        text += "; GPU " + ", ".join(f"rank{r} {v:.0f} MiB" for r, v in gpu)
    return text


# ---------------------------------------------------------------- the estimate
#: optimizer state per parameter, in parameter-sized slots
_OPT_SLOTS = {"adam": 2, "adamw": 2}


def optimizer_slots(opt_spec) -> int:
    if opt_spec.name == "sgd":
        return 1 if opt_spec.momentum else 0
    return _OPT_SLOTS[opt_spec.name]


def expected_state_bytes(spec, n_params: int, world_size: int | None = None) -> StateBytes:
    """The per-worker bytes `state_bytes` measures, predicted from the spec.
    DDP keeps fp32 weights and gradients (autocast computes in bf16/fp16)
    and the optimizer's state. Under DeepSpeed ZeRO stage s of n workers,
    optimizer state and DeepSpeed's fp32 master copy split n ways from
    stage 1, gradients from stage 2, parameters from stage 3; with bf16/fp16
    DeepSpeed stores the module's weights and gradients in 16 bits (the
    16-bit rows are not measured on this machine: tests/test_memory_zero.py
    checks fp32). DeepSpeed pads partitions, so this is a lower bound by up
    to a few elements per worker."""
    n = world_size or spec.scale.workers
    scale, N = spec.scale, n_params
    slots = optimizer_slots(spec.train.optimizer)
    if scale.strategy != "deepspeed":
        return StateBytes(params=4 * N, grads=4 * N, optimizer=slots * 4 * N, master=0)
    half = spec.train.precision in ("bf16", "fp16")
    P = (2 if half else 4) * N             # the module's weights (and gradients) as DeepSpeed stores them
    share = lambda b: -(-b // n)  # noqa: E731 - ceil: the padded partition
    stage = scale.zero_stage
    if stage == 0:
        return StateBytes(params=P, grads=P, optimizer=slots * 4 * N, master=4 * N if half else 0)
    return StateBytes(params=share(P) if stage == 3 else P, grads=share(P) if stage >= 2 else P,
                      optimizer=share(slots * 4 * N), master=share(4 * N))


class _SavedTensors:
    """Bytes of the distinct tensors autograd saves for backward: the
    activation memory a training step holds at the end of its forward."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.seen and not isinstance(t, torch.nn.Parameter):
            self.seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return t


def activation_bytes(model, batch: dict[str, Any]) -> int:
    """Measure the saved-for-backward bytes of one `training_step` on `batch`
    (parameters excluded), then free them."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = _SavedTensors()
    saved.seen |= params
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        out = model.training_step(batch)
    del out
    return saved.bytes


@dataclass
class MemoryEstimate:
    n_params: int
    strategy: str
    workers: int
    runtime_mb: float        # the process with torch, Ray and the model loaded (measured here)
    state: StateBytes        # expected_state_bytes, less the parameters already in runtime_mb
    activations_mb: float
    data_mb: float           # shuffle buffer and prefetched batches
    buckets_mb: float        # DDP's gradient buckets (world size > 1)

    @property
    def total_mb(self) -> float:
        s = self.state
        return (self.runtime_mb + (s.grads + s.optimizer + s.master) / MiB + self.activations_mb
                + self.data_mb + self.buckets_mb)

    def lines(self) -> list[str]:
        s = self.state
        return [f"parameters: {self.n_params:,} ({self.n_params * 4 / MiB:.1f} MiB in fp32)",
                f"strategy:   {self.strategy}, {self.workers} worker(s)",
                f"per-worker memory estimate: {self.total_mb:.0f} MiB peak RSS",
                f"  runtime (torch, Ray, the model's weights): {self.runtime_mb:.0f} MiB",
                f"  gradients {s.grads / MiB:.1f} MiB, optimizer state {s.optimizer / MiB:.1f} MiB, "
                f"fp32 master copy {s.master / MiB:.1f} MiB" + (f", DDP buckets {self.buckets_mb:.1f} MiB"
                                                                  if self.buckets_mb else ""),
                f"  activations of one batch: {self.activations_mb:.1f} MiB; data buffers: {self.data_mb:.1f} MiB"]


def estimate_worker_memory(spec, model, batch: dict[str, Any], *, strategy_name: str,
                           gradients: bool = True) -> MemoryEstimate:
    """A worker's peak RSS for `spec`, before anything starts: this process's
    RSS now (it holds torch, Ray's libraries and the fp32 `model`, as a
    worker will), plus the strategy's per-worker gradients, optimizer state
    and master copy, the activations of one measured `training_step` on
    `batch` (which is the data spec's batch size), and the data buffers.
    `gradients` False: a family fitted without gradients (no optimizer,
    no gradients, no activations kept for backward)."""
    # a worker imports these (rank 0 logs to MLflow): their code is part of its RSS
    import ray.data  # noqa: F401
    import ray.train  # noqa: F401

    import raygen.tracking.mlflow_sink  # noqa: F401
    if spec.scale.strategy == "deepspeed":
        import deepspeed  # noqa: F401

    n_params = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("components."))
    if gradients:
        state, act = expected_state_bytes(spec, n_params), activation_bytes(model, batch) / MiB
    else:
        state, act = StateBytes(params=n_params * 4), 0.0
    row_bytes = sum(v[:1].numel() * v.element_size() for v in batch.values() if torch.is_tensor(v) and v.dim())
    d = spec.data
    # uint8 rows in the shuffle buffer; float32 batches prefetched and converted
    data_mb = (max(d.shuffle_buffer, d.batch_size) * row_bytes / 4 + (d.prefetch_batches + 2) * d.batch_size * row_bytes) / MiB
    workers = spec.scale.workers
    buckets = n_params * 4 / MiB if gradients and spec.scale.strategy == "ddp" and workers > 1 else 0.0
    return MemoryEstimate(n_params=n_params, strategy=strategy_name, workers=workers, runtime_mb=current_rss_mb(),
                          state=state, activations_mb=act, data_mb=data_mb, buckets_mb=buckets)
