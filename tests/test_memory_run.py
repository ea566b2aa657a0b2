"""Memory in every run: each worker's peak RSS reaches the final report (and
so MLflow and the summary), the peak is the run's own, and `raygen train
--dry-run` estimates it before anything starts (within 25% of the measured
peak: the slow test at the end runs both)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from raygen.spec import parse_spec
from raygen.train.memory import (activation_bytes, expected_state_bytes, peak_rss_mb, peak_summary,
                                 reset_peak_rss)
from raygen.train.trainer import Trainer
from raygen.train.worker import make_strategy

from engine_toys import INFO, ListBatches, toy_images

REPO = Path(__file__).resolve().parents[1]


def test_peak_rss_is_reset_and_sees_a_new_peak():
    if not reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its peak RSS")
    base = peak_rss_mb()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    high = peak_rss_mb()
    assert high >= base + 60
    del block
    reset_peak_rss()
    assert peak_rss_mb() < high - 40


def spec_for(**scale):
    return parse_spec({
        "model": {"family": "toy", "options": {"dropout": 0.0}}, "data": {"batch_size": 8},
        "train": {"steps": 5, "eval_every": 1000, "checkpoint_every": 1000, "log_every": 1000,
                  "optimizer": {"name": "adamw"}, "ema": {"enabled": False}},
        "scale": {"workers": 1, "strategy": "ddp", **scale}, "track": {"fid": {"enabled": False}},
    })


def test_the_last_report_carries_each_workers_peak_rss():
    from raygen.models.registry import build_model
    spec = spec_for()
    reports = []
    trainer = Trainer(spec=spec, data_info=INFO, make_generator=lambda: build_model("toy", spec.model.config, INFO),
                      strategy=make_strategy(spec, 1, torch.device("cpu")), train_data=ListBatches(toy_images(64), 8),
                      val_data=None, hooks=[], checkpoints=None, report=lambda m, folder: reports.append(m))
    metrics = trainer.fit()
    # log_every is beyond the run: the last step still measures, for the summary
    assert metrics["mem_peak_rss_mb_rank0"] >= metrics["mem_rss_mb_rank0"] > 0
    assert reports[-1]["mem_peak_rss_mb_rank0"] == metrics["mem_peak_rss_mb_rank0"]
    assert peak_summary(reports[-1]) == f"rank0 {metrics['mem_peak_rss_mb_rank0']:.0f} MiB"


def test_peak_summary_lists_every_rank_and_gpu_peaks():
    text = peak_summary({"mem_peak_rss_mb_rank1": 900.4, "mem_peak_rss_mb_rank0": 812.0, "loss": 1.0,
                         "gpu_mem_max_mb_rank0": 100.0, "gpu_mem_max_mb_rank1": 101.0})
    assert text == "rank0 812 MiB, rank1 900 MiB; GPU rank0 100 MiB, rank1 101 MiB"
    assert peak_summary({"loss": 1.0}) is None


def test_expected_state_bytes_follow_the_strategy():
    P = 1000 * 4
    ddp = expected_state_bytes(spec_for(), 1000)
    assert (ddp.params, ddp.grads, ddp.optimizer, ddp.master) == (P, P, 2 * P, 0)
    z1 = expected_state_bytes(spec_for(strategy="deepspeed", zero_stage=1, workers=2), 1000)
    assert (z1.params, z1.grads, z1.optimizer, z1.master) == (P, P, P, P // 2)
    z2 = expected_state_bytes(spec_for(strategy="deepspeed", zero_stage=2, workers=2), 1000)
    assert (z2.params, z2.grads) == (P, P // 2)
    z3 = expected_state_bytes(spec_for(strategy="deepspeed", zero_stage=3, workers=4), 1000)
    assert (z3.params, z3.grads, z3.optimizer, z3.master) == (P // 4, P // 4, P // 2, P // 4)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 1)

    def training_step(self, batch):
        return {"loss": self.b(torch.relu(self.a(batch["image"]))).mean()}


def test_activation_bytes_are_the_tensors_saved_for_backward():
    torch.manual_seed(0)
    x = torch.rand(10, 16)
    # a saves its input (10x16), relu its output (10x32), b its input (the same 10x32 tensor): weights excluded
    assert activation_bytes(TwoLayers(), {"image": x}) == (10 * 16 + 10 * 32) * 4


def test_the_estimate_adds_the_strategys_state_activations_and_buffers():
    from raygen.train.memory import estimate_worker_memory
    model, batch = TwoLayers(), {"image": torch.rand(8, 16)}
    n = sum(p.numel() for p in model.parameters())
    ddp = estimate_worker_memory(spec_for(workers=2), model, batch, strategy_name="ddp")
    assert ddp.n_params == n and ddp.state.optimizer == 2 * 4 * n and ddp.buckets_mb == 4 * n / 2**20
    assert ddp.activations_mb == (8 * 16 + 8 * 32) * 4 / 2**20 and ddp.data_mb > 0
    assert ddp.total_mb > ddp.runtime_mb
    fit = estimate_worker_memory(spec_for(), model, batch, strategy_name="no-gradient fit", gradients=False)
    assert (fit.state.grads, fit.state.optimizer, fit.activations_mb) == (0, 0, 0.0)
    assert any(line.startswith(f"parameters: {n:,}") for line in ddp.lines())


# ---------------------------------------------------------------- the estimate against a real run
@pytest.mark.slow
def test_dry_run_estimate_is_within_25_percent_of_the_measured_peak(ray_session, tmp_path):
    import yaml

    from raygen.train.runner import run_training

    raw = {"name": "mem", "run_dir": str(tmp_path / "runs"),
           "data": {"dataset": "digits", "root": str(tmp_path / "data"), "resolution": 8, "batch_size": 16},
           "model": {"family": "seqimg", "options": {"backbone": "gpt2", "dim": 16, "depth": 1, "heads": 2,
                                                     "conditioning": "label"}},
           "train": {"steps": 4, "eval_every": 4, "checkpoint_every": 4, "val_batches": 1, "grid_samples": 4,
                     "log_every": 1},
           "scale": {"workers": 1, "strategy": "ddp"},
           "track": {"fid": {"enabled": False}, "register_model": False}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    # a fresh process, as a user runs it: its RSS is part of the estimate
    out = subprocess.run([sys.executable, "-m", "raygen.jobs.cli", "train", "--dry-run", str(path)],
                         capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "parameters: " in out.stdout
    estimate = float(out.stdout.split("per-worker memory estimate: ")[1].split(" MiB")[0])
    result = run_training(parse_spec(raw), progress=False)
    measured = result.metrics["mem_peak_rss_mb_rank0"]
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured)
