"""Cached sampling (KV cache / recurrent state / buffers) equals re-running the
prefix, for every backbone; and the cache really is used."""
from __future__ import annotations

import pytest
import torch

from raygen.models.base import DataInfo
from raygen.models.seqimg import BACKBONES, SeqImgConfig, build_seqimg
from raygen.models.seqimg.backbones import Stack


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: one intra-op thread avoids oversubscribing shared cores (30x faster under load)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

INFO = DataInfo(channels=1, resolution=8, num_classes=3)


def _model(backbone, dtype=torch.float64, **options):
    torch.manual_seed(0)
    options = {"patch_mode": "square", "patch_size": 2, **options}
    return build_seqimg(SeqImgConfig.debug(backbone=backbone, **options), INFO).to(dtype).eval()


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_step_equals_forward(backbone):
    model = _model(backbone)
    x = torch.randn(3, model.seq_len, model.config.dim, dtype=torch.float64)
    full = model.backbone(x)
    state, steps = None, []
    for t in range(model.seq_len):
        y, state = model.backbone.step(x[:, t], state)
        steps.append(y)
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-10, rtol=1e-10)


def _pair(model, **kw):
    out = []
    for use_cache in (True, False):
        condition = [0, 2, None] if model.condition_kind == "label" else None  # None: a label drawn per image
        out.append(model.generate(3, condition=condition, seed=7, use_cache=use_cache, **kw))
    return out


@pytest.mark.parametrize("head", ["categorical", "regression_l1"])
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_cached_sampling_equals_uncached(backbone, head):
    model = _model(backbone, head=head, conditioning="label", patch_mode="rowwise", patch_size=1)
    cached, full = _pair(model, temperature=0.9, top_k=40)
    assert cached.shape == (3, 1, 8, 8)
    torch.testing.assert_close(cached, full, atol=1e-9, rtol=0)
    assert torch.equal((cached * 255).round(), (full * 255).round())
    assert cached.std() > 0  # not a degenerate constant image


@pytest.mark.parametrize("backbone", ["gpt2", "mamba", "gnn", "mingru"])
def test_cached_sampling_equals_uncached_float32(backbone):
    cached, full = _pair(_model(backbone, dtype=torch.float32, conditioning="label"))
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    assert torch.equal((cached * 255).round(), (full * 255).round())


def test_stateful_options_cache_exactly():
    # the causal instance norm carries its own running statistics in the cache
    for backbone in ("mlp", "modern", "convnet"):
        model = _model(backbone, norm="instance", residual="highway", glu=True, activation="square",
                       pos_embedding="sinusoidal" if backbone != "modern" else None)
        cached, full = _pair(model, temperature=1.0)
        torch.testing.assert_close(cached, full, atol=1e-9, rtol=0)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_cached_sampling_never_reruns_the_prefix(backbone, monkeypatch):
    model = _model(backbone, dtype=torch.float32)

    def forbidden(self, x):
        raise AssertionError("cached sampling called the full forward pass")

    monkeypatch.setattr(Stack, "forward", forbidden)
    images = model.generate(2, seed=0)
    assert images.shape == (2, 1, 8, 8)


def test_kv_cache_is_filled_one_key_per_patch():
    model = _model("gpt2")
    x = torch.randn(2, 3, model.config.dim, dtype=torch.float64)
    state = None
    for t in range(3):
        _, state = model.backbone.step(x[:, t], state)
    keys, values, filled = state[0]["mix"]
    assert filled == 3
    assert keys.shape == (2, model.config.heads, model.seq_len, model.config.dim // model.config.heads)
    attn = model.backbone.blocks[0].mixer
    expected_k = attn._heads(model.backbone.blocks[0].norm1(x))[1]
    torch.testing.assert_close(keys[:, :, :3], expected_k)
    with pytest.raises(ValueError, match="holds"):
        for _ in range(model.seq_len):
            _, state = model.backbone.step(x[:, 0], state)


def test_same_seed_same_images_other_seed_other_images():
    model = _model("gpt2", dtype=torch.float32)
    a = model.generate(2, seed=3)
    b = model.generate(2, seed=3)
    c = model.generate(2, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
