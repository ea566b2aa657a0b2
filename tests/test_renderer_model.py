"""The renderer family's modules: scene encoder, decoder strategies, ImageToSeq,
SeqToImage, output activations and losses (issue 14 items 1-7 and 13)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raygen.models import build_model
from raygen.models.renderer import RendererConfig, spheres_info
from raygen.models.renderer.blocks import ImageToSeq, SeqToImage
from raygen.models.renderer.decoder import stage_channels, start_block_size
from raygen.models.renderer.losses import OUTPUT_ACTIVATIONS, render_loss, value_smooth_l1

INFO = spheres_info(8, max_spheres=3)


def scene_batch(n: int = 4, t: int = 3, seed: int = 0, res: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(t)[None] < torch.randint(1, t + 1, (n, 1), generator=g)
    return {"image": torch.rand(n, 3, res, res, generator=g), "scene": torch.rand(n, t, 10, generator=g),
            "scene_mask": mask, "scene_globals": torch.rand(n, 10, generator=g)}


def build(**options):
    torch.manual_seed(0)
    return build_model("renderer", RendererConfig.debug(**options), INFO)


# ------------------------------------------------------------ item 1: scene encoder
@pytest.mark.parametrize("options", [{}, {"seq_blocks": 1}, {"base_layers": 0}, {"channel_strategy": "halve"}])
def test_output_is_invariant_to_the_order_of_the_spheres(options):
    model = build(**options).eval()
    batch = scene_batch()
    perm = torch.tensor([2, 0, 1])  # padding moves with its slot, mask and all
    shuffled = {**batch, "scene": batch["scene"][:, perm], "scene_mask": batch["scene_mask"][:, perm]}
    with torch.no_grad():
        a, b = model._render(batch), model._render(shuffled)
    assert torch.allclose(a, b, atol=1e-5)
    # and the scene matters: another scene gives another image
    with torch.no_grad():
        c = model._render({**batch, "scene": batch["scene"].flip(0)})
    assert not torch.allclose(a, c, atol=1e-3)


def test_padding_rows_do_not_change_the_image():
    model = build().eval()
    batch = scene_batch()
    junk = batch["scene"].clone()
    junk[~batch["scene_mask"]] = 99.0  # whatever sits in the padded rows
    with torch.no_grad():
        assert torch.allclose(model._render(batch), model._render({**batch, "scene": junk}), atol=1e-6)


def test_base_layers_have_their_own_parameters_unless_shared():
    own, shared = build(base_layers=3), build(base_layers=3, share_base_params=True)
    count = lambda m: sum(p.numel() for p in m.encoder.layers.parameters())  # noqa: E731
    assert len(own.encoder.layers) == 3 and len(shared.encoder.layers) == 1 and shared.encoder.repeats == 3
    assert count(own) == 3 * count(shared)
    assert build(base_layers=0).encoder.layers is not None and len(build(base_layers=0).encoder.layers) == 0
    with pytest.raises(ValueError, match="share_base_params needs base_layers >= 2"):
        RendererConfig.debug(share_base_params=True, base_layers=1)


def test_fields_are_scaled_by_the_dataset_ranges():
    model = build()
    # shininess runs 8..64: centre 36, half-span 28
    i = INFO.condition_columns["scene"]["fields"].index("shininess")
    assert model.encoder.obj_centre[i] == pytest.approx(36.0) and model.encoder.obj_half[i] == pytest.approx(28.0)


# ------------------------------------------------------------ item 2: decoder
def test_channel_strategies():
    assert stage_channels("expand_halve", 32, 4) == [32, 64, 32, 16]
    assert stage_channels("constant_halve", 32, 4) == [32, 32, 16, 8]
    assert stage_channels("halve", 32, 4) == [32, 16, 8, 4]
    assert stage_channels("expand_halve", 32, 4, turn=2) == [32, 64, 128, 64]
    assert stage_channels("halve", 32, 4, floor=8) == [32, 16, 8, 8]


def test_start_block_and_batch_norm():
    assert start_block_size(32, 32, 4) == (3, 4, 4)
    assert start_block_size(16, 32, 4) == (2, 4, 8)
    with pytest.raises(ValueError, match="start_size 3 does not double up to the 8x8 images"):
        build_model("renderer", RendererConfig.debug(start_size=3), INFO)
    model = build(start_size=2, start_channels=16)
    assert model.decoder.channels == [16, 32, 16] and (model.decoder.h0, model.decoder.w0) == (2, 2)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.decoder.modules())


# ------------------------------------------------------------ item 3: ImageToSeq
def test_image_to_seq_at_init_ignores_the_image():
    torch.manual_seed(0)
    block = ImageToSeq(dim=16, channels=8, heads=2, pool=4)
    seq, mask = torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool)
    a = block(seq, mask, torch.randn(2, 8, 8, 8))
    b = block(seq, mask, torch.randn(2, 8, 8, 8) * 5)
    assert torch.equal(a, b) and torch.equal(a, seq)
    # ... and it can learn to read it: the weight gets a gradient at once
    block(seq, mask, torch.randn(2, 8, 8, 8)).pow(2).sum().backward()
    assert block.weight.weight.grad.abs().sum() > 0


def test_image_to_seq_weight_is_per_token_and_pooling_per_image():
    torch.manual_seed(0)
    block = ImageToSeq(dim=16, channels=8, heads=2, pool=2)
    torch.nn.init.normal_(block.weight.weight)  # a trained block
    seq, mask = torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool)
    w = block.weight(seq).squeeze(-1)
    assert w.unique().numel() == 6  # one weight for every token of every sequence (the seed's bug: one for all)
    images = torch.randn(2, 8, 8, 8)
    out = block(seq, mask, images)
    other = images.clone()
    other[1] += 3.0  # change image 1 only
    out2 = block(seq, mask, other)
    assert torch.equal(out[0], out2[0]) and not torch.allclose(out[1], out2[1])  # each image pooled on its own


# ------------------------------------------------------------ item 4: SeqToImage
def test_gate_starts_at_one_half():
    model = build()
    gates = [s.seq_to_image.gate for s in model.decoder.stages]
    assert gates and all(torch.equal(g, torch.full_like(g, 0.5)) for g in gates)
    old = build(mix_bias_init=-10.0).decoder.stages[0].seq_to_image.gate
    # the seed's first init: the attention did nothing
    assert float(old.detach().max()) == pytest.approx(4.54e-5, rel=1e-2)


def test_seq_to_image_adds_the_read_value_once():
    torch.manual_seed(0)
    block = SeqToImage(channels=8, dim=16, attn_channels=4, heads=2).eval()
    x, seq, mask = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool)
    read = block.read(x, seq, mask)
    out = block(x, seq, mask)
    assert torch.allclose(out, 0.5 * x + 0.5 * read, atol=1e-6)  # the double add would give 0.5 x + read
    with torch.no_grad():
        block.mix_bias.fill_(30.0)  # gate 1: the channels become the read value, exactly once
    assert torch.allclose(block(x, seq, mask), read, atol=1e-5)


def test_seq_to_image_on_a_subset_of_channels():
    torch.manual_seed(0)
    block = SeqToImage(channels=8, dim=16, attn_channels=4, heads=2, fraction=0.25)
    x, seq, mask = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool)
    out = block(x, seq, mask)
    assert block.selected == 2 and block.mix_bias.shape == (2,)
    assert torch.equal(out[:, 2:], x[:, 2:]) and not torch.allclose(out[:, :2], x[:, :2])


def test_seq_to_image_ignores_padded_tokens():
    torch.manual_seed(0)
    block = SeqToImage(channels=8, dim=16, attn_channels=4, heads=2)
    x, seq = torch.randn(1, 8, 4, 4), torch.randn(1, 3, 16)
    mask = torch.tensor([[True, True, False]])
    other = seq.clone()
    other[0, 2] = 100.0
    assert torch.allclose(block(x, seq, mask), block(x, other, mask))


# ------------------------------------------------------------ item 5: seq blocks
def test_seq_blocks_sit_between_stages_with_dropout():
    model = build(seq_blocks=2, seq_dropout=0.2, start_size=2)
    counts = [len(s.seq_blocks) for s in model.decoder.stages]
    assert counts == [2, 2, 0]  # after every stage but the last
    drops = [m.p for m in model.decoder.stages[0].seq_blocks.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(p == 0.2 for p in drops)
    batch = scene_batch()
    model.train()
    a, b = model._render(batch), model._render(batch)
    assert not torch.allclose(a, b)  # dropout is live in training
    with pytest.raises(ValueError, match="seq_dropout applies to seq blocks"):
        RendererConfig.debug(seq_dropout=0.1)


# ------------------------------------------------------------ item 6: output activation
@pytest.mark.parametrize("name", ["none", "tanh", "relu", "celu", "exp"])
def test_output_activations(name):
    x = torch.linspace(-3, 3, 7)
    expected = {"none": x, "tanh": (torch.tanh(x) + 1) / 2, "relu": x.clamp(min=0), "celu": F.celu(x),
                "exp": x.exp()}[name]
    assert torch.allclose(OUTPUT_ACTIVATIONS[name](x), expected)
    model = build(output_activation=name).eval()
    out = model.generate(2, condition=valid_scene())
    assert out.shape == (2, 3, 8, 8) and 0 <= out.min() and out.max() <= 1


# ------------------------------------------------------------ item 7: losses
def test_losses():
    pred, target = torch.zeros(1, 1, 1, 2), torch.tensor([[[[0.0, 1.0]]]])
    assert render_loss("l1", pred, target) == pytest.approx(0.5)
    assert render_loss("l2", pred, target) == pytest.approx(0.5)
    # smooth L1 (beta 0.1) of an error of 1 is 0.95, scaled by the true value + 1 = 2; the 0 pixel costs 0
    assert value_smooth_l1(pred, target, beta=0.1) == pytest.approx((0.95 * 2) / 2)
    # a bright pixel's error weighs twice a dark one's
    dark = value_smooth_l1(torch.full((1,), 0.5), torch.zeros(1))
    bright = value_smooth_l1(torch.full((1,), 0.5), torch.ones(1))
    assert float(bright) == pytest.approx(2 * float(dark))


def test_loss_falls():
    torch.manual_seed(0)
    model = build(start_size=2)
    batch = scene_batch(16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model.training_step(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_bf16_autocast_step_is_finite_and_close_to_fp32():
    model = build().eval()
    batch = scene_batch()
    with torch.no_grad():
        full = model.training_step(batch)["loss"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model.training_step(batch)["loss"]
    assert torch.isfinite(half) and float(half) == pytest.approx(float(full), rel=0.05)


def valid_scene(n: int = 1) -> dict:
    sphere = {"x": 0.0, "y": 0.0, "z": 4.0, "radius": 0.6, "r": 0.9, "g": 0.2, "b": 0.1, "diffuse": 0.7,
              "specular": 0.5, "shininess": 20.0}
    return {"objects": [dict(sphere, x=0.5 * i) for i in range(n)],
            "globals": {"light_x": 0.3, "light_y": 0.8, "light_z": -0.5, "ambient": 0.1, "bg_top_r": 0.2,
                        "bg_top_g": 0.2, "bg_top_b": 0.3, "bg_bottom_r": 0.1, "bg_bottom_g": 0.1, "bg_bottom_b": 0.1}}


def test_sampling_a_scene_equals_rendering_its_batch():
    model = build().eval()
    from raygen.models import Conditions
    cond = Conditions.parse("scene", [valid_scene(2)], INFO)
    batch = cond.columns(INFO)
    with torch.no_grad():
        assert torch.equal(model.generate(1, condition=valid_scene(2)), model._render(batch).clamp(0, 1))


@pytest.mark.parametrize("flavor", ["spheres-8", "halve-seqblocks-subset", "nonsquare-constant-shared"])
def test_every_parameter_gets_a_gradient(flavor):
    """DDP waits for every parameter's gradient: a block whose output nothing reads would stall it."""
    from raygen.models import get_family
    config, info = get_family("renderer").debug()[flavor]
    torch.manual_seed(0)
    model = build_model("renderer", config, info)
    t = info.condition_columns["scene"]["max_len"]
    batch = {**scene_batch(4, t), "image": torch.rand(4, *info.shape)}
    model.training_step(batch)["loss"].backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
