"""`raygen spec validate` answers "will this run?" with the very checks
`raygen train` and `raygen tune` make (raygen.spec.checks.check_runnable):
every spec they reject, validate rejects with the same words, and nothing
starts (no Ray, no data, no run folder) before the rejection."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from raygen.jobs.cli import main
from raygen.spec import load_spec
from raygen.spec.checks import check_runnable
from raygen.spec.errors import SpecError
from raygen.spec.schema import TuneSpec

BASE = {"name": "chk", "data": {"dataset": "digits", "resolution": 8},
        "model": {"family": "seqimg", "options": {"backbone": "gpt2", "dim": 32, "depth": 1}},
        "train": {"steps": 2}, "track": {"fid": {"enabled": False}}}


def merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# (id, spec changes, the command that rejects it, words the one message must hold)
CASES = [
    ("unknown-space-key", {"tune": {"space": {"model.options.stride": {"grid": [1, 2]}}}}, "tune",
     "tune.space.model.options.stride: unknown key 'stride'"),
    ("filter-not-a-grid-axis", {"tune": {"space": {"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}},
                                         "filter": "${model.options.dim} > 8"}}, "tune",
     "tune.filter: references model.options.dim, which are not grid axes"),
    ("filter-rejects-all", {"tune": {"space": {"model.options.dim": {"grid": [32, 48]}},
                                     "filter": "${model.options.dim} > 64"}}, "tune",
     "rejects every grid point"),
    ("trial-combination", {"tune": {"space": {"model.options.dim": {"grid": [30, 32]}}}}, "tune",
     "tune.space: the trial model.options.dim=30 would fail: model.options: dim (30) must be divisible by heads (4)"),
    ("trial-fp16-deepspeed", {"tune": {"space": {"train.precision": {"grid": ["fp32", "fp16"]}}}}, "tune",
     "tune.space.train.precision: fp16 with DeepSpeed needs a GPU"),
    ("empty-space", {"tune": {"filter": "${model.options.dim} > 8"}}, "tune", "tune.space: empty"),
    ("fp16-deepspeed-cpu", {"train": {"precision": "fp16"}}, "train", "train.precision: fp16 with DeepSpeed needs a GPU"),
    ("deepspeed-config-clips", {"scale": {"deepspeed_config": "ds_clip.json"}}, "train",
     "scale.deepspeed_config: 'gradient_clipping'"),
    ("deepspeed-config-contradicts", {"scale": {"deepspeed_config": "ds.json"}}, "train",
     "scale.deepspeed_config: 'train_micro_batch_size_per_gpu' = 999 contradicts data.batch_size"),
    ("deepspeed-config-missing", {"scale": {"deepspeed_config": "nope.json"}}, "train",
     "scale.deepspeed_config: file not found: nope.json"),
    ("ema-zero3", {"scale": {"zero_stage": 3}}, "train", "train.ema.enabled: EMA needs full weights"),
    # FID's few-step sampler takes the family's own sampling parameters, checked before anything trains
    ("fid-sampling-unknown", {"track": {"fid": {"enabled": True, "sampling": {"num_inference_steps": 10}}}}, "train",
     "track.fid.sampling: unknown sampling parameter 'num_inference_steps'; this model takes:"),
    ("fid-sampling-bad-value", {"track": {"fid": {"enabled": True, "sampling": {"temperature": -1}}}}, "train",
     "track.fid.sampling: temperature:"),
    # Tune needs its metric in every report: FID only where the FID hook runs at each eval/checkpoint step
    # (track.fid.every 0 is fine for a sweep: it measures FID at each report itself, raygen.tune.objective)
    ("fid-objective-off-cadence", {"tune": {"space": {"train.optimizer.lr": {"grid": [1e-3, 2e-3]}},
                                            "objective": {"fid": 1.0, "val_loss": 0.1}},
                                   "train": {"steps": 8, "eval_every": 4, "checkpoint_every": 8},
                                   "track": {"fid": {"enabled": True, "every": 3}}}, "tune",
     "tune.objective: fid is measured every track.fid.every steps (3)"),
    ("fid-metric-off-cadence", {"tune": {"space": {"train.optimizer.lr": {"grid": [1e-3, 2e-3]}}, "metric": "kid"},
                                "train": {"steps": 8, "eval_every": 4, "checkpoint_every": 8},
                                "track": {"fid": {"enabled": True, "every": 8}}}, "tune",
     "at each step of train.eval_every; set track.fid.every to a divisor of them (e.g. 4)"),
    ("fid-metric-fid-disabled", {"tune": {"space": {"train.optimizer.lr": {"grid": [1e-3, 2e-3]}}, "metric": "fid"}},
     "tune", "tune.metric: fid needs track.fid.enabled: true"),
    ("clip-score-metric-no-scorer", {"tune": {"space": {"train.optimizer.lr": {"grid": [1e-3, 2e-3]}},
                                              "metric": "clip_score"}, "track": {"fid": {"enabled": True}}},
     "tune", "tune.metric: clip_score needs a scorer"),
]


def error_of(capfd, argv) -> str:
    capfd.readouterr()
    rc = main([str(a) for a in argv])
    _, err = capfd.readouterr()
    assert rc == 2, (argv, err)
    assert "Traceback" not in err
    m = re.match(rf"raygen {argv[0]}: error: (.*)", err, re.S)
    assert m, err
    return m.group(1).strip()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_validate_rejects_what_train_and_tune_reject_in_the_same_words(case, workdir, capfd):
    _, over, command, words = case
    Path("ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 999}))
    Path("ds_clip.json").write_text(json.dumps({"gradient_clipping": 1.0}))
    spec = Path("spec.yaml")
    spec.write_text(yaml.safe_dump(merged(BASE, over)))
    by_validate = error_of(capfd, ["spec", "validate", spec])
    by_command = error_of(capfd, [command, spec])
    assert words in by_command, by_command
    assert by_validate == by_command
    assert not Path("runs").exists(), "nothing may start before the spec is rejected"


def test_validate_lists_every_problem_and_passes_a_good_sweep(workdir, capfd):
    bad = Path("bad.yaml")
    bad.write_text(yaml.safe_dump(merged(BASE, {"train": {"precision": "fp16"}, "scale": {"zero_stage": 3},
                                               "tune": {"space": {"model.options.stride": {"grid": [1]}}}})))
    lines = error_of(capfd, ["spec", "validate", bad]).splitlines()
    assert lines[0] == "invalid spec:"
    assert any(l.strip().startswith("train.ema.enabled:") for l in lines)
    assert any(l.strip().startswith("train.precision:") for l in lines)
    assert any(l.strip().startswith("tune.space.model.options.stride:") for l in lines)
    good = Path("good.yaml")
    good.write_text(yaml.safe_dump(merged(BASE, {"tune": {"space": {"model.options.dim": {"grid": [32, 48]},
                                                                    "train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}}}})))
    capfd.readouterr()
    assert main(["spec", "validate", str(good)]) == 0
    assert "good.yaml: ok" in capfd.readouterr().out


def test_the_documented_filter_example_selects_grid_points():
    """The example in TuneSpec.filter's description (docs/spec.md) names real
    seqimg options, and is what makes this grid runnable."""
    example = re.search(r"e\.g\. '([^']+)'", TuneSpec.model_fields["filter"].description).group(1)
    keys = re.findall(r"\$\{([^}]+)\}", example)
    assert set(keys) == {"model.options.dim", "model.options.heads"}
    space = {"model.options.dim": {"grid": [32, 48]}, "model.options.heads": {"grid": [4, 5]}}
    without = load_spec(overrides={"tune": {"space": space}, "model": BASE["model"]})
    with pytest.raises(SpecError, match="must be divisible by heads"):
        check_runnable(without, tune=True)
    check_runnable(load_spec(overrides={"tune": {"space": space, "filter": example}, "model": BASE["model"]}), tune=True)


def test_train_ignores_the_sweep_and_tune_ignores_the_base_spec():
    """A sweep's problems are no reason to refuse `raygen train`, and a base
    spec the grid overrides everywhere is no reason to refuse `raygen tune`."""
    spec = load_spec(overrides={**BASE, "train": {"steps": 2, "precision": "fp16"},
                                "tune": {"space": {"train.precision": {"grid": ["fp32", "bf16"]}}}})
    check_runnable(spec, tune=True)
    with pytest.raises(SpecError, match="fp16 with DeepSpeed"):
        check_runnable(spec, tune=False)


def test_pure_fp16_under_deepspeed_warns_and_o1_does_not(capfd):
    """Seed 002: pure fp16 (O2) diverged where autocast (O1) was fine; the O2 option runs, with a warning."""
    from raygen.spec import parse_spec
    from raygen.spec.checks import spec_warnings

    o2 = parse_spec(merged(BASE, {"train": {"precision": "fp16"}, "scale": {"strategy": "deepspeed", "use_gpu": True}}))
    o1 = parse_spec(merged(BASE, {"train": {"precision": "fp16"}, "scale": {"strategy": "ddp"}}))
    [warning] = spec_warnings(o2)
    assert "pure fp16" in warning and "scale.strategy: ddp" in warning and "loss_scale_floor (128)" in warning
    assert spec_warnings(o1) == []
    check_runnable(o2, tune=False)
    assert "raygen: warning: train.precision: fp16 under DeepSpeed" in capfd.readouterr().err
