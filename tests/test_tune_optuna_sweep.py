"""A real Optuna sweep whose objective is a weighted sum with FID: FID (and its
standard error) at every report, the results table and plots in the MLflow
parent run, and `raygen tune best PARENT_RUN_ID` writing the best trial's spec."""
from __future__ import annotations

import csv
import io

import pytest
import yaml

from raygen.jobs.cli import main
from raygen.spec import parse_spec
from raygen.tracking.store import client
from raygen.tune import run_tune

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]


def test_optuna_sweep_on_a_weighted_fid_objective(ray_session, tmp_path, capsys):
    spec = parse_spec({
        "name": "opt", "run_dir": str(tmp_path / "runs"),
        "data": {"dataset": "digits", "root": str(tmp_path / "data"), "resolution": 8, "batch_size": 16},
        "model": {"family": "seqimg", "options": {"backbone": "gpt2", "dim": 16, "depth": 1, "heads": 2,
                                                  "conditioning": "label"}},
        "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 4, "val_batches": 1, "grid_samples": 4},
        "scale": {"workers": 1, "strategy": "ddp"},
        "track": {"fid": {"samples": 32, "fit_steps": 20}},
        "tune": {"search": "optuna", "seed": 0, "num_samples": 2, "scheduler": {"name": "fifo"},
                 "space": {"train.optimizer.lr": {"loguniform": [1e-3, 1e-2]},
                           "model.options.dim": {"choice": [12, 16]}, "model.options.heads": {"choice": [2, 3]}},
                 "filter": "${model.options.dim} % ${model.options.heads} == 0",
                 "objective": {"fid": 1.0, "val_loss": 0.1}},
    })
    result = run_tune(spec, progress=False)
    assert len(result.trials) == 2 and not any(t["error"] for t in result.trials)
    for t in result.trials:
        o, m = t["overrides"], t["metrics"]
        assert o["model.options.dim"] % o["model.options.heads"] == 0  # the filter held
        assert m["objective"] == pytest.approx(m["fid"] + 0.1 * m["val_loss"], rel=1e-6)
        assert m["fid_stderr"] > 0
    c = client(result.tracking_uri)
    for t in result.trials:  # FID at the eval cadence (steps 2 and 4), its standard error beside it
        hist = c.get_metric_history(t["metrics"]["mlflow_run_id"], "fid_stderr")
        assert {m.step for m in hist} >= {2, 4}
    artifacts = {a.path for a in c.list_artifacts(result.parent_run_id, "tune")}
    assert {"tune/trials.csv", "tune/trials.md", "tune/parallel_coordinates.png", "tune/curves_objective.png",
            "tune/curves_val_loss.png"} <= artifacts
    rows = list(csv.DictReader(io.StringIO((result.sweep_dir / "results" / "trials.csv").read_text())))
    assert len(rows) == 2 and sum(r["status"] == "best" for r in rows) == 1

    capsys.readouterr()  # what the sweep printed (Tune's own lines)
    assert main(["tune", "best", result.parent_run_id, "--tracking-uri", result.tracking_uri]) == 0
    best = yaml.safe_load(capsys.readouterr().out)
    assert best["model"]["options"]["dim"] == result.best_overrides["model.options.dim"]
    assert best["train"]["optimizer"]["lr"] == pytest.approx(result.best_overrides["train.optimizer.lr"])
    parse_spec(best)
