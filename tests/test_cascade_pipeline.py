"""jobs/specs/cascade_fashion.yaml at debug size, end to end on Ray: autoencoder (train) -> latents (encode) ->
codebooks (fit, with pruning) -> cascade (train on the streamed latents), then sampling from the exported
model, and a rerun that skips every finished stage."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # four Ray Train jobs: several minutes on 2 cores


def debug_pipeline(tmp_path: Path) -> dict:
    """The example spec with its data, sizes and steps shrunk (the stage structure and references kept)."""
    raw = yaml.safe_load((REPO / "jobs/specs/cascade_fashion.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "runs")
    st = raw["stages"]
    small = {"steps": 4, "eval_every": 4, "checkpoint_every": 2, "val_batches": 1, "grid_samples": 4, "log_every": 1}
    track = {"fid": {"enabled": False}, "register_model": False}
    ae = st["autoencoder"]["spec"]
    ae["data"] = {"dataset": "digits", "root": str(tmp_path / "data"), "resolution": 8, "channels": 1, "count": 200,
                  "batch_size": 16, "seed": 3}
    ae["model"]["options"].update(min_channel=4, max_channel=8, num_layers=1, latent_channel=2)
    ae["train"].update(small)
    ae["train"].pop("schedule")
    st["latents"]["encode"].update(data="digits", batch_size=64, workers=1, count=200)
    books = st["codebooks"]["spec"]
    books["data"]["batch_size"] = 16
    books["model"]["options"].update(
        levels=[{"patch_H": 2, "patch_W": 2, "num_embeddings": 8, "neighbourhood_step": 2},
                {"patch_H": 1, "patch_W": 1, "num_embeddings": 8, "neighbourhood_step": 2}],
        condition={"num_embeddings": 4, "neighbourhood_step": 2}, count_from=5, prune_threshold=3)
    books["train"].update({**small, "steps": 6, "eval_every": 6})
    cas = st["cascade"]["spec"]
    cas["data"]["batch_size"] = 16
    tiny = {"in_dim": 16, "hidden_dim": 32, "num_enc_layers": 1, "num_dec_layers": 1, "self_attn_heads": 2,
            "cross_attn_heads": 2}
    cas["model"]["options"].update(base=tiny, refiner={**tiny, "use_sliding_window": True, "sliding_window": 4})
    cas["train"].update(small)
    cas["train"].pop("schedule")
    for stage in ("autoencoder", "codebooks", "cascade"):
        st[stage]["spec"]["scale"] = {"workers": 1}
        st[stage]["spec"]["track"].update(track)
    return raw


@pytest.mark.timeout(900)  # four Ray Train jobs: a hang guard for a loaded 2-core machine, not a speed check
def test_debug_cascade_pipeline_runs_every_stage_then_skips_them(ray_session, tmp_path):
    from raygen.data import read_manifest
    from raygen.exports import load_exported
    from raygen.spec.pipeline import load_pipeline
    from raygen.train.pipeline import run_pipeline

    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump(debug_pipeline(tmp_path), sort_keys=False))
    first = run_pipeline(*load_pipeline(path), progress=False, log=lambda *_: None)
    assert first.ran == ["autoencoder", "latents", "codebooks", "cascade"]
    latents = read_manifest(first.data["latents"])
    assert latents.kind == "latents" and tuple(latents.latents.shape) == (2, 4, 4)

    books = load_exported(first.models["codebooks"]).model
    assert books.family == "som" and books.levels[0].usage.sum() > 0  # counted in the steps from count_from on
    assert all(1 <= m.vocab <= m.k for m in books.levels)

    loaded = load_exported(first.models["cascade"])
    model = loaded.model
    assert model.family == "cascade" and model.data_info.shape == (1, 8, 8)  # trained on latents, samples images
    assert model.base.vocab == books.levels[0].vocab  # the pruned vocabulary, end to end
    images = model.generate(3, condition=7, seed=0, level_settings="0:beam_width=2,num_beam=2")
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
    rows = model.sample_levels(_conditions(model, 2), model.sampling_params(), _generators(2))
    assert [r.shape for r in rows] == [(2, 1, 8, 8)] * 2

    state = json.loads((first.folder / "pipeline.json").read_text())["stages"]
    assert set(state) == {"autoencoder", "latents", "codebooks", "cascade"}
    again = run_pipeline(*load_pipeline(path), progress=False, log=lambda *_: None)
    assert again.ran == [] and again.skipped == ["autoencoder", "latents", "codebooks", "cascade"]


def _conditions(model, n):
    from raygen.models import Conditions
    return Conditions.parse(model.condition_kind, [1] * n, model.data_info)


def _generators(n):
    from raygen.models import make_generators
    return make_generators(range(n))
