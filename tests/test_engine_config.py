"""DeepSpeed config generation, CPU share per worker, run folders, tune spaces."""
from __future__ import annotations

import json

import pytest

from raygen.spec import SpecError, parse_spec
from raygen.train.cluster import ClusterError, cpus_per_worker, ensure_ray
from raygen.train.deepspeed_strategy import build_deepspeed_config
from raygen.train.runner import pick_run_dir
from raygen.tune.space import GRID_KEY, build_param_space, evaluate_filter, grid_points, overrides_from_config

import engine_toys  # noqa: F401


def spec(**sections):
    return parse_spec({"model": {"family": "toy"}, **sections})


def test_deepspeed_config_from_spec():
    s = spec(data={"batch_size": 16}, train={"grad_accum": 4, "precision": "bf16", "clip": {"norm": 0.5}},
             scale={"zero_stage": 3, "offload_optimizer": True, "offload_params": True})
    cfg = build_deepspeed_config(s, world_size=2)
    assert cfg["train_batch_size"] == 16 * 4 * 2 and cfg["gradient_accumulation_steps"] == 4
    # clipping is GradClipHook's under every strategy (train.clip.norm 0.5 here), never DeepSpeed's own
    assert cfg["gradient_clipping"] == 0.0 and cfg["bf16"] == {"enabled": True}
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_fp16_deepspeed_config_has_loss_scale_floor():
    s = spec(train={"precision": "fp16", "loss_scale_floor": 128}, scale={"use_gpu": True})
    fp16 = build_deepspeed_config(s, 1)["fp16"]
    assert fp16["min_loss_scale"] == 128 and fp16["loss_scale"] == 0 and fp16["initial_scale_power"] == 16


def test_deepspeed_rejects_what_it_cannot_do():
    with pytest.raises(SpecError, match="train.precision: fp16 with DeepSpeed needs a GPU"):
        build_deepspeed_config(spec(train={"precision": "fp16"}), 1)
    # clipping by value works under DeepSpeed too (tests/test_engine_events.py): no error
    assert build_deepspeed_config(spec(train={"clip": {"value": 1.0}}), 1)["gradient_clipping"] == 0.0


def test_user_deepspeed_json_is_merged_and_checked(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "train_micro_batch_size_per_gpu": 64}))
    ok = build_deepspeed_config(spec(data={"batch_size": 64}, scale={"deepspeed_config": str(user)}), 2)
    assert ok["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    with pytest.raises(SpecError, match="contradicts data.batch_size"):
        build_deepspeed_config(spec(data={"batch_size": 32}, scale={"deepspeed_config": str(user)}), 2)
    user.write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        build_deepspeed_config(spec(scale={"deepspeed_config": str(user)}), 2)
    with pytest.raises(SpecError, match="file not found"):
        build_deepspeed_config(spec(scale={"deepspeed_config": str(tmp_path / "nope.json")}), 2)


def test_cpu_share_leaves_room_for_data():
    assert cpus_per_worker(None, 2, 2) == 0.5  # the 2-core case that hangs at 1 CPU per worker
    assert cpus_per_worker(None, 2, 16) == 7.0
    assert cpus_per_worker(0.25, 2, 2) == 0.25
    with pytest.raises(SpecError, match="scale.cpus_per_worker"):
        cpus_per_worker(2, 2, 2)
    with pytest.raises(SpecError, match="scale.workers"):
        cpus_per_worker(None, 40, 2)


def test_unreachable_cluster_is_a_clear_error(monkeypatch):
    import ray
    if ray.is_initialized():
        pytest.skip("a Ray session is already up in this process")
    with pytest.raises(ClusterError, match="cannot reach the Ray cluster at '127.0.0.1:1'"):
        ensure_ray("127.0.0.1:1")


def test_run_folders_are_unique_and_resume_takes_newest(tmp_path):
    s = spec(run_dir=str(tmp_path), name="exp")
    assert pick_run_dir(s, False) == tmp_path / "exp"
    (tmp_path / "exp").mkdir()
    assert pick_run_dir(s, False) == tmp_path / "exp-2"
    (tmp_path / "exp-2").mkdir()
    (tmp_path / "exp-10").mkdir()
    (tmp_path / "expanded").mkdir()
    assert pick_run_dir(s, True) == tmp_path / "exp-10"
    assert pick_run_dir(s, False) == tmp_path / "exp-11"
    with pytest.raises(SpecError, match="no earlier run named 'other'"):
        pick_run_dir(spec(run_dir=str(tmp_path), name="other"), True)


def test_tune_grid_with_filter_like_the_seeds():
    s = spec(tune={"space": {"model.options.hidden": {"grid": [4, 8]}, "train.grad_accum": {"grid": [2, 4, 8]},
                             "train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}},
                   "filter": "${train.grad_accum} <= ${model.options.hidden}"})
    points = grid_points(s.tune)
    assert points == [{"model.options.hidden": 4, "train.grad_accum": 2}, {"model.options.hidden": 4, "train.grad_accum": 4},
                      {"model.options.hidden": 8, "train.grad_accum": 2}, {"model.options.hidden": 8, "train.grad_accum": 4},
                      {"model.options.hidden": 8, "train.grad_accum": 8}]
    space = build_param_space(s.tune)
    assert set(space) == {"train.optimizer.lr", GRID_KEY}
    cfg = {"train.optimizer.lr": 0.001, GRID_KEY: points[0]}
    assert overrides_from_config(cfg) == {"train.optimizer.lr": 0.001, **points[0]}


def test_filter_evaluator_is_safe_and_checked():
    assert evaluate_filter("${a} * 2 <= ${b} and not ${c}", {"a": 2, "b": 4, "c": False})
    with pytest.raises(SpecError, match="tune.filter"):
        evaluate_filter("__import__('os').system('true')", {})
    with pytest.raises(SpecError, match="not grid axes"):
        grid_points(spec(tune={"space": {"train.steps": {"choice": [1, 2]}}, "filter": "${train.steps} > 1"}).tune)
    with pytest.raises(SpecError, match="rejects every grid point"):
        grid_points(spec(tune={"space": {"train.steps": {"grid": [1, 2]}}, "filter": "${train.steps} > 5"}).tune)


def test_worker_config_is_typed_and_round_trips_through_a_plain_dict(tmp_path):
    """The driver hands Ray a plain dict; the worker parses it back into the typed config."""
    from raygen.models.base import DataInfo
    from raygen.train.worker import WorkerConfig

    cfg = WorkerConfig(spec=spec(train={"steps": 7}), data_info=DataInfo(channels=1, resolution=8, num_classes=10),
                       run_dir=tmp_path / "run", resume_from=tmp_path / "run" / "checkpoints" / "step-00000004",
                       stop_after=5, threads_per_worker=2, family_sources=("/x/family.py",))
    raw = cfg.to_dict()
    assert json.loads(json.dumps(raw)) == raw  # nothing but plain values travel through Ray
    back = WorkerConfig.from_dict(raw)
    assert back == cfg and back.spec.train.steps == 7 and back.resume_from.name == "step-00000004"
    with pytest.raises(ValueError, match=r"unknown keys \['resume'\]"):
        WorkerConfig.from_dict({**raw, "resume": True})
    with pytest.raises(ValueError, match=r"missing keys \['spec'\]"):
        WorkerConfig.from_dict({k: v for k, v in raw.items() if k != "spec"})
    with pytest.raises(Exception):
        cfg.stop_after = 6  # frozen
