"""What serving a model costs in memory, measured once when a replica loads it.

- `weights_bytes`: the model's parameters and buffers;
- `activation_bytes`: the peak of the tensors a `sample` call at the largest
  batch (serve.max_batch_size) holds at once, counted exactly: every tensor
  a torch op creates during the call is tracked until its storage is freed
  (`LiveTensorBytes`, a dispatch mode with weak references to the storages);
- `resident_bytes`: what the process really grew by, from just before the
  weights were created to the peak of that sample: resident memory (VmHWM)
  on CPU, the CUDA allocator's peak on a GPU. It holds the weights, the
  activations, whatever the loader left behind, and the runtime's buffers
  that grow with the model. Two things are reported beside it and not in
  it: `load_peak_bytes` (the loader's moment with two copies of the weights,
  over before serving starts) and `runtime_bytes` (torch's once-per-process
  set-up, warmed with tiny ops before the baseline);
- `ratio`: resident / (weights + activations); the target is <= 1.2.

The sample doubles as the replica's warm-up. No Ray and no server here.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

#: the target of issue 17: serving costs at most this times weights + activations
TARGET_RATIO = 1.2


class LiveTensorBytes(TorchDispatchMode):
    """Inside: the bytes of the storages torch ops created that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.live: dict[int, tuple[Any, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._prune()  # before adding: a freed storage's address may be reused by an output
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    self.live[key] = (self._ref(storage), storage.nbytes())
        self.peak = max(self.peak, self._prune())
        return out

    def _prune(self) -> int:
        now = 0
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
            else:
                now += nbytes
        return now


class ResidentProbe:
    """The process's growth from `start()` to the peak seen by `peak_bytes()`: resident memory on CPU
    (VmHWM, reset by `mark()`), the allocator's peak on CUDA.

    `start()` first runs a few tiny ops of each kind models use, so the runtime's lazy set-up (thread
    pools, kernel libraries: paid once per process, whatever the model) is not counted as the model's;
    its own growth is reported as `runtime_bytes`."""

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        self.runtime_bytes = 0

    def _now(self) -> int:
        from raygen.train.memory import current_rss_mb

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.memory_allocated(self.device))
        return int(current_rss_mb() * 2**20)

    def start(self) -> "ResidentProbe":
        before = self._now()
        _warm_runtime(self.device)
        self.base = self._now()
        self.runtime_bytes = max(self.base - before, 0)
        self.mark()
        return self

    def mark(self) -> None:
        """Start a new peak (the sample's, not the loader's)."""
        from raygen.train.memory import reset_peak_rss

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.exact_peak = True
        else:
            # without a resettable peak (not Linux, no permission) the peak is the process's lifetime one
            self.exact_peak = reset_peak_rss()

    def peak_bytes(self) -> int:
        from raygen.train.memory import peak_rss_mb

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - self.base)
        return int(peak_rss_mb() * 2**20) - self.base


def _warm_runtime(device: torch.device) -> None:
    import torch.nn.functional as F

    with torch.inference_mode():
        x = torch.randn(2, 4, 8, 8, device=device)
        w = torch.randn(4, 4, 3, 3, device=device)
        h = F.group_norm(F.silu(F.conv2d(x, w, padding=1)), 2)
        F.conv_transpose2d(h, w, stride=2, padding=1)
        q = torch.randn(2, 2, 8, 16, device=device)
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
        t = F.layer_norm(torch.randn(2, 8, 16, device=device), (16,))
        F.gelu(F.linear(t, torch.randn(32, 16, device=device))).softmax(-1).flatten(0, 1).multinomial(1)
        F.embedding(torch.zeros(2, 3, dtype=torch.long, device=device), torch.randn(4, 16, device=device))
        F.interpolate(x, scale_factor=2.0, mode="nearest")


def import_family(uri: str) -> None:
    """Import the family of an exported folder before the baseline is taken, so the module's own memory
    (e.g. diffusers) is not counted as the model's. URIs of the registry are left as they are."""
    from raygen.exports import locate_export

    if uri.startswith(("models:/", "runs:/")) or "://" in uri:
        return
    import yaml

    from raygen.models import get_family

    try:
        spec = yaml.safe_load((locate_export(uri) / "spec.yaml").read_text())
        get_family(spec["model"]["family"])
    except Exception:  # noqa: BLE001 - the load itself reports what is wrong with the folder
        return


def measure_sample(model, *, batch: int, probe: ResidentProbe, device: str = "cpu") -> dict[str, Any]:
    """Sample `batch` images with default params under the trackers; the memory report."""
    from raygen.models import Conditions
    from raygen.models.sampling import make_generators

    from raygen.serving.loading import memory_bytes

    weights = memory_bytes(model)
    report: dict[str, Any] = {"batch": batch, "weights_bytes": weights, "activation_bytes": None,
                              "resident_bytes": None, "ratio": None, "target_ratio": TARGET_RATIO,
                              "warmup_ms": None, "note": None}
    try:
        from raygen.models.conditions import get_kind
        example = get_kind(model.condition_kind).example(model.data_info)  # a scene model needs a scene
        conditions = Conditions.repeat(model.condition_kind, example, batch)
        params = model.sampling_params()
        started = time.perf_counter()
        tracker = LiveTensorBytes()
        with torch.inference_mode(), tracker:
            model.sample(conditions, params, make_generators(range(batch), device))
        report["warmup_ms"] = round((time.perf_counter() - started) * 1e3, 1)
    except Exception as err:  # noqa: BLE001 - a model that cannot sample without a condition value
        report["note"] = f"not measured: a sample with an example condition failed ({type(err).__name__}: {err})"
        return report
    resident = probe.peak_bytes()
    report.update(activation_bytes=tracker.peak, resident_bytes=resident,
                  ratio=round(resident / max(weights + tracker.peak, 1), 3))
    if not probe.exact_peak:
        report["note"] = "the peak resident memory could not be reset: resident_bytes is an upper bound"
    return report


def load_measured(load, uri: str, *, batch: int, device: str = "cpu") -> tuple[Any, Optional[dict]]:
    """`load()` (-> the model, on `device`) between the probes: (loaded, memory report), or
    (loaded, None) when batch is 0."""
    if batch <= 0:
        return load(), None
    import_family(uri)
    probe = ResidentProbe(device).start()
    model = load()
    load_peak = probe.peak_bytes()  # the loader's moment with two copies of the weights
    probe.mark()
    report = measure_sample(model, batch=batch, probe=probe, device=device)
    report.update(load_peak_bytes=load_peak, runtime_bytes=probe.runtime_bytes)
    return model, report


__all__ = ["LiveTensorBytes", "ResidentProbe", "TARGET_RATIO", "load_measured", "measure_sample"]
