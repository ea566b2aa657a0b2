"""One dataset, one domain extractor: training and the CLI fit the same net, and
the real-vs-real FID floor comes with every FID the training path reports."""
import json
import types

import pytest
import torch
from safetensors.torch import load_file

from raygen.jobs.cli import main
from raygen.metrics.imageio import load_dataset_images, write_image_folder

STEPS = 20  # tiny: the point is equality, not quality
# what the FID code asks of a model when `generate` is replaced: its condition kind
LABEL_MODEL = types.SimpleNamespace(condition_kind="label")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A spec on the digits dataset (8x8, prepared by ensure_dataset as `raygen train` does) and its folder."""
    from raygen.data import ensure_dataset
    from raygen.spec import parse_spec

    root = tmp_path_factory.mktemp("paths")
    spec = parse_spec({
        "name": "paths", "run_dir": str(root / "runs"),
        "data": {"dataset": "digits", "root": str(root / "data"), "resolution": 8, "channels": 1, "count": 600},
        "track": {"fid": {"fit_steps": STEPS, "samples": 64}},
    })
    return spec, ensure_dataset(spec.data)


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "weights.safetensors"))


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_training_and_cli_fit_the_same_net(prepared, tmp_path, capsys):
    from raygen.train.wrapup import dataset_extractor

    spec, data_dir = prepared
    trained = dataset_extractor(spec, data_dir)
    assert trained.training["steps"] == STEPS and trained.path.parent.name == "fid-cache"

    # `raygen metrics fid` against the val split (what the quickstart's second id came from), with its own
    # cache and another torch thread count in the calling process: it must fit, not find, the same net
    val, _, _ = load_dataset_images(data_dir, "val")
    write_image_folder(val[:32], tmp_path / "gen")
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads == 1 else 1)
    try:
        rc = main(["metrics", "fid", "--generated", str(tmp_path / "gen"), "--reference", str(data_dir),
                   "--split", "val", "--extractor", "domain", "--cache-dir", str(tmp_path / "cli-cache"),
                   "--fit-steps", str(STEPS), "--kid-subsets", "5"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["extractor"] == trained.name
    cli_folder = tmp_path / "cli-cache" / f"domain-{trained.id}"
    assert cli_folder.is_dir() and _same_weights(trained.path, cli_folder)

    # `raygen metrics fit-features` on the same folder: same id, same weights
    assert main(["metrics", "fit-features", str(data_dir), "--out", str(tmp_path / "feat"),
                 "--steps", str(STEPS)]) == 0
    assert f"domain:{trained.id}" in capsys.readouterr().out
    assert _same_weights(trained.path, tmp_path / "feat")


def test_a_perfect_generator_scores_the_floor(prepared, monkeypatch):
    """compute_run_fid reports the floor (n train images against the n val images), cached once."""
    import raygen.train.wrapup as wrapup
    from raygen.data import load_split_images

    spec, data_dir = prepared
    n = spec.track.fid.samples
    train = load_split_images(data_dir, "train", spec.data, limit=n)["image"]
    # a "model" that reproduces exactly the train images the floor uses
    monkeypatch.setattr(wrapup, "generate", lambda model, records, *args, **kwargs: train[:len(records["image"])])
    first = wrapup.compute_run_fid(spec, LABEL_MODEL, data_dir, n)
    assert first["fid_floor"] > 0 and first["fid"] == pytest.approx(first["fid_floor"], rel=1e-9)
    cache = data_dir.parent / "fid-cache"
    assert len(list(cache.glob("floor-*.json"))) == 1 and len(list(cache.glob("ref-*.safetensors"))) == 1
    # a generator of noise sits far above the floor; the floor itself is read back, unchanged
    monkeypatch.setattr(wrapup, "generate", lambda model, records, *args, **kwargs:
                        torch.rand(len(records["image"]), *train.shape[1:], generator=torch.Generator().manual_seed(0)))
    noise = wrapup.compute_run_fid(spec, LABEL_MODEL, data_dir, n)
    assert noise["fid_floor"] == first["fid_floor"] and noise["fid"] > 10 * noise["fid_floor"]
    assert len(list(cache.glob("floor-*.json"))) == 1


def test_fid_hook_logs_and_prints_the_floor(prepared, monkeypatch, capsys):
    import types

    import raygen.train.wrapup as wrapup
    from raygen.spec import parse_spec
    from raygen.train.fid_hook import FIDHook

    spec, data_dir = prepared
    spec = parse_spec({**spec.model_dump(), "track": {"fid": {"fit_steps": STEPS, "samples": 64, "every": 2}}})
    logged = []
    sink = types.SimpleNamespace(set_tags=lambda tags: None, log_metrics=lambda values, step: logged.append((step, values)))
    trainer = types.SimpleNamespace(rank=0, state=types.SimpleNamespace(step=0), eval_weights=lambda: None,
                                    eval_model=lambda: LABEL_MODEL)
    hook = FIDHook(spec, sink, data_dir)
    hook.on_train_start(trainer)
    assert logged == [(0, {"fid_floor": hook.floor})] and hook.floor > 0
    assert f"floor {hook.floor:.2f}" in capsys.readouterr().out
    noise = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(wrapup, "generate", lambda model, records, *args, **kwargs: noise[:len(records["image"])])
    trainer.state.step = 2
    metrics = {}
    hook.on_step_end(trainer, metrics)
    assert metrics["fid_floor"] == hook.floor and metrics["fid"] > 10 * hook.floor
    assert logged[-1][0] == 2 and logged[-1][1]["fid_floor"] == hook.floor
    assert f"(floor {hook.floor:.2f}," in capsys.readouterr().out


def test_fit_seconds_fails_naming_fit_steps():
    from raygen.metrics.domain import DomainFitConfig
    from raygen.spec import parse_spec
    from raygen.spec.errors import SpecError
    from raygen.spec.schema import FIDSpec

    with pytest.raises(SpecError, match=r"track\.fid: fit_seconds .*replaced by fit_steps"):
        parse_spec({"track": {"fid": {"fit_seconds": 30}}})
    assert FIDSpec().fit_steps == DomainFitConfig().steps  # the spec's default is the library's


@pytest.mark.parametrize("argv, replacement", [
    (["metrics", "fid", "--generated", "g", "--reference", "r", "--fit-seconds", "30"], "--fit-steps"),
    (["metrics", "fit-features", "d", "--out", "o", "--max-seconds", "30"], "--steps"),
])
def test_old_time_flags_fail_naming_the_step_flag(argv, replacement, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"was replaced by {replacement}" in capsys.readouterr().err
