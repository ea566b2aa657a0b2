"""Causality of every backbone in every patch mode: the prediction for patch t
depends only on patches 0..t-1 (never on patch t or anything after it)."""
from __future__ import annotations

import pytest
import torch

from raygen.models.base import DataInfo
from raygen.models.layers import NORMS, RESIDUALS
from raygen.models.seqimg import BACKBONES, SeqImgConfig, build_seqimg


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: one intra-op thread avoids oversubscribing shared cores (30x faster under load)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

INFO = DataInfo(channels=2, resolution=8)  # two channels: the channel layout inside a patch is exercised too
MODES = {"rowwise": 1, "columnwise": 1, "square": 2}


def _model(backbone, mode, **options):
    torch.manual_seed(0)
    cfg = SeqImgConfig.debug(backbone=backbone, patch_mode=mode, patch_size=MODES[mode], head="regression_l2",
                             **options)
    return build_seqimg(cfg, INFO).double().eval()


def _assert_causal(model):
    geo = model.geometry
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, geo.channels, geo.height, geo.width, generator=g, dtype=torch.float64)
    base = model.predict({"image": images})
    patches = geo.patchify(images)
    n = geo.num_patches
    assert base.shape[1] == n
    for t in range(n):
        changed = patches.clone()
        changed[:, t:] = torch.rand(changed[:, t:].shape, generator=g, dtype=torch.float64)
        out = model.predict({"image": geo.unpatchify(changed)})
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"prediction for patch <= {t} saw patch >= {t}"
        if t + 1 < n:  # and the change is seen where it is allowed to be
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:]), f"patch {t} never reached later predictions"


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_backbone_is_causal(backbone, mode):
    _assert_causal(_model(backbone, mode))


@pytest.mark.parametrize("norm", list(NORMS))
def test_causal_with_every_norm(norm):
    model = _model("mlp", "square", norm=norm)
    model.train()
    model.predict({"image": torch.rand(4, 2, 8, 8, dtype=torch.float64)})  # batch norm gathers running stats
    _assert_causal(model.eval())


@pytest.mark.parametrize("residual", list(RESIDUALS))
def test_causal_with_every_residual(residual):
    _assert_causal(_model("convnet", "rowwise", residual=residual, glu=True, activation="pwlu"))


def test_causal_options_of_the_transformers():
    _assert_causal(_model("gpt2", "square", pos_embedding="rotary"))
    _assert_causal(_model("gpt2", "rowwise", pos_embedding="sinusoidal"))
    _assert_causal(_model("modern", "columnwise", pos_embedding="learned", layer_scale=0.5))
    _assert_causal(_model("mlp", "rowwise", mlp_token_mixing=False))
    _assert_causal(_model("gnn", "square", gnn_radius=2))
