"""The cascade through the generic serving path (no serving code knows the family): an exported model with its
components loads, its card and request schema come from its sampling parameters, requests are validated, and
merged batches equal lone requests."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raygen.models import build_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from raygen.exports import export_generator, load_exported
    from raygen.models.cascade import FAMILY
    from raygen.spec import parse_spec

    tmp = tmp_path_factory.mktemp("cascade-serve")
    config, info, comps = FAMILY.debug()["label-window-ckpt"]
    torch.manual_seed(0)
    model = build_model("cascade", config, info, comps)
    paths = {}
    for name, comp in comps.items():  # components are exported first, as the earlier stages' models
        spec = parse_spec({"model": {"family": comp.family, "options": comp.config.model_dump(mode="json")}})
        paths[name] = str(export_generator(tmp / name, comp.state_dict(), spec, comp.data_info))
    spec = parse_spec({"name": "cascade-debug", "model": {"family": "cascade", "options": config.model_dump(mode="json"),
                                                          "components": paths}})
    path = export_generator(tmp / "model", model.state_dict(), spec, info, {"run_id": "run-cascade"})
    return path, load_exported(path)


def test_card_and_requests_come_from_the_family_types(exported):
    from raygen.serving.loading import model_card
    from raygen.serving.requests import RequestError, ServedModel, resolve

    _, loaded = exported
    card = model_card(loaded, name="cas")
    assert card["family"] == "cascade" and card["capabilities"] == ["sample", "train"]
    props = card["params"]["properties"]
    assert {"temperature", "top_k", "top_p", "beam_width", "num_beam", "level_settings", "levels",
            "cond_token", "cache"} <= set(props)
    models = {"cas": ServedModel.from_card(card)}
    plan = resolve({"n": 2, "label": "square", "seed": 4, "level_settings": "0:beam_width=2,num_beam=2"}, models,
                   default_model="cas", max_n=8, reranking="ready", rng_seed=1)
    assert plan.job.condition == 1 and plan.job.params["level_settings"] == "0:beam_width=2,num_beam=2"
    with pytest.raises(RequestError) as err:
        resolve({"n": 1, "level_settings": "0:width=3"}, models, default_model="cas", max_n=8, reranking="ready",
                rng_seed=1)
    assert err.value.field == "level_settings" and 400 <= err.value.status < 500
    with pytest.raises(RequestError) as err:
        resolve({"n": 1, "beam_width": 0}, models, default_model="cas", max_n=8, reranking="ready", rng_seed=1)
    assert err.value.field == "beam_width"


def test_merged_requests_equal_lone_ones(exported):
    from raygen.serving.deployments import BatchSampler
    from raygen.serving.requests import SampleJob

    _, loaded = exported
    model = loaded.model
    params = model.sampling_params(level_settings="1:beam_width=2,num_beam=3,temperature=0.5").model_dump(mode="json")
    jobs = [SampleJob(n=2, seed=3, kind="label", condition=0, params=params),
            SampleJob(n=1, seed=9, kind="label", condition=None, params=params)]
    sampler = BatchSampler(model, name="cas")
    merged = sampler.run(jobs)
    assert sampler.forward_calls == 1 and merged[0]["images"].shape == (2, 16, 16, 1)
    for job, result in zip(jobs, merged):
        assert np.array_equal(result["images"], BatchSampler(model, name="cas").run([job])[0]["images"])


def test_raygen_sample_takes_per_level_settings_and_levels(exported, tmp_path, capsys):
    from PIL import Image

    from raygen.jobs.cli import main

    path, _ = exported
    assert main(["sample", str(path), "--label", "cross", "-n", "3", "--out", str(tmp_path / "base.png"),
                 "--set", "levels=0", "--set", "level_settings=0:beam_width=2,num_beam=2,temperature=0"]) == 0
    assert main(["sample", str(path), "-n", "3", "--out", str(tmp_path / "all.png"), "--set", "temperature=0.7"]) == 0
    assert "wrote 3 image(s)" in capsys.readouterr().out
    assert Image.open(tmp_path / "base.png").size == Image.open(tmp_path / "all.png").size


def test_raygen_sample_sweeps_the_levels_into_one_row_each(exported, tmp_path, capsys):
    """The seed's "output from base / cascade 1 / ...": `--sweep levels=...` draws the same seeds at each level,
    one grid row per level, and row k equals the model's own decoding of level k."""
    from PIL import Image

    from raygen.images import make_grid
    from raygen.jobs.cli import main
    from raygen.models import Conditions, make_generators, parse_params

    path, loaded = exported
    model = loaded.model
    levels = len(model.sample_levels(Conditions("label", (0,)), parse_params(model.sampling_params, {}),
                                     make_generators([0])))
    sweep = ",".join(str(i) for i in range(levels))
    out = tmp_path / "levels.png"
    assert main(["sample", str(path), "--label", "0", "-n", "2", "--seed", "5", "--sweep", f"levels={sweep}",
                 "--set", "temperature=0.7", "--out", str(out)]) == 0
    assert f"wrote {2 * levels} image(s)" in capsys.readouterr().out
    params = parse_params(model.sampling_params, {"temperature": 0.7})
    rows = model.sample_levels(Conditions("label", (0, 0)), params, make_generators([5, 6]))
    info = model.data_info
    expected = make_grid(torch.cat(rows), nrow=2, upscale=max(1, 128 // max(info.height, info.width)))
    assert np.array_equal(np.asarray(Image.open(out)).reshape(expected.shape), expected)
    assert main(["sample", str(path), "--sweep", "levels"]) == 2
    assert "expected PARAM=V1,V2" in capsys.readouterr().err
    assert main(["sample", str(path), "--sweep", "nope=1,2"]) == 2
    assert "'nope' is not a sampling parameter" in capsys.readouterr().err
