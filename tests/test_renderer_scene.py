"""Scenes as a typed condition for the renderer: request checks (unknown
fields, out-of-range values, too many spheres name the field), `raygen sample
--scene scene.json`, and the PSNR/SSIM fidelity metric against the procedural
renderer (issue 14 items 10 and 11)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raygen.models import ConditionError, Conditions
from raygen.models.renderer import spheres_info

from test_renderer_model import valid_scene

INFO = spheres_info(8, max_spheres=3)


def refused(scene) -> ConditionError:
    with pytest.raises(ConditionError) as err:
        Conditions.parse("scene", [scene], INFO)
    assert "\n" not in err.value.message
    return err.value


@pytest.mark.parametrize("edit, field, words", [
    (lambda s: s["objects"][0].update(colour=1.0), "scene.objects[0].colour", "unknown ['colour']"),
    (lambda s: s["objects"][1].update(radius=5.0), "scene.objects[1].radius", "outside the trained range [0.3, 0.9]"),
    (lambda s: s["objects"][0].update(z=float("nan")), "scene.objects[0].z", "finite number"),
    (lambda s: s["objects"][0].update(r="red"), "scene.objects[0].r", "must be a finite number"),
    (lambda s: s["objects"][0].pop("shininess"), "scene.objects[0].shininess", "missing ['shininess']"),
    (lambda s: s["globals"].update(ambient=0.9), "scene.globals.ambient", "outside the trained range [0.05, 0.2]"),
    (lambda s: s["objects"].extend(s["objects"] * 2), "scene.objects", "1..3 objects, got 6"),
    (lambda s: s.update(camera=1), "scene", "unknown keys ['camera']"),
])
def test_a_bad_scene_names_its_field(edit, field, words):
    scene = valid_scene(2)
    edit(scene)
    err = refused(scene)
    assert err.field == field and words in err.message, (err.field, err.message)


def test_every_generated_scene_is_accepted():
    from raygen.data.sources.spheres import GLOBAL_FIELDS, SPHERE_FIELDS, random_scene
    for seed in range(300):  # float32 roundings of values drawn at the range ends included
        s = random_scene(np.random.default_rng(seed), 3)
        scene = {"objects": [dict(zip(SPHERE_FIELDS, map(float, row))) for row in s.spheres],
                 "globals": dict(zip(GLOBAL_FIELDS, map(float, s.globals)))}
        (rows, glob), = Conditions.parse("scene", [scene], INFO).values
        assert torch.equal(rows, torch.from_numpy(s.spheres)) and torch.equal(glob, torch.from_numpy(s.globals))


# ------------------------------------------------------------ raygen sample --scene
@pytest.fixture(scope="module")
def renderer_export(tmp_path_factory):
    from raygen.data import prepare_dataset
    from raygen.exports import export_generator
    from raygen.models import build_model
    from raygen.models.renderer import RendererConfig
    from raygen.spec import parse_spec

    root = tmp_path_factory.mktemp("renderer")
    manifest = prepare_dataset("spheres", root / "spheres", resolution=8, count=40, max_spheres=3)
    spec = parse_spec({"name": "rend", "run_dir": str(root / "runs"),
                       "data": {"dataset": str(root / "spheres"), "root": str(root), "resolution": 8, "channels": 3},
                       "model": {"family": "renderer", "options": RendererConfig.debug().model_dump(mode="json")}})
    info = manifest.data_info(spec.data)
    torch.manual_seed(0)
    model = build_model("renderer", spec.model.config, info)
    return export_generator(root / "model", model.state_dict(), spec, info, meta={"step": 0}), root


def test_sample_renders_a_scene_file(renderer_export, tmp_path, capfd):
    from PIL import Image

    from test_cli_commands import run_cli
    model, _ = renderer_export
    (tmp_path / "scene.json").write_text(json.dumps(valid_scene(2)))
    grid = tmp_path / "grid.png"
    rc, out, err = run_cli(capfd, "sample", model, "--scene", tmp_path / "scene.json", "-n", 2, "--out", grid)
    assert rc == 0, err
    assert f"wrote 2 image(s) to {grid}" in out and Image.open(grid).size[0] > 8
    again = tmp_path / "again.png"
    rc, _, err = run_cli(capfd, "sample", model, "--scene", json.dumps(valid_scene(2)), "-n", 2, "--out", again)
    assert rc == 0 and again.read_bytes() == grid.read_bytes()  # a render is a function of the scene


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s["objects"][0].update(radius=3.0),
     "--scene.objects[0].radius: scene.objects[0].radius is 3.0, outside"),
    (lambda s: s["objects"].extend(s["objects"] * 3), "--scene.objects: scene.objects must hold 1..3 objects, got 8"),
    (lambda s: s["objects"][1].update(size=1), "unknown ['size']"),
])
def test_sample_refuses_a_bad_scene_in_one_line(renderer_export, tmp_path, capfd, edit, needle):
    from test_cli_commands import assert_user_error
    model, _ = renderer_export
    scene = valid_scene(2)
    edit(scene)
    (tmp_path / "bad.json").write_text(json.dumps(scene))
    assert_user_error(capfd, ["sample", model, "--scene", tmp_path / "bad.json"], needle)
    assert_user_error(capfd, ["sample", model, "--scene", tmp_path / "missing.json"], "--scene: no such file")


# ------------------------------------------------------------ fidelity: PSNR and SSIM
def test_ssim_and_psnr_against_the_procedural_renderer(renderer_export):
    from raygen.data import load_split_images
    from raygen.data.sources.spheres import render_spheres
    from raygen.exports import load_exported
    from raygen.metrics import fidelity_metrics, ssim_per_image
    from raygen.train.wrapup import generate, scene_fidelity

    model_dir, root = renderer_export
    spec = load_exported(model_dir).spec
    val = load_split_images(root / "spheres", "val", spec.data)
    # the stored val images are the ground-truth renderer's images of the stored scenes
    for i in range(len(val["image"])):
        rows = val["scene"][i][val["scene_mask"][i]].numpy()
        truth = render_spheres({"scene": rows, "scene_globals": val["scene_globals"][i].numpy()}, 8)
        assert np.array_equal((val["image"][i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), truth)
    ref = val["image"]
    assert ssim_per_image(ref, ref).allclose(torch.ones(len(ref), dtype=torch.float64))
    noisy = (ref + 0.1 * torch.randn_like(ref)).clamp(0, 1)
    worse = (ref + 0.3 * torch.randn_like(ref)).clamp(0, 1)
    a, b = fidelity_metrics(ref, noisy), fidelity_metrics(ref, worse)
    assert 1 > a["ssim"] > b["ssim"] and a["psnr"] > b["psnr"] > 0
    model = load_exported(model_dir).model.eval()
    fake = generate(model, val, seed=1)
    got = scene_fidelity(model, val, fake)
    assert set(got) == {"scene_psnr", "scene_ssim"} and got == {f"scene_{k}": v for k, v in
                                                                 fidelity_metrics(ref, fake).items()}


# ------------------------------------------------------------ the generic HTTP request path
@pytest.mark.parametrize("edit, field", [
    (lambda s: s["objects"][0].update(radius=2.0), "scene.objects[0].radius"),
    (lambda s: s["objects"][1].update(colour=1.0), "scene.objects[1].colour"),
    (lambda s: s["objects"].extend(s["objects"] * 2), "scene.objects"),
    (lambda s: s["globals"].update(light_z=1.0), "scene.globals.light_z"),
])
def test_a_bad_scene_request_is_a_4xx_naming_the_field(renderer_export, edit, field):
    import jsonschema

    from raygen.exports import load_exported
    from raygen.serving.loading import model_card
    from raygen.serving.requests import RequestError, ServedModel, resolve

    card = model_card(load_exported(renderer_export[0]), name="renderer")
    served = {"renderer": ServedModel.from_card(card)}
    jsonschema.validate(valid_scene(2), card["condition"]["schema"])  # the OpenAPI schema takes a good scene
    plan = resolve({"scene": valid_scene(2), "n": 2}, served, default_model="renderer", max_n=8, reranking="off")
    assert plan is not None
    scene = valid_scene(2)
    edit(scene)
    with pytest.raises(RequestError) as err:
        resolve({"scene": scene}, served, default_model="renderer", max_n=8, reranking="off")
    assert 400 <= err.value.status < 500 and err.value.field == field, (err.value.status, err.value.field)


def test_a_scene_as_json_text_parses_like_the_object():
    as_text = Conditions.parse("scene", [json.dumps(valid_scene(2))], INFO).values[0]
    as_object = Conditions.parse("scene", [valid_scene(2)], INFO).values[0]
    assert all(torch.equal(a, b) for a, b in zip(as_text, as_object))
    assert "not valid JSON" in refused("{objects: ").message
