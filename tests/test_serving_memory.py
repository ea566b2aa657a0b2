"""Serving memory (issue 17): a replica measures, when it loads a model, its weights, the activations of a
sample at the largest batch, and what the process really grew by; `/v1/models` reports them.

Resident memory is only meaningful in a fresh process (a replica): the loads here run in a subprocess, as
a Serve replica would."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from raygen.models import build_model
from raygen.serving.memory import TARGET_RATIO, LiveTensorBytes

from test_serving_stream import INFO, export


def test_live_tensor_bytes_counts_what_ops_hold_at_once():
    weights = torch.randn(256, 256)
    with torch.inference_mode(), LiveTensorBytes() as live:
        a = torch.ones(1024)                 # 4 KiB, kept
        b = (weights @ weights).sum()        # 256 KiB for a moment, then 4 bytes
        view = a[:10]                        # a view: no new storage
        del b, view
    assert live.peak == 4096 + 256 * 256 * 4 + 4 or live.peak == 4096 + 256 * 256 * 4  # sum's output may come first
    assert a.sum() == 1024


def load_in_fresh_process(path, batch: int) -> dict:
    code = ("import json; from raygen.serving.deployments import load_sampler; "
            f"s, card = load_sampler('m', {str(path)!r}, tracking_uri=None, imports=[], use_gpu=False, merge=True, "
            f"measure_batch={batch}); print(json.dumps(card))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_a_replica_serves_a_model_within_1_2x_its_weights_and_activations(tmp_path):
    # a small seqimg (100 MiB of weights): large enough that the ~5 MiB of Python objects a loaded model
    # brings along (module objects, lazily imported code) do not dominate; see docs/serving.md
    torch.manual_seed(0)
    model = build_model("seqimg", {"backbone": "gpt2", "dim": 512, "depth": 8, "conditioning": "label"}, INFO)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    path = export(model, tmp_path / "seq", "seq")
    del model
    memory = load_in_fresh_process(path, batch=8)["serving_memory"]
    assert memory["batch"] == 8 and memory["weights_bytes"] == weights
    assert 0 < memory["activation_bytes"] < weights
    assert memory["resident_bytes"] >= 0.9 * weights  # the weights are really resident
    expected = memory["resident_bytes"] / (memory["weights_bytes"] + memory["activation_bytes"])
    assert memory["ratio"] == pytest.approx(expected, abs=1e-3)
    assert memory["ratio"] <= TARGET_RATIO, memory
    assert memory["load_peak_bytes"] >= weights  # the loader held a second copy for a moment, reported apart
