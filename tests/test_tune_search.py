"""tune.search (random, grid, Optuna TPE, Optuna multi-objective) over the
space syntax, filters included, and the spec errors around it. No Ray cluster:
the search algorithms are driven directly, as Tune would."""
from __future__ import annotations

import json

import pytest

from raygen.spec import SpecError, parse_spec
from raygen.tune.search import build_search, tune_config_metric
from raygen.tune.space import GRID_KEY, overrides_from_config

import engine_toys  # noqa: F401

SPACE = {"model.options.hidden": {"choice": [4, 8, 16]}, "train.grad_accum": {"choice": [1, 2, 4, 8]},
         "train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}}
FILTER = "${train.grad_accum} <= ${model.options.hidden} / 2"


def spec(**tune):
    return parse_spec({"model": {"family": "toy"}, "tune": tune})


def allowed(o):
    return o["train.grad_accum"] <= o["model.options.hidden"] / 2


def test_grid_search_crosses_grid_and_choice_axes_and_drops_filtered_points():
    s = spec(space={k: v for k, v in SPACE.items() if "choice" in v}, filter=FILTER, search="grid")
    space, alg = build_search(s.tune)
    assert alg is None and set(space) == {GRID_KEY}
    points = space[GRID_KEY]["grid_search"]
    assert len(points) == 9 and all(allowed(p) for p in points)  # 12 combinations, 3 filtered out
    with pytest.raises(SpecError, match=r"search: grid runs every combination of finite axes; space.train.optimizer.lr "
                                        r"is loguniform: give it as \{grid: \[...\]\}"):
        spec(space=SPACE, search="grid")


def test_optuna_rejects_grid_axes_and_pbt_with_a_fix():
    with pytest.raises(SpecError, match=r"tune: search: optuna samples every axis itself; space.train.steps is a grid "
                                        r"axis: write it as \{choice: \[...\]\}"):
        spec(space={"train.steps": {"grid": [1, 2]}}, search="optuna")
    with pytest.raises(SpecError, match="pbt mutates trials itself and does not go with search: optuna"):
        spec(space=SPACE, search="optuna", scheduler={"name": "pbt"})


def test_optuna_tpe_never_proposes_a_filtered_point():
    s = spec(space=SPACE, filter=FILTER, search="optuna", seed=3, metric="val_loss", mode="min")
    space, alg = build_search(s.tune)
    metric, mode = tune_config_metric(s.tune)
    assert type(alg).__name__ == "OptunaSearch" and (metric, mode) == ("val_loss", "min")
    # the filtered axes are one categorical of the allowed combinations; lr stays continuous
    assert sorted(json.loads(c)["train.grad_accum"] for c in space[GRID_KEY].categories) == [1, 1, 1, 2, 2, 2, 4, 4, 8]
    assert alg.set_search_properties(metric, mode, space)
    seen = []
    for i in range(30):  # past TPE's 10 random start-up trials, so the model proposes too
        config = alg.suggest(f"t{i}")
        o = overrides_from_config(config)
        assert allowed(o) and 1e-4 <= o["train.optimizer.lr"] <= 1e-2
        seen.append(o)
        # a made-up objective with its minimum at hidden 16, accum 8, lr 1e-3
        loss = abs(o["model.options.hidden"] - 16) + abs(o["train.grad_accum"] - 8) + abs(o["train.optimizer.lr"] - 1e-3) * 100
        alg.on_trial_complete(f"t{i}", {"val_loss": loss, "training_iteration": 1})
    late = seen[15:]  # TPE concentrates on the good region
    assert sum(o["model.options.hidden"] == 16 for o in late) > len(late) / 2


def test_optuna_multi_objective_two_metrics():
    s = spec(space=SPACE, search="optuna", scheduler={"name": "fifo"}, seed=0,
             objectives=[{"metric": "fid", "mode": "min"}, {"metric": "images_per_s", "mode": "max"}])
    space, alg = build_search(s.tune)
    assert tune_config_metric(s.tune) == (None, None)  # the searcher holds both
    assert alg.metric == ["fid", "images_per_s"] and alg.mode == ["min", "max"]
    assert alg.set_search_properties(None, None, space)
    for i in range(4):
        o = overrides_from_config(alg.suggest(f"t{i}"))
        alg.on_trial_complete(f"t{i}", {"fid": 10.0 / o["model.options.hidden"], "images_per_s": 100.0 / o["train.grad_accum"]})
    study = alg._ot_study
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert len(study.best_trials) >= 1 and all(len(t.values) == 2 for t in study.trials)


@pytest.mark.parametrize("tune, message", [
    ({"objectives": [{"metric": "fid"}, {"metric": "images_per_s", "mode": "max"}], "scheduler": {"name": "fifo"}},
     "objectives: several metrics are optimized by Optuna's multi-objective mode: set tune.search: optuna"),
    ({"objectives": [{"metric": "fid"}, {"metric": "images_per_s", "mode": "max"}], "search": "optuna"},
     "objectives: scheduler asha stops trials on one metric; set tune.scheduler.name: fifo"),
    ({"objectives": [{"metric": "fid"}], "search": "optuna", "scheduler": {"name": "fifo"}},
     "objectives: give two or more metrics"),
    ({"objective": {"fid": 1.0}, "objectives": [{"metric": "fid"}, {"metric": "kid"}]},
     "objective \\(a weighted sum\\) and objectives \\(several metrics\\) exclude each other"),
    ({"objective": {"fid": 1.0}, "metric": "fid"}, "metric: fid is replaced by objective"),
])
def test_objective_spec_errors_name_the_field_and_the_fix(tune, message):
    with pytest.raises(SpecError, match=message):
        spec(space={"train.optimizer.lr": {"choice": [1e-3, 1e-2]}}, **tune)
