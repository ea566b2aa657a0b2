"""The cascade's fully convolutional autoencoder (family `cascade_ae`): the seed's options, shapes, and that it
learns to reconstruct."""
from __future__ import annotations

import pytest
import torch

from raygen.models import DataInfo, build_model
from raygen.models.cascade.config import AutoencoderConfig


@pytest.mark.parametrize("final", ["tanh", "sigmoid"])
def test_shapes_ranges_and_the_seed_options(final):
    model = build_model("cascade_ae", {"min_channel": 4, "max_channel": 16, "num_layers": 3, "latent_channel": 5,
                                       "hidden_activation_type": "relu", "decoder_activation_type": final},
                        DataInfo(channels=3, height=16, width=24))
    images = torch.rand(2, 3, 16, 24)
    z = model.encode(images)
    assert z.shape == (2, 5, 2, 3) and model.latent_shape == (5, 2, 3)
    assert z.abs().max() <= 1  # the tanh encoder activation bounds the latent map
    out = model.decode(z)
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 8, 16, 16, 16, 16, 5]  # doubling, capped at max_channel
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())  # fully convolutional
    free = build_model("cascade_ae", AutoencoderConfig.debug(use_final_enc_activation=False),
                       DataInfo(channels=1, resolution=8))
    assert not isinstance(free.encoder[-1], torch.nn.Tanh)


def test_bad_options_fail_with_one_line():
    with pytest.raises(ValueError, match="image_channel: 3 but the data has 1"):
        build_model("cascade_ae", {"image_channel": 3}, DataInfo(channels=1, resolution=8))
    with pytest.raises(ValueError, match="divisible by 8"):
        build_model("cascade_ae", {"num_layers": 3}, DataInfo(channels=1, resolution=12))
    with pytest.raises(ValueError, match="max_channel"):
        AutoencoderConfig(min_channel=64, max_channel=32)
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        AutoencoderConfig(hidden_activation_type="swishy")


def test_it_learns_to_reconstruct():
    torch.manual_seed(0)
    model = build_model("cascade_ae", AutoencoderConfig.debug(), DataInfo(channels=1, resolution=8))
    images = (torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = float(model.training_step({"image": images})["loss"].detach())
    for _ in range(60):
        opt.zero_grad()
        out = model.training_step({"image": images})
        out["loss"].backward()
        opt.step()
    assert float(out["loss"]) < 0.5 * first and float(out["psnr"]) > 0
