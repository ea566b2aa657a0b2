"""The diffusion family's model: classifier-free guidance, condition dropout,
DDIM's determinism against its update rule, learning on shapes, samplers
swapped on a saved model, and the errors a bad config gets."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from raygen.models import Conditions, DataInfo, build_model, make_generators, parse_params
from raygen.models.diffusion import DiffusionConfig
from raygen.models.diffusion.unet import CondInputs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: one intra-op thread avoids oversubscribing shared cores (~100x faster under load)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CLASSES = DataInfo(channels=1, resolution=8, num_classes=3, class_names=["a", "b", "c"])
SHAPES = DataInfo(channels=3, resolution=16, has_captions=True)


def build(info=CLASSES, seed=0, **options):
    torch.manual_seed(seed)
    return build_model("diffusion", DiffusionConfig.debug(**options), info)


def params(model, **values):
    return parse_params(model.sampling_params, values)


def shapes_batch(n: int, seed: int, resolution: int = 16) -> dict:
    """Procedural shapes with their captions, drawn in-process (the `shapes` dataset's own renderer)."""
    from raygen.data.sources.shapes import describe, draw_shapes, random_shapes
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(n):
        shapes, relation = random_shapes(rng, 1)
        images.append(torch.from_numpy(draw_shapes(shapes, resolution)).permute(2, 0, 1).float() / 255)
        captions.append(describe(shapes, relation))
    return {"image": torch.stack(images), "caption": captions}


# ---------------------------------------------------------------- classifier-free guidance
def test_guidance_scale_one_is_the_conditional_prediction():
    model = build(conditioning="label", unet={"attention": "cross"}).eval()
    n, device = 3, torch.device("cpu")
    cond = model.conditioner(n, torch.tensor([0, 1, 2]), None, 0.0, device)
    null = model.conditioner.null(n, device)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(n, 1, 8, 8, generator=g), torch.tensor(40)
    with torch.no_grad():
        c = model.denoiser(x, t, cond)
        u = model.denoiser(x, t, null)
        assert not torch.allclose(c, u)  # the null label is a different condition
        assert torch.allclose(model.guided_prediction(x, t, cond, null, 1.0, 0.0), c, atol=1e-6)
        assert torch.allclose(model.guided_prediction(x, t, cond, null, 0.0, 0.0), u, atol=1e-6)
        assert torch.allclose(model.guided_prediction(x, t, cond, null, 3.0, 0.0), u + 3 * (c - u), atol=1e-5)
        # guidance_rescale 1: the guided prediction gets the conditional one's per-image std
        r = model.guided_prediction(x, t, cond, null, 3.0, 1.0)
        assert torch.allclose(r.flatten(1).std(1), c.flatten(1).std(1), rtol=1e-4)

    # at scale 1 sampling never runs the null branch: every UNet call sees only the n conditional rows
    seen = []
    hook = model.denoiser.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    try:
        conditions = Conditions("label", (0, 1, 2))
        plain = model.sample(conditions, params(model, guidance_scale=1.0), make_generators([1, 2, 3]))
        assert seen and set(seen) == {3}
        seen.clear()
        guided = model.sample(conditions, params(model, guidance_scale=4.0), make_generators([1, 2, 3]))
        assert set(seen) == {6}
    finally:
        hook.remove()
    assert not torch.equal(plain, guided)


@pytest.mark.parametrize("attention", ["none", "cross"])
def test_the_unconditional_branch_is_trained_only_with_dropout(attention):
    def null_grad(dropout):
        model = build(conditioning="label", cond_dropout=dropout, unet={"attention": attention}).train()
        torch.manual_seed(1)
        batch = {"image": torch.rand(32, 1, 8, 8), "label": torch.randint(3, (32,))}
        model.training_step(batch)["loss"].backward()
        unet = model.denoiser.unet
        if attention == "none":  # the null class's row of the timestep-embedding table
            return unet.class_embedding.weight.grad[3].abs().sum()
        return unet.encoder_hid_proj.weight.grad[:, 3].abs().sum()  # the null label's token

    assert null_grad(0.5) > 0
    assert null_grad(0.0) == 0


def test_caption_dropout_feeds_the_null_caption():
    model = build(SHAPES, conditioning="caption", cond_dropout=0.5).train()
    seen = []
    encode = model.conditioner.text.encode
    model.conditioner.text.encode = lambda captions: (seen.extend(captions), encode(captions))[1]
    torch.manual_seed(0)
    batch = shapes_batch(16, seed=0)
    model.training_step(batch)
    dropped = [c for c in seen if c == ""]
    assert 3 <= len(dropped) <= 13 and len(seen) == 16
    assert set(seen) - {""} <= set(batch["caption"])


# ---------------------------------------------------------------- DDIM
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta_zero_is_deterministic_and_follows_its_update_rule(clip):
    model = build(conditioning="label", unet={"attention": "none"}, noise={"schedule": "cosine"}).eval()
    conditions = Conditions("label", (0, 2))
    p0 = params(model, sampler="ddim", num_inference_steps=6, eta=0.0, clip_sample=clip)
    gens = make_generators([5, 9])
    out = model.sample(conditions, p0, gens)
    # eta 0 draws nothing after the starting noise: each generator is where drawing x_T alone leaves it
    for seed, g in zip([5, 9], gens):
        ref = torch.Generator().manual_seed(seed)
        torch.randn(1, 8, 8, generator=ref)
        assert torch.equal(g.get_state(), ref.get_state())
    assert torch.equal(out, model.sample(conditions, p0, make_generators([5, 9])))

    # the DDIM update (Song et al. eq. 12, sigma = 0), written out; clip_sample clips x0 to [-1, 1]
    sched = model.noise.scheduler
    ab = sched.alphas_cumprod.double()
    steps = model.config.noise.train_timesteps // 6
    x = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (5, 9)]).double()
    cond = model.conditioner(2, torch.tensor([0, 2]), None, 0.0, torch.device("cpu"))
    # trailing spacing: round(T - i T/S) - 1, from the last training step down; DDIM steps back by T // S
    timesteps = [round(100 - i * 100 / 6) - 1 for i in range(6)]
    assert timesteps == [99, 82, 66, 49, 32, 16]
    with torch.no_grad():
        for t in timesteps:
            eps = model.denoiser(x.float(), torch.tensor(t), cond).double()
            a, prev = ab[t], t - steps
            a_prev = ab[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x0 = x0.clamp(-1, 1) if clip else x0
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    assert torch.allclose(out.double(), ((x + 1) / 2).clamp(0, 1), atol=1e-4)

    # eta 1 adds per-step noise from the same generators: more draws, another image
    noisy = model.sample(conditions, params(model, sampler="ddim", num_inference_steps=6, eta=1.0,
                                            clip_sample=clip), make_generators([5, 9]))
    assert not torch.allclose(noisy, out, atol=1e-3)


# ---------------------------------------------------------------- learning, saving, swapping samplers
@pytest.fixture(scope="module")
def trained_shapes(tmp_path_factory):
    """A caption-conditioned pixel model trained a fixed number of steps on 16 px shapes, and its losses."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model = build(SHAPES, seed=0, conditioning="caption", cond_dropout=0.1,
                  unet={"widths": [16, 32], "attention": "cross", "head_dim": 8},
                  noise={"schedule": "cosine", "train_timesteps": 200}, sampling={"num_inference_steps": 10})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    torch.manual_seed(0)
    losses = []
    model.train()
    for step in range(80):
        loss = model.training_step(shapes_batch(16, seed=step))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    torch.set_num_threads(n)
    return model.eval(), losses


def test_loss_falls_on_shapes_within_a_fixed_number_of_steps(trained_shapes):
    _, losses = trained_shapes
    assert all(math.isfinite(v) for v in losses)
    first, last = np.mean(losses[:10]), np.mean(losses[-20:])
    assert last < 0.5 * first, (first, last)


def test_samplers_swap_on_a_saved_model(trained_shapes, tmp_path):
    from raygen.exports import export_generator, load_exported
    from raygen.spec import parse_spec

    model, _ = trained_shapes
    spec = parse_spec({"model": {"family": "diffusion", "options": model.config.model_dump(mode="json")}})
    export_generator(tmp_path / "model", model.state_dict(), spec, SHAPES, {"step": 80})
    loaded = load_exported(tmp_path / "model").model
    conditions = Conditions("caption", ("a red circle", "a blue square", "a green triangle"))
    seeds = [3, 4, 5]
    images = {}
    for sampler, steps in (("ddpm", 50), ("ddim", 50), ("dpmsolver++", 10)):
        p = params(loaded, sampler=sampler, num_inference_steps=steps, guidance_scale=2.0)
        images[sampler] = loaded.sample(conditions, p, make_generators(seeds))
        assert images[sampler].shape == (3, 3, 16, 16) and torch.isfinite(images[sampler]).all()
        assert torch.equal(images[sampler], model.sample(conditions, p, make_generators(seeds)))
    assert not torch.allclose(images["ddpm"], images["ddim"], atol=1e-3)
    # DDIM (eta 0) and DPM-Solver++ both solve the same probability-flow ODE from the same x_T: their
    # images agree far better than images from another starting noise do
    other = loaded.sample(conditions, params(loaded, sampler="ddim", num_inference_steps=50, guidance_scale=2.0),
                          make_generators([7, 8, 9]))
    same_start = (images["ddim"] - images["dpmsolver++"]).abs().mean()
    other_start = (images["ddim"] - other).abs().mean()
    assert same_start < 0.5 * other_start, (float(same_start), float(other_start))


def test_the_cli_swaps_samplers_on_the_saved_model(trained_shapes, tmp_path, capsys):
    from PIL import Image

    from raygen.exports import export_generator
    from raygen.jobs.cli import main
    from raygen.spec import parse_spec

    model, _ = trained_shapes
    spec = parse_spec({"model": {"family": "diffusion", "options": model.config.model_dump(mode="json")}})
    export_generator(tmp_path / "model", model.state_dict(), spec, SHAPES, {"step": 80})
    grids = {}
    for sampler in ("ddim", "dpmsolver++"):
        out = tmp_path / f"{sampler}.png"
        assert main(["sample", str(tmp_path / "model"), "--caption", "a red circle", "-n", "2",
                     "--set", f"sampler={sampler}", "--set", "num_inference_steps=8", "--set", "guidance_scale=1.5",
                     "--out", str(out)]) == 0
        grids[sampler] = np.asarray(Image.open(out))
    assert grids["ddim"].shape == grids["dpmsolver++"].shape and not np.array_equal(grids["ddim"], grids["dpmsolver++"])
    assert main(["sample", str(tmp_path / "model"), "--caption", "x", "--set", "sampler=euler"]) == 2
    assert "sampler" in capsys.readouterr().err


def test_the_cli_reranks_best_of_n_with_a_clip_scorer(trained_shapes, tmp_path, capsys):
    """The issue's command, `--prompt` and all, plus best-of-n with a clip model trained by raygen."""
    from PIL import Image

    import raygen.models.clip  # noqa: F401  (registers the family)
    from raygen.exports import export_generator
    from raygen.jobs.cli import main
    from raygen.models.clip import ClipConfig
    from raygen.spec import parse_spec

    model, _ = trained_shapes
    spec = parse_spec({"model": {"family": "diffusion", "options": model.config.model_dump(mode="json")}})
    export_generator(tmp_path / "model", model.state_dict(), spec, SHAPES, {"step": 80})
    clip = build_model("clip", ClipConfig.debug(), SHAPES)
    clip_spec = parse_spec({"model": {"family": "clip", "options": clip.config.model_dump(mode="json")}})
    export_generator(tmp_path / "clip", clip.state_dict(), clip_spec, SHAPES, {"step": 0})
    out = tmp_path / "best.png"
    assert main(["sample", str(tmp_path / "model"), "--prompt", "a red circle", "--set", "sampler=ddim",
                 "--set", "num_inference_steps=4", "--set", "guidance_scale=3", "-n", "2", "--best-of", "3",
                 "--scorer", f"clip:{tmp_path / 'clip'}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CLIP scores of kept images: " in printed and "wrote 2 image(s)" in printed
    assert Image.open(out).size[0] > 0
    # without a scorer, best-of-n is a clear error naming the flag
    assert main(["sample", str(tmp_path / "model"), "--prompt", "a red circle", "--best-of", "2"]) == 2
    assert "--scorer" in capsys.readouterr().err


# ---------------------------------------------------------------- variants and errors
@pytest.mark.parametrize("attention,unet_class", [("self_cross", "UNet2DConditionModel"),
                                                  ("jxa", "UNet2DConditionModel"),
                                                  ("self", "UNet2DModel"), ("none", "UNet2DModel")])
def test_attention_variants_build_the_right_blocks(attention, unet_class):
    model = build(conditioning="label", unet={"attention": attention})
    unet = model.denoiser.unet
    assert type(unet).__name__ == unet_class
    config = unet.config
    first, second = config.down_block_types
    assert first == "DownBlock2D"  # the highest resolution has no attention by default
    assert second == {"self_cross": "CrossAttnDownBlock2D", "jxa": "CrossAttnDownBlock2D",
                      "self": "AttnDownBlock2D", "none": "DownBlock2D"}[attention]
    if attention == "jxa":  # cross-attention only, the condition not in the timestep embedding
        assert config.only_cross_attention is True and unet.class_embedding is None
        blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
        assert blocks and all(b.only_cross_attention for b in blocks)
    if attention == "none":  # the label only through the timestep embedding
        assert unet.class_embedding.num_embeddings == 4  # 3 classes + the null class
        assert not [m for m in unet.modules() if type(m).__name__ == "Attention"]


def test_efficient_layout_runs_the_unet_at_half_resolution():
    plain = build(conditioning="label", unet={"attention": "cross"})
    efficient = build(conditioning="label", unet={"attention": "cross", "efficient": True})
    assert efficient.denoiser.unet.config.in_channels == 4 and efficient.denoiser.unet.config.sample_size == 4
    assert plain.denoiser.unet.config.in_channels == 1
    out = efficient.denoiser(torch.randn(2, 1, 8, 8), torch.tensor(3),
                             efficient.conditioner(2, torch.tensor([0, 1]), None, 0.0, torch.device("cpu")))
    assert out.shape == (2, 1, 8, 8)


def test_attention_defaults_to_cross_when_there_is_a_condition():
    assert DiffusionConfig().unet.attention == "self"
    assert DiffusionConfig(conditioning="label").unet.attention == "cross"
    assert DiffusionConfig(conditioning="caption", unet={"widths": [16, 32]}).unet.attention == "cross"
    assert DiffusionConfig(conditioning="label", unet={"attention": "none"}).unet.attention == "none"
    config = DiffusionConfig(conditioning="label", unet={"attention": "xa"})  # the seed's name
    assert config.unet.attention == "self_cross" and DiffusionConfig.model_validate(config.model_dump()) == config


def test_bad_options_name_the_field():
    with pytest.raises(ValidationError, match="attention 'cross' attends to a condition, but conditioning is 'none'"):
        DiffusionConfig(unet={"attention": "cross"})
    with pytest.raises(ValidationError, match="widths .* multiple of norm_groups"):
        DiffusionConfig(unet={"widths": [12, 24], "norm_groups": 8})
    with pytest.raises(ValidationError, match="attention_levels has 1 entries"):
        DiffusionConfig(conditioning="label", unet={"attention_levels": [True]})
    with pytest.raises(ValidationError, match="unet.attention\n.*Input should be 'self_cross', 'cross', 'self' or 'none'"):
        DiffusionConfig(conditioning="label", unet={"attention": "both"})
    with pytest.raises(ValueError, match="need a side divisible by 8, got 12x12"):
        build(DataInfo(channels=1, resolution=12), unet={"widths": [8, 8, 8, 8], "attention": "none"})
    with pytest.raises(ValueError, match="conditioning 'label' needs a dataset with class labels"):
        build(DataInfo(channels=1, resolution=8), conditioning="label")
    model = build(DataInfo(channels=1, resolution=8), unet={"attention": "self"})
    with pytest.raises(ValueError, match="unconditional model has nothing to guide"):
        model.sample(Conditions.none(1), params(model, guidance_scale=2.0), make_generators([0]))


@pytest.mark.parametrize("conditioning,attention", [("label", "cross"), ("label", "none"), ("caption", "self_cross"),
                                                    ("caption", "none")])
def test_a_bf16_model_trains(conditioning, attention):
    # DeepSpeed bf16 casts the whole model: float condition inputs (one-hot tokens, pooled captions) must follow
    info = DataInfo(channels=1, resolution=8, num_classes=3, has_captions=True)
    model = build(info, conditioning=conditioning, unet={"attention": attention}).to(torch.bfloat16).train()
    batch = {"image": torch.rand(2, 1, 8, 8), "label": torch.tensor([0, 2]), "caption": ["a red circle", ""]}
    out = model.training_step(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.denoiser.unet.conv_in.weight.grad.dtype == torch.bfloat16
