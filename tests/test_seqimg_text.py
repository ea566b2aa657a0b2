"""The built-in text encoder (raygen.models.text) that caption conditioning uses."""
from __future__ import annotations

import zlib

import pytest
import torch

from raygen.models.text import BOS, EOS, PAD, TextEncoder, TextEncoderConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: one intra-op thread avoids oversubscribing shared cores (30x faster under load)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _encoder(**kw):
    torch.manual_seed(0)
    return TextEncoder(TextEncoderConfig(dim=16, depth=2, heads=2, max_len=16, **kw)).eval()


def test_byte_tokens_and_mask():
    enc = _encoder()
    ids, mask = enc.tokenize(["ab", "", "héllo"])
    assert ids[0, :4].tolist() == [BOS, 3 + ord("a"), 3 + ord("b"), EOS]
    assert ids[1, :2].tolist() == [BOS, EOS] and (ids[1, 2:] == PAD).all()
    assert mask.sum(1).tolist() == [4, 2, 2 + len("héllo".encode())]
    assert torch.equal(mask, ids != PAD)


def test_long_captions_are_cut_keeping_eos():
    ids, mask = _encoder().tokenize(["x" * 100])
    assert ids.shape == (1, 16) and ids[0, -1].item() == EOS


def test_word_tokenizer_is_stable_and_case_blind():
    enc = _encoder(tokenizer="word", word_buckets=512)
    a, _ = enc.tokenize(["Red circle, blue square"])
    b, _ = enc.tokenize(["red CIRCLE , blue square"])
    assert torch.equal(a, b)
    assert a[0, 1].item() == 3 + zlib.crc32(b"red") % 512  # crc32: the same in every process, unlike hash()
    assert a.shape[1] == 2 + 5  # red, circle, ",", blue, square


def test_encode_shapes_padding_and_pooling():
    enc = _encoder()
    tokens, mask = enc.encode(["a red circle", "two blue squares on grey"])
    assert tokens.shape[:2] == mask.shape and tokens.shape[-1] == 16 and mask.dtype == torch.bool
    assert (tokens[~mask] == 0).all()
    pooled = enc.pooled(["a red circle", "two blue squares on grey"])
    expected = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(enc.pooled(tokens=tokens, mask=mask), expected)


def test_padding_does_not_change_a_caption_encoding():
    enc = _encoder()
    alone, _ = enc.encode(["a red circle"])
    batched, mask = enc.encode(["a red circle", "a much longer caption than the first one"])
    n = int(mask[0].sum())
    torch.testing.assert_close(batched[0, :n], alone[0, :n], atol=1e-5, rtol=1e-5)


def test_different_captions_differ_and_gradients_flow():
    enc = _encoder()
    enc.train()
    out = enc.pooled(["red", "blue"])
    assert not torch.allclose(out[0], out[1])
    out.pow(2).sum().backward()
    assert enc.token.weight.grad.abs().sum() > 0 and enc.pos.grad.abs().sum() > 0


def test_one_string_is_rejected():
    with pytest.raises(TypeError, match="list"):
        _encoder().encode("a red circle")
