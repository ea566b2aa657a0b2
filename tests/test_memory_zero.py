"""ZeRO really shards: per-worker parameters, gradients and optimizer state
under DDP and DeepSpeed ZeRO 1/2/3 on the same model with 2 workers, counted
in bytes (deterministic) on 2 local processes over a loopback gloo group,
the real Trainer and Strategy; and the dry-run's table predicts them."""
from __future__ import annotations

import json

import pytest

from raygen.models.base import DataInfo
from raygen.spec import parse_spec
from raygen.train.memory import expected_state_bytes
from raygen.train.memory_probe import measure

# spawns a 2-process distributed group and imports DeepSpeed there: a minute or more on a loaded machine
pytestmark = pytest.mark.slow

INFO = DataInfo(channels=1, resolution=8)


def raw_spec(strategy: str, stage: int | None = None, ds_config: str | None = None) -> dict:
    scale = {"workers": 2, "strategy": strategy}
    if stage is not None:
        scale["zero_stage"] = stage
    if ds_config:
        scale["deepspeed_config"] = ds_config
    return {"model": {"family": "seqimg", "options": {"backbone": "gpt2", "dim": 32, "depth": 2, "heads": 2,
                                                       "dropout": 0.0}},
            "data": {"batch_size": 4},
            "train": {"steps": 2, "eval_every": 1000, "checkpoint_every": 1000, "log_every": 1,
                      "ema": {"enabled": False}, "optimizer": {"name": "adamw"}},
            "scale": scale, "track": {"fid": {"enabled": False}}}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    # DeepSpeed keeps parameters under 1e5 elements whole on every rank under ZeRO-3; partition all of them
    ds = tmp_path_factory.mktemp("ds") / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    specs = {"ddp": raw_spec("ddp"), "zero1": raw_spec("deepspeed", 1), "zero2": raw_spec("deepspeed", 2),
             "zero3": raw_spec("deepspeed", 3, str(ds))}
    results = measure(list(specs.values()), INFO, world=2)
    return {name: (specs[name], per_rank) for name, per_rank in zip(specs, results)}


def near(a: float, b: float, rel: float = 0.02) -> bool:
    return abs(a - b) <= rel * max(abs(b), 1)


def test_both_ranks_hold_the_same_share(measured):
    for name, (_, (r0, r1)) in measured.items():
        assert (r0.params, r0.grads, r0.optimizer, r0.master) == (r1.params, r1.grads, r1.optimizer, r1.master), name
        assert r0.peak_rss_mb > 0 and r0.loss == r0.loss


def test_zero_1_and_2_halve_the_optimizer_state_and_zero_3_the_parameters(measured):
    ddp = measured["ddp"][1][0]
    z1, z2, z3 = (measured[f"zero{s}"][1][0] for s in (1, 2, 3))
    assert ddp.optimizer > 0 and ddp.master == 0
    for z in (z1, z2, z3):
        assert near(z.optimizer, ddp.optimizer / 2)   # Adam moments: this worker's half
        assert near(z.master, ddp.params / 2)          # DeepSpeed's fp32 copy of the partition it updates
    assert near(z1.params, ddp.params) and near(z2.params, ddp.params)
    assert near(z3.params, ddp.params / 2)             # ZeRO-3: parameters partitioned too
    assert near(z2.grads, ddp.grads / 2) and near(z3.grads, ddp.grads / 2)


def test_the_dry_run_table_predicts_the_measured_bytes(measured):
    n_params = measured["ddp"][1][0].params // 4
    for name, (raw, (r0, _)) in measured.items():
        want = expected_state_bytes(parse_spec(raw), n_params)
        for field in ("params", "optimizer", "master"):
            assert near(getattr(r0, field), getattr(want, field)), (name, field, getattr(r0, field), getattr(want, field))
