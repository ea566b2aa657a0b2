"""PBT that exploits: a real sweep of two concurrent trials where a trial
that is replaced continues from the donor's checkpoint (weights, optimizer,
EMA, data position) with perturbed hyperparameters. The proof is the weights
the exploiting trainer holds before its first step: their norm equals the
norm of the donor's checkpoint in the donor's own folder."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from raygen.spec import parse_spec
from raygen.tune import run_tune
from raygen.tune.trial import REPORTS_FILE

# minutes on a loaded 2-core machine: two trials side by side, and a replaced one restarts its TorchTrainer
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]


def tiny(tmp_path, tune: dict) -> dict:
    return {
        "name": "pbt", "run_dir": str(tmp_path / "runs"),
        "data": {"dataset": "digits", "root": str(tmp_path / "data"), "resolution": 8, "batch_size": 16},
        "model": {"family": "seqimg", "options": {"backbone": "gpt2", "dim": 16, "depth": 1, "heads": 2,
                                                  "conditioning": "label"}},
        "train": {"steps": 8, "eval_every": 2, "checkpoint_every": 8, "keep_checkpoints": 10, "val_batches": 1,
                  "grid_samples": 4, "ema": {"enabled": True, "decay": 0.9}, "schedule": {"name": "constant"}},
        "scale": {"workers": 1, "strategy": "ddp"},
        "track": {"fid": {"enabled": False}, "register_model": False},
        "tune": tune,
    }


def reports(sweep_dir: Path) -> list[dict]:
    """Every report of every trial, from the trials' own records (Tune rewrites a trial's result.json
    when PBT restores it, so an exploited trial's earlier runs are not all there)."""
    rows = []
    for f in sorted(sweep_dir.glob(f"trials/*/{REPORTS_FILE}")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


def norm_of(folder: Path) -> float:
    state = load_file(str(folder / "model.safetensors"))
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values() if v.is_floating_point()))


def test_pbt_exploit_starts_from_the_donors_checkpoint(ray_session, tmp_path):
    spec = parse_spec(tiny(tmp_path, {
        "space": {"train.optimizer.lr": {"loguniform": [1e-4, 3e-2]}}, "num_samples": 2, "max_concurrent": 2,
        "scheduler": {"name": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5}}))
    result = run_tune(spec, progress=False)
    assert len(result.trials) == 2 and not any(t["error"] for t in result.trials)
    trials = result.sweep_dir / "trials"
    exploits = sorted(trials.glob("*-x*/exploit.json"))
    assert exploits, f"no trial was exploited: {sorted(p.name for p in trials.iterdir())}"
    all_reports = reports(result.sweep_dir)
    for f in exploits:
        exploit = json.loads(f.read_text())
        donor_ckpt = Path(exploit["donor_checkpoint"])
        assert donor_ckpt.parent.parent.name.split("-x")[0] == exploit["donor_trial"]  # the donor's own folder
        first = next(r for r in all_reports if r.get("trial_run") == f.parent.name)
        # the exploiting trainer's starting state: the donor's step and the donor's weights
        assert first["resumed_step"] == exploit["donor_step"]
        assert first["resumed_weights_norm"] == pytest.approx(norm_of(donor_ckpt), rel=1e-9)
        # and its data position: it continues, not restarts (an exploit of the donor's final checkpoint,
        # which Tune's timing can make the only one, has no step left: its one report is at that step)
        assert first["step"] == min(exploit["donor_step"] + 2, 8)
        donor_state = json.loads((donor_ckpt / "state.json").read_text())
        donor_lr = next(r["lr"] for r in all_reports if r.get("trial_run") == donor_ckpt.parent.parent.name
                        and r.get("step") == exploit["donor_step"])
        # perturbed: PBT multiplies by 0.8 / 1.2 or resamples, so the lr it trains with is not the donor's
        assert first["lr"] != pytest.approx(donor_lr, rel=1e-6)
        assert first["lr"] == pytest.approx(exploit["overrides"]["train.optimizer.lr"], rel=1e-6)
        assert donor_state["train_state"]["step"] == exploit["donor_step"]
        assert (donor_ckpt / "hooks" / "ema.safetensors").is_file()  # EMA state travels with the checkpoint
