"""The diffusion specs train for real through `raygen train` (Ray Train, two
DDP workers, MLflow, FID with the spec's few-step DDIM sampler, EMA weights
in the export) at debug size; the trained model samples and swaps samplers."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from raygen.jobs.cli import main
from raygen.tracking.store import client

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
TINY = ["--set", "model.options.unet.widths=[8, 16]", "--set", "model.options.unet.head_dim=8",
        "--set", "model.options.unet.norm_groups=4", "--set", "train.eval_every=3", "--set", "train.checkpoint_every=3",
        "--set", "train.val_batches=1", "--set", "train.grid_samples=8", "--set", "train.steps=6",
        "--set", "data.batch_size=16", "--set", "model.options.sampling.num_inference_steps=4"]


def _run(capsys, spec: str, *extra: str):
    code = main(["train", str(REPO / "jobs/specs" / spec), "--set", "run_dir=runs", "--set", "data.root=data",
                 *TINY, *extra])
    out = capsys.readouterr().out
    assert code == 0, out
    tracking_uri = re.search(r"--tracking-uri (\S+)", out).group(1)
    return out, tracking_uri


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs the dataset-fashion-mnist Debian package (make dataset)")
def test_diffusion_fashion_trains_with_fid(ray_session, workdir, capsys):
    out, tracking_uri = _run(capsys, "diffusion_fashion.yaml", "--set", "data.count=800",
                             "--set", "track.fid.samples=32", "--set", "track.fid.fit_steps=20",
                             "--set", "track.fid.every=3")
    c = client(tracking_uri)
    run = c.search_runs([c.get_experiment_by_name("diffusion-fashion").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.family"] == "diffusion"
    assert run.data.params["model.options.unet.attention"] == "cross"
    losses = [m.value for m in c.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == 6 and all(v == v and v < 10 for v in losses)
    fid_steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "fid"))
    assert 3 in fid_steps and 6 in fid_steps and run.data.metrics["fid"] > 0
    assert "val_loss" in run.data.metrics

    from raygen.exports import load_generator
    from raygen.models import Conditions, make_generators, parse_params
    loaded = load_generator(str(workdir / "runs" / "diffusion-fashion"))
    assert loaded.meta["weights"] == "ema" and loaded.model.family == "diffusion"
    model = loaded.model
    assert model.data_info.num_classes == 10 and model.condition_kind == "label"
    conds = Conditions.parse("label", ["sneaker", "bag"], model.data_info)
    for sampler in ("ddpm", "ddim", "dpmsolver++"):
        p = parse_params(model.sampling_params, {"sampler": sampler, "num_inference_steps": 5, "guidance_scale": 2.0})
        images = model.sample(conds, p, make_generators([0, 1]))
        assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


def test_diffusion_shapes_t2i_trains(ray_session, workdir, capsys):
    _, tracking_uri = _run(capsys, "diffusion_shapes_t2i.yaml", "--set", "data.count=400",
                           "--set", "track.fid.enabled=false",
                           "--set", "model.options.text={tokenizer: word, dim: 16, depth: 1, heads: 2, max_len: 16}")
    c = client(tracking_uri)
    run = c.search_runs([c.get_experiment_by_name("diffusion-shapes").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.options.conditioning"] == "caption"
    assert len(c.get_metric_history(run.info.run_id, "loss")) == 6
    from raygen.exports import load_generator
    model = load_generator(str(workdir / "runs" / "diffusion-shapes-t2i")).model
    images = model.generate(2, condition="a red circle", guidance_scale=3.0, num_inference_steps=3)
    assert images.shape == (2, 3, 16, 16)


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs the dataset-fashion-mnist Debian package (make dataset)")
def test_diffusion_latent_pipeline_trains_vae_then_diffusion(ray_session, workdir, capsys):
    common = {"data.count": 600, "data.batch_size": 16, "train.steps": 4, "train.eval_every": 2,
              "train.checkpoint_every": 2, "train.val_batches": 1, "train.grid_samples": 4}
    stage = {"vae": {**common, "model.options.widths": "[8, 16]", "model.options.norm_groups": 4},
             "diffusion": {**common, "model.options.unet.widths": "[8, 16]", "model.options.unet.head_dim": 8,
                           "model.options.unet.norm_groups": 4, "model.options.sampling.num_inference_steps": 3,
                           "track.fid.enabled": "false"}}
    sets = [f"stages.{name}.set.{key}={value}" for name, values in stage.items() for key, value in values.items()]
    code = main(["train", str(REPO / "jobs/specs/diffusion_latent.yaml"), *[a for s in sets for a in ("--set", s)]])
    out = capsys.readouterr().out
    assert code == 0, out

    from raygen.exports import load_generator
    loaded = load_generator(str(workdir / "runs" / "diffusion-latent" / "diffusion"))
    model = loaded.model
    assert model.latent and model.components["vae"].family == "vae" and model.x_shape == (4, 8, 8)
    assert model.components["vae"].latent_stats[0] > 0  # the VAE stage measured its latent scale
    images = model.generate(2, condition="bag", num_inference_steps=3)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs the dataset-fashion-mnist Debian package (make dataset)")
def test_diffusion_sr_pipeline_samples_16_to_32_in_one_request(ray_session, workdir, capsys):
    common = {"data.count": 600, "train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2,
              "train.val_batches": 1, "train.grid_samples": 4, "track.fid.enabled": "false",
              "model.options.unet.widths": "[8, 16]", "model.options.unet.head_dim": 8,
              "model.options.unet.norm_groups": 4, "model.options.sampling.num_inference_steps": 3}
    stage = {"base": {**common, "data.batch_size": 16}, "sr": {**common, "data.batch_size": 8}}
    sets = [f"stages.{name}.set.{key}={value}" for name, values in stage.items() for key, value in values.items()]
    code = main(["train", str(REPO / "jobs/specs/diffusion_sr.yaml"), *[a for s in sets for a in ("--set", s)]])
    out = capsys.readouterr().out
    assert code == 0, out

    from raygen.exports import load_generator
    model = load_generator(str(workdir / "runs" / "diffusion-sr" / "sr")).model
    assert model.upscaler and model.components["base"].data_info.resolution == 16
    images = model.generate(2, condition="dress", num_inference_steps=3)
    assert images.shape == (2, 1, 32, 32) and torch.isfinite(images).all()
