"""Training the renderer on the engine: correct validation (a sum weighted by
counts, the same with 2 workers as in one process) and disjoint train/val
scenes (issue 14 item 9; seed 002: "test loss reporting was wrong for days")."""
from __future__ import annotations

import pytest
import torch

from raygen.models import build_model
from raygen.models.renderer import RendererConfig
from raygen.train.validation import validation_metrics, validation_sums


@pytest.fixture(scope="module")
def spheres(tmp_path_factory):
    from raygen.data import prepare_dataset
    root = tmp_path_factory.mktemp("spheres")
    manifest = prepare_dataset("spheres", root / "spheres", resolution=8, count=150, max_spheres=3)
    assert manifest.splits["val"].rows == 17  # odd: 2 workers get 8 and 9 rows
    return root


def _split(root, split):
    from raygen.data import load_split_images
    from raygen.spec import parse_spec
    spec = parse_spec({"data": {"dataset": str(root / "spheres"), "root": str(root), "resolution": 8,
                                "channels": 3}, "model": {"family": "renderer"}})
    return load_split_images(root / "spheres", split, spec.data)


def _scene_keys(records) -> set[bytes]:
    return {records["scene"][i][records["scene_mask"][i]].numpy().tobytes()
            + records["scene_globals"][i].numpy().tobytes() for i in range(len(records["image"]))}


def test_train_and_val_scenes_are_disjoint(spheres):
    train, val = _split(spheres, "train"), _split(spheres, "val")
    train_keys, val_keys = _scene_keys(train), _scene_keys(val)
    assert len(train_keys) == len(train["image"]) and len(val_keys) == len(val["image"])  # no repeats either
    assert not train_keys & val_keys


def _batches(records, size):
    cols = ("image", "scene", "scene_mask", "scene_globals")
    return [{k: records[k][i:i + size] for k in cols} for i in range(0, len(records["image"]), size)]


def test_validation_is_a_sum_weighted_by_counts(spheres):
    val = _split(spheres, "val")
    torch.manual_seed(0)
    model = build_model("renderer", RendererConfig.debug(), _info(spheres)).eval()
    batches = _batches(val, 5)  # 5, 5, 5, 2
    with torch.no_grad():
        whole = float(model.training_step(_batches(val, 17)[0])["loss"])
        mean_of_means = sum(float(model.training_step(b)["loss"]) for b in batches) / len(batches)
    got = validation_metrics(validation_sums(model, batches))["val_loss"]
    assert got == pytest.approx(whole, rel=1e-6)
    assert mean_of_means != pytest.approx(whole, rel=1e-4)  # the bug this guards against would show


def test_each_worker_validates_its_share_and_the_sums_give_the_single_process_loss(spheres):
    """What 2 (or 3) Ray workers do, without Ray: each validates the val rows the pipeline's
    deterministic split gives its rank, the sums are added (the all-reduce), and the result
    is the single-process loss over the whole split. Train shards stay equal (DDP steps)."""
    from raygen.data.decode import DecodeParams
    from raygen.data.manifest import read_manifest
    from raygen.data.pipeline import make_recipe
    from raygen.spec import parse_spec

    spec = parse_spec({"data": {"dataset": str(spheres / "spheres"), "root": str(spheres), "resolution": 8,
                                "channels": 3}, "model": {"family": "renderer"}})
    manifest = read_manifest(spheres / "spheres")
    params = DecodeParams.for_spec(manifest, spec.data)
    val_recipe, train_recipe = make_recipe(manifest, "val", params), make_recipe(manifest, "train", params)
    val = _split(spheres, "val")
    torch.manual_seed(0)
    model = build_model("renderer", RendererConfig.debug(), _info(spheres)).eval()
    single = validation_metrics(validation_sums(model, _batches(val, 17)))["val_loss"]
    for world in (2, 3):
        ranges = [val_recipe.rank_range(r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == 17 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        train_sizes = {hi - lo for lo, hi in (train_recipe.rank_range(r, world) for r in range(world))}
        assert len(train_sizes) == 1
        total = torch.zeros(3, dtype=torch.float64)
        for lo, hi in ranges:
            mine = (val["index"] >= lo) & (val["index"] < hi)
            share = {k: val[k][mine] for k in ("image", "scene", "scene_mask", "scene_globals")}
            total += validation_sums(model, _batches(share, 4))
        assert validation_metrics(total)["val_loss"] == pytest.approx(single, rel=1e-6)  # float32 batch losses


def _info(root):
    from raygen.data.manifest import read_manifest
    from raygen.spec import parse_spec
    spec = parse_spec({"data": {"dataset": str(root / "spheres"), "root": str(root), "resolution": 8,
                                "channels": 3}, "model": {"family": "renderer"}})
    return read_manifest(root / "spheres").data_info(spec.data)


@pytest.mark.slow
@pytest.mark.timeout(600)  # Ray's start-up alone took minutes on a loaded 2-core machine
def test_two_workers_report_the_single_process_val_loss(ray_session, spheres, tmp_path):
    from raygen.exports import load_exported
    from raygen.spec import parse_spec
    from raygen.tracking.store import client
    from raygen.train.runner import run_training

    spec = parse_spec({
        "name": "renderer-val", "run_dir": str(tmp_path / "runs"),
        "data": {"dataset": str(spheres / "spheres"), "root": str(spheres), "resolution": 8, "channels": 3,
                 "batch_size": 4},
        "model": {"family": "renderer", "options": RendererConfig.debug().model_dump(mode="json")},
        "train": {"steps": 4, "eval_every": 4, "checkpoint_every": 4, "val_batches": 100, "grid_samples": 4,
                  "log_every": 1, "ema": {"enabled": False}},
        "scale": {"workers": 2, "strategy": "ddp"},
        "track": {"fid": {"enabled": False}, "register_model": False},
    })
    result = run_training(spec, progress=False)
    logged = client(result.tracking_uri).get_metric_history(result.run_id, "val_loss")
    reported = [m.value for m in logged if m.step == 4]
    assert reported, "no val_loss at the last step"
    model = load_exported(result.checkpoint / "export").model.eval()  # the weights validated at step 4
    single = validation_metrics(validation_sums(model, _batches(_split(spheres, "val"), 7)))["val_loss"]
    assert reported[-1] == pytest.approx(single, rel=1e-5)
