"""A sweep's results (table, plots, best spec, `raygen tune best`), a trial's
resources and the fit check, PBT's mutable keys, and how a restored optimizer
takes the (perturbed) hyperparameters of the spec. No Ray cluster."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

from raygen.jobs.cli import main
from raygen.spec import SpecError, parse_spec
from raygen.spec.loader import spec_to_dict
from raygen.tune import results as res
from raygen.tune.resources import plan_trial_resources
from raygen.tune.schedulers import pbt_mutations, pbt_ready

import engine_toys  # noqa: F401

ROWS = [
    {"trial_id": "a_001", "overrides": {"train.optimizer.lr": 1e-3, "model.options.hidden": 8},
     "metrics": {"val_loss": 0.5, "fid": 12.0, "fid_stderr": 0.4, "step": 8.0}, "error": None},
    {"trial_id": "a_002", "overrides": {"train.optimizer.lr": 1e-2, "model.options.hidden": 16},
     "metrics": {"val_loss": 0.3, "fid": 9.5, "fid_stderr": 0.3, "step": 8.0}, "error": None},
    {"trial_id": "a_003", "overrides": {"train.optimizer.lr": 1e-4, "model.options.hidden": 8},
     "metrics": {"val_loss": 0.9, "step": 4.0}, "error": "RuntimeError: boom"},
]


def spec(**sections):
    return parse_spec({"model": {"family": "toy"}, **sections})


def test_results_table_as_csv_markdown_and_console():
    header, body = res.table_rows(ROWS, ["val_loss"], best=1)
    assert header == ["trial", "model.options.hidden", "train.optimizer.lr", "val_loss", "fid", "fid_stderr", "step",
                      "status"]
    assert body[1] == ["a_002", "16", "0.01", "0.3", "9.5", "0.3", "8", "best"]
    assert body[2][-1] == "error: RuntimeError: boom" and body[2][4] == ""
    csv_text = res.to_csv(header, body)
    assert csv_text.splitlines()[0] == ",".join(header) and "a_003" in csv_text.splitlines()[3]
    md = res.to_markdown(header, body).splitlines()
    assert md[0].startswith("| trial | model.options.hidden") and md[1] == "|" + "---|" * len(header) and len(md) == 5
    console = res.to_console(header, body).splitlines()
    assert len(console) == 4 and console[2].split()[-1] == "best"


def test_parallel_coordinates_and_curves_are_pngs(tmp_path):
    p = res.parallel_coordinates(ROWS, ["model.options.hidden", "train.optimizer.lr"], "val_loss", tmp_path / "pc.png")
    c = res.metric_curves({"a_001": [(2, 0.9), (4, 0.6), (8, 0.5)], "a_002": [(2, 0.8), (8, 0.3)]}, "val_loss",
                          tmp_path / "curves.png")
    for path in (p, c):
        img = Image.open(path)
        assert img.format == "PNG" and img.size[0] >= 600
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 20  # lines and text, not a blank canvas


def test_best_spec_cli_from_a_sweep_folder(tmp_path, capsys):
    base = spec(name="sw", train={"steps": 8}, tune={"space": {"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}}})
    folder = tmp_path / "sw-tune"
    folder.mkdir()
    (folder / res.BASE_SPEC).write_text(yaml.safe_dump(spec_to_dict(base)))
    (folder / res.RESULTS).write_text(json.dumps({"best": ROWS[1], "trials": ROWS}))
    assert main(["tune", "best", str(folder)]) == 0
    best = yaml.safe_load(capsys.readouterr().out)
    assert best["train"]["optimizer"]["lr"] == 1e-2 and best["model"]["options"]["hidden"] == 16
    assert best["train"]["steps"] == 8 and best["name"] == "sw" and best["tune"]["space"] == {}  # a training spec
    parse_spec(best)  # a valid spec: `raygen train best.yaml` trains it
    assert main(["tune", "best", str(tmp_path / "nope")]) == 2
    assert "is neither a sweep folder nor an MLflow run id" in capsys.readouterr().err


def test_trial_resources_from_the_spec_and_a_trial_that_can_never_fit():
    s = spec(scale={"workers": 2, "strategy": "ddp"}, tune={"max_concurrent": 2,
                                                            "resources": {"cpus_per_trial": 1.0, "gpus_per_trial": 0.5}})
    plan = plan_trial_resources(s, {"CPU": 8, "GPU": 1}, [{"CPU": 8, "GPU": 1}])
    assert (plan.cpus_per_worker, plan.gpus_per_worker, plan.concurrent) == (0.5, 0.25, 2)
    assert plan.cpus == 1.1 and plan.gpus == 0.5
    with pytest.raises(SpecError, match=r"tune.resources: a trial asks for 1.1 CPU, 0.5 GPU \(2 worker\(s\) × 0.5 CPU "
                                        r"\+ 0.25 GPU, plus 0.1 CPU for the trial\), but the cluster has 8 CPU, 0 GPU"):
        plan_trial_resources(s, {"CPU": 8}, [{"CPU": 8}])
    big = spec(scale={"workers": 1, "strategy": "ddp"}, tune={"resources": {"cpus_per_trial": 6}})
    with pytest.raises(SpecError, match=r"largest node 4 CPU, 0 GPU\): it can never run"):
        plan_trial_resources(big, {"CPU": 8}, [{"CPU": 4}, {"CPU": 4}])
    shared = plan_trial_resources(spec(scale={"workers": 1}, tune={"max_concurrent": 2}), {"CPU": 2}, [{"CPU": 2}])
    assert shared.cpus_per_worker == 0.4  # (2 - 1 for data - 2 × 0.1) / 2 trials
    with pytest.raises(SpecError, match="tune.max_concurrent: 8 trials × 2 workers do not fit on 2 CPUs"):
        plan_trial_resources(spec(scale={"workers": 2}, tune={"max_concurrent": 8}), {"CPU": 2}, [{"CPU": 2}])


def test_pbt_mutates_only_what_a_donor_checkpoint_allows():
    s = spec(train={"eval_every": 2, "checkpoint_every": 8},
             tune={"scheduler": {"name": "pbt"}, "space": {"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]},
                                                           "model.options.hidden": {"grid": [4, 8]}}})
    assert set(pbt_mutations(s)) == {"train.optimizer.lr"}  # the grid axis is copied from the donor, never mutated
    assert pbt_ready(s).train.checkpoint_every == 2  # every report hands Tune a checkpoint to clone
    bad = spec(tune={"scheduler": {"name": "pbt"}, "space": {"model.options.hidden": {"choice": [4, 8]}}})
    with pytest.raises(SpecError, match=r"tune.space.model.options.hidden: PBT continues a donor's checkpoint"):
        pbt_mutations(bad)


def test_a_restored_optimizer_takes_the_specs_hyperparameters(tmp_path):
    """What a PBT exploit needs: the donor's optimizer state (moments, step) with the perturbed lr;
    for a plain resume (same spec) the lr is exactly the saved one."""
    from raygen.spec.schema import OptimizerSpec, ScheduleSpec
    from raygen.train.optim import build_optimizer, build_scheduler
    from raygen.train.strategy import DDPStrategy

    def strategy(lr: float) -> DDPStrategy:
        torch.manual_seed(0)
        s = DDPStrategy(precision="fp32", grad_accum=1, loss_scale_floor=1.0, initial_loss_scale=1.0)
        s.setup(torch.nn.Linear(3, 2), lambda p: build_optimizer(p, OptimizerSpec(name="adam", lr=lr), 32),
                lambda o: build_scheduler(o, ScheduleSpec(name="warmup_cosine", warmup_steps=2), 10))
        return s

    donor = strategy(1e-2)
    for _ in range(4):
        donor.optimizer.zero_grad()
        donor.generator.weight.sum().backward()
        donor.optimizer.step()
        donor.scheduler.step()
    donor.save(tmp_path, 0)
    same, perturbed = strategy(1e-2), strategy(3e-3)
    same.load(tmp_path, 0)
    perturbed.load(tmp_path, 0)
    assert same.lr() == donor.lr()  # exact resume
    assert perturbed.scheduler.last_epoch == 4 and perturbed.lr() == pytest.approx(donor.lr() * 0.3)
    moments = perturbed.optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(moments, donor.optimizer.state_dict()["state"][0]["exp_avg"])  # the donor's moments


def test_best_model_becomes_champion_only_if_it_beats_the_champion(tmp_path):
    """The sweep's registration step, on a real MLflow store: version 1 takes the alias
    (nobody held it), a worse best trial does not, a better one does."""
    from raygen.tracking.store import client, open_run
    from raygen.tune.runner import _register_best

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    s = spec(name="champ", tune={"space": {"train.optimizer.lr": {"choice": [1e-3]}}, "metric": "val_loss"})
    decisions = []
    for value in (0.5, 0.7, 0.4):
        run = open_run(uri, "champ", f"trial-{value}")
        run.log_metrics({"val_loss": value})
        run.finish()
        decisions.append(_register_best(s, uri, run.run_id))
    assert [d[0] for d in decisions] == ["models:/champ/1", "models:/champ/2", "models:/champ/3"]
    assert [d[1].split(":")[0] for d in decisions] == ["champion", "not champion", "champion"]
    assert "val_loss 0.7 ≥ 0.5 of champion version 1" in decisions[1][1]
    assert int(client(uri).get_model_version_by_alias("champ", "champion").version) == 3


def test_a_trial_that_trained_nothing_reports_its_checkpoints_metrics(tmp_path):
    """PBT can hand a trial a donor's last checkpoint: the run then trains no step and reports nothing
    while training, yet Tune refuses a last report without the sweep's metric (the whole sweep fails)."""
    from raygen.tune.trial import final_report
    donor = tmp_path / "step-4"
    donor.mkdir()
    (donor / "state.json").write_text(json.dumps({"train_state": {"step": 4},
                                                  "metrics": {"val_loss": 0.25, "loss": 0.3}}))
    final = final_report({}, donor, {}, {})
    assert final["val_loss"] == 0.25 and final["step"] == 4.0
    # what the finished run knows wins over what it reported, which wins over the checkpoint's
    final = final_report({"fid": 3.0, "val_loss": 0.2}, donor, {"val_loss": 0.9, "lr": 1e-3, "loss": 0.4}, {})
    assert (final["val_loss"], final["fid"], final["lr"], final["loss"], final["step"]) == (0.2, 3.0, 1e-3, 0.4, 4.0)
    # no checkpoint at all: the last report's metrics carry over
    assert final_report({}, None, {"val_loss": 0.4}, {})["val_loss"] == 0.4
