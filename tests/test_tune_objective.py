"""What a sweep optimizes: a weighted sum, the Pareto front of two metrics,
FID at the eval cadence, and FID's bootstrap standard error."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raygen.metrics.fid import fid_standard_error
from raygen.metrics.frechet import frechet_distance, gaussian_stats
from raygen.metrics.reference import ReferenceStats
from raygen.spec import SpecError, parse_spec
from raygen.tune.objective import best_index, objective_metrics, pareto_front, with_objective, with_objective_cadence

import engine_toys  # noqa: F401


def spec(**sections):
    return parse_spec({"model": {"family": "toy"}, **sections})


def test_weighted_sum_is_reported_only_when_every_term_is_there():
    s = spec(tune={"space": {"train.optimizer.lr": {"choice": [1e-3]}}, "objective": {"fid": 1.0, "val_loss": 0.1}})
    assert s.tune.metric == "objective" and objective_metrics(s.tune) == ["fid", "val_loss"]
    assert with_objective({"fid": 20.0, "val_loss": 3.0, "lr": 1e-3}, s.tune.objective)["objective"] == pytest.approx(20.3)
    assert "objective" not in with_objective({"val_loss": 3.0}, s.tune.objective)  # an eval step without FID


def test_best_of_one_metric_and_of_two_on_the_pareto_front():
    rows = [{"fid": 10.0, "images_per_s": 50.0}, {"fid": 12.0, "images_per_s": 90.0},
            {"fid": 11.0, "images_per_s": 40.0}, {"fid": 9.0, "images_per_s": 45.0}, {"val_loss": 1.0}]
    assert pareto_front(rows[:4], ["fid", "images_per_s"], ["min", "max"]) == [0, 1, 3]  # row 2 is dominated by 0
    one = spec(tune={"space": {"train.optimizer.lr": {"choice": [1e-3]}}, "metric": "fid"})
    assert best_index(rows, one.tune) == 3
    two = spec(tune={"space": {"train.optimizer.lr": {"choice": [1e-3]}}, "search": "optuna",
                     "scheduler": {"name": "fifo"},
                     "objectives": [{"metric": "images_per_s", "mode": "max"}, {"metric": "fid"}]})
    assert best_index(rows, two.tune) == 1  # on the front, best on the first objective
    assert best_index([{"val_loss": float("nan")}], spec().tune) is None


def test_fid_objective_is_measured_at_each_report():
    s = spec(train={"steps": 12, "eval_every": 4, "checkpoint_every": 6}, track={"fid": {"samples": 32}},
             tune={"space": {"train.optimizer.lr": {"choice": [1e-3]}}, "objective": {"fid": 1.0, "val_loss": 0.1}})
    assert with_objective_cadence(s).track.fid.every == 2  # gcd(4, 6, 12): every eval and checkpoint report
    assert with_objective_cadence(s).track.fid.samples == 32
    plain = spec(tune={"space": {"train.optimizer.lr": {"choice": [1e-3]}}})
    assert with_objective_cadence(plain).track.fid.every == 0  # val_loss needs no FID on the way
    with pytest.raises(SpecError, match="tune.objective: fid needs track.fid.enabled: true"):
        from raygen.spec.checks import check_runnable
        check_runnable(spec(track={"fid": {"enabled": False}}, tune=s.tune.model_dump()), tune=True)


def test_fid_standard_error_by_bootstrap_shrinks_with_more_samples():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(400, 8))
    mu, sigma = gaussian_stats(ref)
    stats = ReferenceStats(mu=mu, sigma=sigma, features=ref.astype(np.float32), n=400, extractor="x")
    small, large = rng.normal(0.3, 1, size=(64, 8)), rng.normal(0.3, 1, size=(1024, 8))
    se_small = fid_standard_error(torch.from_numpy(small), stats, rounds=30)
    se_large = fid_standard_error(torch.from_numpy(large), stats, rounds=30)
    assert 0 < se_large < se_small  # about 1/sqrt(N): 4x fewer samples, clearly larger error
    # the FIDs of independent draws of 64 spread about as much as the bootstrap says
    fids = [frechet_distance(*gaussian_stats(rng.normal(0.3, 1, size=(64, 8))), mu, sigma) for _ in range(40)]
    assert 0.5 < se_small / np.std(fids) < 2.0
