"""inr's example specs (seed 001's setups and Tune grids) and `raygen sample` reaching sampling and
reconstruct-at-size."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raygen.jobs.cli import main
from raygen.models import DataInfo, build_model
from raygen.models.inr import INRConfig
from raygen.spec import load_spec, parse_spec
from raygen.tune.space import grid_points

SPECS = Path(__file__).resolve().parent.parent / "jobs" / "specs"


def _options(point: dict, base: dict) -> dict:
    """The model options of one grid point (dotted keys under model.options)."""
    import copy
    out = copy.deepcopy(base)
    for key, value in point.items():
        *path, last = key.split(".")[2:]
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def test_the_kali_spec_is_the_seeds_small_dataset_setup():
    spec = load_spec(SPECS / "inr_kali.yaml")
    assert spec.model.family == "inr" and spec.data.dataset == "kali" and spec.data.count == 300
    assert spec.data.augment.hflip and spec.data.augment.vflip
    model = build_model("inr", spec.model.config, DataInfo(channels=1, resolution=32))
    assert sum(p.numel() for p in model.encoder.parameters()) == 1_725_264  # the seed's printed encoder count
    assert sum(p.numel() for p in model.decoder.parameters()) == 42_497    # and its decoder count


def test_the_search_spec_is_the_seeds_transformer_matrix_with_its_filter():
    spec = load_spec(SPECS / "inr_search.yaml")
    points = grid_points(spec.tune)
    assert len(points) == (2 + 3) * 5 * 2 * 3  # patch 4: stride 2, 4; patch 8: stride 2, 4, 8
    key = "model.options.transformer."
    assert all(p[key + "stride"] <= p[key + "patch"] for p in points)
    base = spec.model.options
    for point in points:  # every trial's options are valid
        INRConfig.model_validate(_options(point, base))
    info = DataInfo(channels=1, resolution=28)
    pairs = {(p[key + "patch"], p[key + "stride"]) for p in points}
    for patch, stride in sorted(pairs):  # every patch/stride builds on 28 px (1 layer, to stay quick)
        options = _options({key + "patch": patch, key + "stride": stride, key + "layers": 1}, base)
        model = build_model("inr", options, info).eval()
        assert model.encode(torch.rand(2, 1, 28, 28)).shape == (2, 78)


def test_the_encoders_spec_compares_three_encoders_and_four_constraint_factors():
    spec = load_spec(SPECS / "inr_encoders.yaml")
    points = grid_points(spec.tune)
    assert {p["model.options.encoder"] for p in points} == {"cnn", "resnet18", "dalle"}
    assert sorted({p["model.options.constraint"] for p in points}) == [0.0, 1e-4, 1e-3, 0.1]
    assert len(points) == 12
    assert spec.data.augment.hflip and spec.data.augment.vflip and spec.data.augment.shift == 4
    info = DataInfo(channels=3, resolution=32)
    for encoder in ("cnn", "resnet18", "dalle"):
        model = build_model("inr", _options({"model.options.encoder": encoder}, spec.model.options), info).eval()
        assert model.encode(torch.rand(2, 3, 32, 32)).shape == (2, 102)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from raygen.exports import export_generator
    tmp = tmp_path_factory.mktemp("inr")
    config, info = INRConfig.debug(), DataInfo(channels=1, resolution=8)
    torch.manual_seed(0)
    model = build_model("inr", config, info).eval()
    spec = parse_spec({"model": {"family": "inr", "options": config.model_dump(mode="json")}})
    export_generator(tmp / "model", model.state_dict(), spec, info, {"step": 0})
    image = tmp / "in.png"
    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)).save(image)
    return tmp, model, image


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_raygen_sample_reconstructs_an_image_at_a_requested_size(exported, capsys):
    from raygen.images import save_grid
    from raygen.models.conditions import decode_image
    tmp, model, image = exported
    out = tmp / "recon.png"
    assert main(["sample", str(tmp / "model"), "-n", "1", "--image", str(image), "--size", "16x24",
                 "--out", str(out)]) == 0
    expected = model.reconstruct(decode_image(image.read_bytes())[None], 16, 24)
    save_grid(expected, tmp / "expected.png", upscale=max(1, 128 // 24))
    assert np.array_equal(_png(out), _png(tmp / "expected.png"))
    # without --image: codes drawn from N(0, 0.5^2); without --size: the data's size
    assert main(["sample", str(tmp / "model"), "-n", "4", "--out", str(tmp / "drawn.png")]) == 0
    drawn = model.generate(4, seed=0)
    save_grid(drawn, tmp / "drawn-expected.png", upscale=max(1, 128 // 8))
    assert np.array_equal(_png(tmp / "drawn.png"), _png(tmp / "drawn-expected.png"))


def test_raygen_sample_rejects_a_bad_size(exported, capsys):
    tmp, _, image = exported
    assert main(["sample", str(tmp / "model"), "--size", "16y24", "--out", str(tmp / "x.png")]) != 0
    err = capsys.readouterr().err
    assert "--size: expected SIDE or HEIGHTxWIDTH" in err and err.strip().count("\n") == 0


def test_a_training_grid_of_an_image_conditioned_model_reconstructs_validation_images(exported):
    """The trainer's grids condition image models on validation records; a small split gives a smaller grid."""
    from raygen.images import save_grid, upscale_for
    from raygen.train.sampling import sample_grid_png, sample_set
    from raygen.models import Conditions
    tmp, model, _ = exported
    records = {"image": torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))}
    sample_grid_png(model, 16, tmp / "grid.png", val_records=records)
    expected = sample_set(model, Conditions("image", tuple(records["image"])), seed=0)
    assert torch.allclose(expected, model.reconstruct(records["image"]), atol=1e-6)
    save_grid(expected, tmp / "grid-expected.png", upscale=upscale_for(8, 8))
    assert np.array_equal(_png(tmp / "grid.png"), _png(tmp / "grid-expected.png"))


def test_the_generic_serving_path_reconstructs_an_uploaded_image(exported):
    """No server: the ingress's request parsing and a replica's batcher, as `raygen serve` runs them."""
    import base64

    from raygen.exports import load_generator
    from raygen.images import to_uint8
    from raygen.models.conditions import decode_image
    from raygen.serving.deployments import BatchSampler
    from raygen.serving.loading import model_card
    from raygen.serving.requests import RequestError, ServedModel, resolve
    tmp, model, image = exported
    loaded = load_generator(str(tmp / "model"), None)
    served = ServedModel.from_card(model_card(loaded, name="inr"), loaded.model.sampling_params)
    png = base64.b64encode(image.read_bytes()).decode()
    plan = resolve({"image": png, "n": 2, "seed": 3}, {"inr": served}, default_model="inr", max_n=4, reranking="off")
    out = BatchSampler(loaded.model, name="inr").run([plan.job])[0]
    expected = to_uint8(model.reconstruct(decode_image(image.read_bytes())[None]).expand(2, -1, -1, -1))
    assert np.array_equal(out["images"], expected) and out["seeds"] == [3, 4]
    # interpolation rides on the sampling parameters: mix 1 gives the `toward` image's reconstruction
    plan = resolve({"image": png, "toward": png, "mix": 1.0}, {"inr": served}, default_model="inr", max_n=4,
                   reranking="off")
    assert np.array_equal(BatchSampler(loaded.model, name="inr").run([plan.job])[0]["images"], expected[:1])
    with pytest.raises(RequestError, match="needs an input image"):
        resolve({"n": 1}, {"inr": served}, default_model="inr", max_n=4, reranking="off")


def test_the_generic_serving_path_renders_at_a_requested_size(exported):
    """height/width (and OpenAI's size) reach `render` for a model that can render at any size."""
    import base64

    from raygen.exports import load_generator
    from raygen.images import to_uint8
    from raygen.models.conditions import decode_image
    from raygen.serving.deployments import BatchSampler
    from raygen.serving.loading import model_card
    from raygen.serving.openai_images import check_size, size_fields
    from raygen.serving.requests import RequestError, ServedModel, resolve
    tmp, model, image = exported
    loaded = load_generator(str(tmp / "model"), None)
    served = ServedModel.from_card(model_card(loaded, name="inr"), loaded.model.sampling_params)
    png = base64.b64encode(image.read_bytes()).decode()
    models = {"inr": served}
    plan = resolve({"image": png, "height": 16, "width": 24, "seed": 3}, models, default_model="inr", max_n=4,
                   reranking="off")
    assert plan.job.size == (16, 24)
    sampler = BatchSampler(loaded.model, name="inr")
    big, own = sampler.run([plan.job, resolve({"image": png, "seed": 3}, models, default_model="inr", max_n=4,
                                              reranking="off").job])
    expected = to_uint8(model.reconstruct(decode_image(image.read_bytes())[None], 16, 24))
    assert big["images"].shape == (1, 16, 24, 1) and np.array_equal(big["images"], expected)
    assert own["images"].shape == (1, 8, 8, 1)  # another size in the same batch: a forward call of its own
    assert sampler.forward_calls == 2
    # only the height: the width stays the model's own
    assert resolve({"image": png, "height": 32}, models, default_model="inr", max_n=4,
                   reranking="off").job.size == (32, 8)
    with pytest.raises(RequestError, match="at most 1048576 per request") as err:
        resolve({"image": png, "height": 512, "width": 512, "n": 8}, models, default_model="inr", max_n=8,
                reranking="off")
    assert err.value.field == "n"
    # OpenAI's size: WIDTHxHEIGHT
    assert size_fields(check_size("24x16", served), served) == {"width": 24, "height": 16}
    assert size_fields(check_size("auto", served), served) == {}
    with pytest.raises(RequestError, match="WIDTHxHEIGHT"):
        check_size("big", served)


def test_a_model_that_cannot_render_refuses_a_size(tmp_path):
    from raygen.models import DataInfo, build_model
    from raygen.models.seqimg import SeqImgConfig
    from raygen.serving.requests import RequestError, ServedModel
    from raygen.serving.requests import render_size
    info = DataInfo(channels=1, resolution=8)
    model = build_model("seqimg", SeqImgConfig.debug(), info)
    card = {"name": "s", "family": "seqimg", "capabilities": sorted(c.value for c in model.capabilities),
            "data": info.to_dict(), "condition": {"kind": "none"}}
    served = ServedModel.from_card(card, model.sampling_params)
    assert render_size(served, None, None, 1) is None
    with pytest.raises(RequestError, match=r"cannot render at another size \(families that can: .*inr") as err:
        render_size(served, 16, None, 1)
    assert err.value.field == "height"
