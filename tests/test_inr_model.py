"""The inr family (seed 001): decoder layout and parameter counts, rendering at any size, the code
constraint, encoders (frozen, local ResNet weights), training on kali patches, sampling and interpolation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raygen.models import Conditions, DataInfo, build_model, make_generators
from raygen.models.inr import INRConfig, INRSampling
from raygen.models.inr.config import DecoderOptions
from raygen.models.inr.losses import code_constraint

GRAY32 = DataInfo(channels=1, resolution=32)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def kali(tmp_path_factory):
    """Kali-set patches as the seed used them (fractal renders cropped to small patches), 16 px RGB."""
    from raygen.data.local import load_split_images
    from raygen.data.prepare import prepare_dataset
    from raygen.spec.schema import DataSpec
    out = tmp_path_factory.mktemp("kali")
    prepare_dataset("kali", out, resolution=16, channels=3, count=256, seed=0, render_size=64, patch=16)
    spec = DataSpec(dataset=str(out), resolution=16, channels=3)
    return load_split_images(out, "train", spec)["image"], load_split_images(out, "val", spec)["image"]


def _train(model, images, steps=120, lr=3e-3, batch=32, seed=0):
    from raygen.data.augment import augment_batch
    from raygen.spec.schema import AugmentSpec
    import numpy as np
    g, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    aug = AugmentSpec(hflip=True, vflip=True, shift=2)  # the seed's flips and pixel shifts, by the data worker's code
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr)
    losses = []
    model.train()
    for _ in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=g)]
        x = torch.from_numpy(augment_batch((x * 255).round().byte().numpy(), aug, rng)).float() / 255
        out = model.training_step({"image": x})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["recon"]))
    return losses


# ---------------------------------------------------------------- decoder layout
SEED_COUNTS = [  # (blocks, layers, hidden) -> the seed's printed decoder parameter count (code 128, 1x32x32)
    ((4, 2, 64), 42_497), ((8, 2, 128), 283_649), ((8, 4, 128), 547_841), ((16, 1, 128), 285_697),
    ((16, 2, 128), 549_889), ((8, 2, 300), 1_490_401), ((8, 2, 256), 1_091_585)]


@pytest.mark.parametrize("layout,seed_count", SEED_COUNTS, ids=[f"{b}x{l}x{h}" for (b, l, h), _ in SEED_COUNTS])
def test_decoder_parameter_counts_match_the_seed(layout, seed_count):
    blocks, layers, hid = layout
    model = build_model("inr", {"code_size": 128, "decoder": {"blocks": blocks, "layers": layers, "hid": hid}}, GRAY32)
    assert _count(model.decoder) == seed_count


def test_concat_residual_widths_double_per_concat_block():
    options = DecoderOptions(hid=64, blocks=8, layers=2, concat=[True, False] * 4)
    assert options.widths()[:-1] == [64, 128, 128, 256, 256, 512, 512, 1024]
    model = build_model("inr", {"code_size": 128, "decoder": options.model_dump()}, GRAY32)
    assert [b.layers[0].in_features for b in model.decoder.blocks] == [64, 128, 128, 256, 256, 512, 512, 1024]
    assert model.decoder.linear_out.in_features == 1024  # the last block adds: its output stays 1024 wide
    assert _count(model.decoder) == 3_502_785  # the seed's count for this layout
    with pytest.raises(ValueError, match="concat has 3 entries but there are 8 blocks"):
        DecoderOptions(blocks=8, concat=[True, False, True])


def test_dalle_encoder_matches_the_seeds_parameter_count():
    model = build_model("inr", {"code_size": 128, "encoder": "dalle",
                                "dalle": {"hid": 64, "blocks_per_group": 1, "space_to_depth": True,
                                          "activation": "gelu"}}, GRAY32)
    assert _count(model.encoder) == 1_725_264
    pooled = build_model("inr", {"code_size": 128, "encoder": "dalle",
                                 "dalle": {"hid": 64, "blocks_per_group": 1, "space_to_depth": False}}, GRAY32)
    assert _count(pooled.encoder) < _count(model.encoder)  # max-pooling has no 1x1 convs after the downsampling


def test_simple_cnn_encoder_is_the_seeds_layout():
    model = build_model("inr", {"code_size": 102}, DataInfo(channels=3, resolution=32))
    convs = [m for m in model.encoder.backbone if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(3, 16, (3, 3)), (16, 24, (3, 3)),
                                                                                (24, 32, (3, 3))]
    assert model.encoder.to_code.in_features == 21_632 and model.encoder.to_code.out_features == 102


# ---------------------------------------------------------------- rendering at any size
@pytest.mark.parametrize("size", [(8, 8), (16, 16), (32, 32), (8, 24), (5, 11)])
def test_the_decoder_renders_any_size(size):
    torch.manual_seed(0)
    model = build_model("inr", INRConfig.debug(), DataInfo(channels=3, resolution=8)).eval()
    codes = torch.randn(3, 8) * 0.5
    images = model.render_codes(codes, *size)
    assert images.shape == (3, 3, *size) and images.min() >= 0 and images.max() <= 1
    # each pixel is decoded on its own: an image rendered alone equals it rendered in a batch
    assert torch.allclose(model.render_codes(codes[1:2], *size), images[1:2], atol=1e-6)


def test_a_2x_render_pooled_back_stays_close_to_the_1x_render(kali):
    train, val = kali
    torch.manual_seed(0)
    model = build_model("inr", {"code_size": 32, "cnn": {"channels": [8, 8]},
                                "decoder": {"hid": 32, "blocks": 2, "layers": 2}}, DataInfo(channels=3, resolution=16))
    _train(model, train, steps=80)
    model.eval()
    x = val[:8]
    one = model.reconstruct(x)
    two, four = model.reconstruct(x, 32, 32), model.reconstruct(x, 64, 64)
    assert two.shape == (8, 3, 32, 32) and four.shape == (8, 3, 64, 64)
    spread = (one - one.mean(0)).abs().mean()  # how much reconstructions differ between images
    assert (F.avg_pool2d(two, 2) - one).abs().mean() < 0.1 * spread
    assert (F.avg_pool2d(four, 4) - one).abs().mean() < 0.1 * spread
    wide = model.reconstruct(x, 16, 48)  # non-square: 3x as wide
    assert wide.shape == (8, 3, 16, 48)
    assert (F.avg_pool2d(wide, (1, 3)) - one).abs().mean() < 0.1 * spread


# ---------------------------------------------------------------- the code constraint
def test_the_constraint_is_the_seeds_formula():
    codes = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.5], [1.0, -1.0, 0.0]])
    std_term, mean_term = code_constraint(codes, 0.5)
    assert torch.isclose(std_term, (0.5 - codes.std(0).mean()).abs())
    assert torch.isclose(mean_term, codes.mean().abs())
    assert torch.isclose(mean_term, torch.tensor(6.5 / 9))
    with pytest.raises(ValueError, match="at least 2 codes"):
        code_constraint(codes[:1])


def test_the_constraints_gradient_pulls_codes_to_mean_0_and_std_half():
    codes = (torch.randn(64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 + 1)
    torch.autograd.gradcheck(lambda c: sum(code_constraint(c, 0.5)), (codes.clone().requires_grad_(),))
    c = codes.clone().requires_grad_()
    # each element's gradient is ~1/(numel): plain descent with an annealed step reaches both targets
    for lr in [50.0] * 100 + [5.0] * 100 + [0.5] * 100:
        loss = sum(code_constraint(c, 0.5))
        grad, = torch.autograd.grad(loss, c)
        c = (c - lr * grad).detach().requires_grad_()
    c = c.detach()
    assert abs(float(c.mean())) < 0.01 and abs(float(c.std(0).mean()) - 0.5) < 0.01


def test_training_adds_the_constraint_and_validation_leaves_it_out():
    torch.manual_seed(0)
    model = build_model("inr", INRConfig.debug(constraint=0.1), DataInfo(channels=1, resolution=8))
    batch = {"image": torch.rand(4, 1, 8, 8)}
    out = model.train().training_step(batch)
    expected = out["recon"] + 0.1 * (out["code_std_loss"] + out["code_mean_loss"])
    assert torch.isclose(out["loss"].detach(), expected)
    model.eval()
    val = model.training_step(batch)
    assert torch.equal(val["loss"], val["recon"]) and "code_std_loss" not in val
    l2 = build_model("inr", INRConfig.debug(loss="l2"), DataInfo(channels=1, resolution=8)).eval()
    out = l2.training_step(batch)
    assert torch.isclose(out["loss"], (l2.reconstruct(batch["image"]) - batch["image"]).pow(2).mean(), atol=1e-6)


# ---------------------------------------------------------------- encoders
@pytest.mark.parametrize("freeze", ["all", "backbone"])
def test_a_frozen_encoder_gets_no_update(freeze):
    torch.manual_seed(0)
    model = build_model("inr", INRConfig.debug(encoder="resnet18", freeze=freeze), DataInfo(channels=3, resolution=16))
    frozen = model.encoder if freeze == "all" else model.encoder.backbone
    before = {k: v.clone() for k, v in frozen.state_dict().items()}  # weights and batch-norm statistics
    head = model.encoder.to_code.weight.clone()
    decoder = model.decoder.linear_out.weight.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-2)
    model.train()
    for _ in range(3):
        loss = model.training_step({"image": torch.rand(4, 3, 16, 16)})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(model.decoder.linear_out.weight, decoder)
    assert torch.equal(model.encoder.to_code.weight, head) == (freeze == "all")


def test_resnet18_loads_imagenet_weights_from_a_local_state_dict(tmp_path):
    import torchvision
    torch.manual_seed(3)
    saved = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(saved, tmp_path / "resnet18.pth")
    model = build_model("inr", INRConfig.debug(encoder="resnet18", resnet18={"weights": str(tmp_path / "resnet18.pth")}),
                        DataInfo(channels=3, resolution=16))
    body = model.encoder.backbone.body
    assert torch.equal(body[0].weight, saved["conv1.weight"])
    assert torch.equal(body[7][1].conv2.weight, saved["layer4.1.conv2.weight"])
    with pytest.raises(ValueError, match="resnet18.weights: .* is not a file"):
        build_model("inr", INRConfig.debug(encoder="resnet18", resnet18={"weights": str(tmp_path / "nope.pth")}),
                    DataInfo(channels=3, resolution=16))
    torch.save({"conv1.weight": saved["conv1.weight"]}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="is not a resnet18 state dict"):
        build_model("inr", INRConfig.debug(encoder="resnet18", resnet18={"weights": str(tmp_path / "partial.pth")}),
                    DataInfo(channels=3, resolution=16))


def test_transformer_encoder_options_are_checked():
    with pytest.raises(ValueError, match="stride 8 must be at most patch"):
        INRConfig.debug(encoder="transformer", transformer={"patch": 4, "stride": 8})
    with pytest.raises(ValueError, match="multiple of heads"):
        INRConfig.debug(encoder="transformer", transformer={"hid": 10, "heads": 4})
    model = build_model("inr", INRConfig.debug(encoder="transformer", transformer={"patch": 4, "stride": 2, "hid": 8,
                                                                                   "heads": 2}),
                        DataInfo(channels=1, resolution=8))
    assert model.encoder.backbone.pos.shape == (9, 8)  # (8 - 4) / 2 + 1 = 3 patches per side
    assert model.encode(torch.rand(2, 1, 8, 8)).shape == (2, 8)


def test_loss_falls_on_kali_patches(kali):
    train, val = kali
    torch.manual_seed(0)
    model = build_model("inr", {"code_size": 32, "cnn": {"channels": [8, 8]},
                                "decoder": {"hid": 32, "blocks": 2, "layers": 2}}, DataInfo(channels=3, resolution=16))
    with torch.no_grad():
        before = float(model.eval().training_step({"image": val})["loss"])
    losses = _train(model, train, steps=80)
    with torch.no_grad():
        after = float(model.eval().training_step({"image": val})["loss"])
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:10]) / 10
    assert after < 0.75 * before


# ---------------------------------------------------------------- sampling, reconstructing, interpolating
def _model(**overrides):
    torch.manual_seed(0)
    return build_model("inr", INRConfig.debug(**overrides), DataInfo(channels=1, resolution=8)).eval()


def test_sampling_draws_codes_from_n0_half_from_each_images_generator():
    model = _model()
    none = Conditions("image", (None, None))
    a = model.sample(none, INRSampling(), make_generators([1, 2]))
    b = model.sample(none, INRSampling(), make_generators([1, 3]))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    code = torch.randn(8, generator=torch.Generator().manual_seed(1)) * 0.5
    assert torch.allclose(a[0:1], model.decode(code[None]), atol=1e-6)
    flat = model.sample(none, INRSampling(code_std=0.0), make_generators([1, 2]))
    assert torch.equal(flat[0], flat[1])  # code_std 0: every drawn code is the mean code 0


def test_an_input_image_is_reconstructed_and_rendered_at_size():
    model = _model()
    image = torch.rand(1, 8, 8)
    conditions = Conditions.parse("image", [image, None], model.data_info)
    out = model.sample(conditions, INRSampling(), make_generators([0, 1]))
    assert torch.allclose(out[0], model.reconstruct(image[None])[0], atol=1e-6)
    big = model.render(conditions, INRSampling(), make_generators([0, 1]), 16, 24)
    assert big.shape == (2, 1, 16, 24)
    assert torch.allclose(big[0:1], model.reconstruct(image[None], 16, 24), atol=1e-6)


def test_interpolation_between_two_images_codes(tmp_path):
    import base64
    import io

    from PIL import Image
    model = _model()
    a, b = torch.rand(1, 8, 8), torch.rand(1, 8, 8)
    steps = model.interpolate(a, b, steps=5)
    assert steps.shape == (5, 1, 8, 8)
    assert torch.allclose(steps[0], model.reconstruct(a[None])[0], atol=1e-5)
    assert torch.allclose(steps[-1], model.reconstruct(b[None])[0], atol=1e-5)
    middle = model.decode(model.encode(torch.stack([a, b])).mean(0, keepdim=True))
    assert torch.allclose(steps[2:3], middle, atol=1e-5)
    # the same through sampling parameters: `toward` is a second image (base64 PNG), `mix` the weight
    buf = io.BytesIO()
    Image.fromarray((b[0] * 255).round().byte().numpy()).save(buf, format="PNG")
    toward = base64.b64encode(buf.getvalue()).decode()
    b8 = torch.from_numpy(__import__("numpy").asarray(Image.open(io.BytesIO(buf.getvalue())), dtype="float32"))[None] / 255
    conditions = Conditions.parse("image", [a], model.data_info)
    at_end = model.sample(conditions, INRSampling(toward=toward, mix=1.0), make_generators([0]))
    assert torch.allclose(at_end, model.reconstruct(b8[None]), atol=1e-5)
    half = model.sample(conditions, INRSampling(toward=toward, mix=0.5), make_generators([0]))
    assert torch.allclose(half, model.decode(model.encode(torch.stack([a, b8])).mean(0, keepdim=True)), atol=1e-5)
    with pytest.raises(ValueError, match="toward: image is not valid base64"):
        model.sample(conditions, INRSampling(toward="not an image!"), make_generators([0]))


def test_unconditional_models_sample_without_an_image():
    model = _model(conditioning="none")
    assert model.condition_kind == "none"
    images = model.generate(3, seed=4)
    assert images.shape == (3, 1, 8, 8)
    assert torch.allclose(images[1:2], model.generate(1, seed=5), atol=1e-6)
