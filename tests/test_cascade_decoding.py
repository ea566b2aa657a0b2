"""Decoding of the cascade: beam search against exhaustive search, greedy and sampling as its special cases,
top-k/top-p, causality and KV cache of the base and the refiners, and the whole chain down to images."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from raygen.models import Conditions, DataInfo, build_model, make_generators, parse_params
from raygen.models.cascade.beam import decode, filter_logits
from raygen.models.cascade.config import CascadeSampling, LevelDecoding, TransformerOptions
from raygen.models.cascade.transformer import BaseStepper, BaseTransformer, Refiner, RefinerStepper


def opts(**kw) -> TransformerOptions:
    return TransformerOptions(**{"in_dim": 16, "hidden_dim": 32, "num_enc_layers": 2, "num_dec_layers": 2,
                                 "self_attn_heads": 2, "cross_attn_heads": 4, **kw})


def base_model(n=3, vocab=3, cond_vocab=0, **kw) -> BaseTransformer:
    torch.manual_seed(1)
    m = BaseTransformer(opts(**kw), n_tokens=n, vocab=vocab, cond_vocab=cond_vocab, n_starts=2).eval()
    with torch.no_grad():  # sharper than the init's near-uniform logits, so the search has something to find
        m.head.weight.mul_(40)
        m.cond_head.weight.mul_(40)
    return m


def sequence_loglik(m: BaseTransformer, seqs: torch.Tensor) -> torch.Tensor:
    """Sum of log p over every token of each sequence (no cond), by teacher forcing."""
    _, logits = m(torch.zeros(len(seqs), dtype=torch.long), None, torch.cat([seqs, seqs[:, :1]], 1))
    logp = torch.log_softmax(logits.double(), -1)[:, : seqs.shape[1]]
    return logp.gather(-1, seqs[..., None]).squeeze(-1).sum(1)


def run(m, settings, seed=0, n=1, cached=True):
    st = BaseStepper(m, torch.zeros(n, dtype=torch.long), cached=cached)
    ll = decode(st, make_generators(range(seed, seed + n)), LevelDecoding(**settings))
    return st.tokens()[1], ll


def test_beam_search_equals_exhaustive_search_on_a_tiny_vocabulary():
    m = base_model(n=3, vocab=3)
    every = torch.tensor(list(itertools.product(range(3), repeat=3)))
    with torch.no_grad():
        ll = sequence_loglik(m, every)
    best = every[int(ll.argmax())]
    tokens, score = run(m, {"temperature": 0.0, "beam_width": 9, "num_beam": 3})
    assert torch.equal(tokens[0], best)
    assert math.isclose(float(score[0]) * 3, float(ll.max()), abs_tol=1e-5)  # length-normalised log-likelihood
    # the search matters here: greedy decoding finds a worse sequence on this model
    greedy, greedy_score = run(m, {"temperature": 0.0, "beam_width": 1, "num_beam": 3})
    assert float(greedy_score[0]) <= float(score[0])


def test_beam_width_one_is_greedy():
    m = base_model(n=4, vocab=5)
    tokens, _ = run(m, {"temperature": 0.0, "beam_width": 1, "num_beam": 4})
    prefix = torch.zeros(1, 0, dtype=torch.long)
    for t in range(4):  # argmax of the next token, recomputed from scratch at every step
        _, logits = m(torch.zeros(1, dtype=torch.long), None, torch.cat([prefix, prefix.new_zeros(1, 1)], 1))
        prefix = torch.cat([prefix, logits[:, t].argmax(-1, keepdim=True)], 1)
    assert torch.equal(tokens, prefix)


def test_beam_search_is_bounded_by_exhaustive_search_and_reaches_it_when_wide_enough():
    m = base_model(n=4, vocab=5)
    every = torch.tensor(list(itertools.product(range(5), repeat=4)))
    with torch.no_grad():
        best = float(sequence_loglik(m, every).max()) / 4
    scores = [float(run(m, {"temperature": 0.0, "beam_width": w, "num_beam": 5})[1][0]) for w in (1, 5, 125)]
    assert all(s <= best + 1e-6 for s in scores)
    assert math.isclose(scores[-1], best, abs_tol=1e-6)  # 125 = V^(L-1) hypotheses: nothing is ever dropped


def test_plain_sampling_follows_the_tempered_distribution():
    m = base_model(n=1, vocab=4)
    with torch.no_grad():
        m.head.weight.div_(40)
    _, logits = m(torch.zeros(1, dtype=torch.long), None, torch.zeros(1, 2, dtype=torch.long))
    for temperature in (1.0, 2.0):
        expected = torch.softmax(logits[0, 0].double() / temperature, -1)
        tokens, _ = run(m, {"temperature": temperature}, n=3000)
        freq = torch.bincount(tokens[:, 0], minlength=4).double() / 3000
        assert (freq - expected).abs().max() < 0.03, (freq, expected)


def test_a_batch_decodes_like_its_images_one_by_one_with_beams_and_sampled_candidates():
    m = base_model(n=4, vocab=6)
    settings = {"temperature": 1.3, "beam_width": 3, "num_beam": 2, "top_k": 5, "top_p": 0.9}
    batch, ll = run(m, settings, seed=10, n=4)
    for i in range(4):
        alone, ll_i = run(m, settings, seed=10 + i, n=1)
        assert torch.equal(batch[i], alone[0]) and torch.allclose(ll[i], ll_i[0])


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, True, False]]
    p = torch.softmax(logits, -1)[0]  # 0.032, 0.644, 0.087, 0.237
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[False, True, False, True]]  # 0.644 < 0.7, so the second most likely joins
    assert (~torch.isinf(filter_logits(logits, top_p=float(p[1]) - 0.01))).sum() == 1  # the top token always stays
    tokens, _ = run(base_model(n=3, vocab=6), {"temperature": 5.0, "top_k": 1}, n=8)
    greedy, _ = run(base_model(n=3, vocab=6), {"temperature": 0.0})
    assert torch.equal(tokens, greedy.expand(8, -1))  # top-k 1 leaves nothing to sample


# ---------------------------------------------------------------- transformers: causality, cache
@pytest.mark.parametrize("window", [None, 2])
def test_base_is_causal_and_its_cache_equals_recompute(window):
    kw = {"use_sliding_window": True, "sliding_window": window} if window else {}
    m = base_model(n=6, vocab=7, cond_vocab=5, **kw)
    starts, cond = torch.tensor([0, 1]), torch.tensor([3, 1])
    tokens = torch.randint(7, (2, 6), generator=torch.Generator().manual_seed(0))
    cond_logits, logits = m(starts, cond, tokens)
    changed = tokens.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 7
    _, logits2 = m(starts, cond, changed)
    assert torch.equal(logits[:, :4], logits2[:, :4]) and not torch.allclose(logits[:, 4:], logits2[:, 4:])
    for cached in (True, False):
        st = BaseStepper(m, starts, cached=cached)
        steps = [st.first()] + [st.feed(t) for t in [cond, *tokens[:, :-1].unbind(1)]]
        assert torch.allclose(steps[0], cond_logits, atol=1e-5)
        assert torch.allclose(torch.stack(steps[1:], 1), logits, atol=1e-5)
    st = BaseStepper(m, starts, cached=True, cond=cond)  # a forced cond token: the first prediction is t_1
    assert torch.allclose(st.first(), logits[:, 0], atol=1e-5)


def test_a_sliding_window_hides_older_tokens():
    m = base_model(n=6, vocab=7, use_sliding_window=True, sliding_window=2, num_dec_layers=1)
    tokens = torch.randint(7, (1, 6), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 7
    _, a = m(torch.zeros(1, dtype=torch.long), None, tokens)
    _, b = m(torch.zeros(1, dtype=torch.long), None, changed)
    # position 1 holds t_1 (input index 1): queries at 1 and 2 see it; from query 3 on it is outside the window
    assert not torch.allclose(a[:, 1], b[:, 1]) and torch.equal(a[:, 3:], b[:, 3:])


@pytest.mark.parametrize("window", [None, 3])
def test_refiner_decoder_is_causal_encoder_is_not_and_cache_equals_recompute(window):
    kw = {"use_sliding_window": True, "sliding_window": window} if window else {}
    torch.manual_seed(0)
    r = Refiner(opts(**kw), n_prev=4, prev_vocab=5, n_tokens=8, vocab=6, cond_vocab=3).eval()
    g = torch.Generator().manual_seed(1)
    cond, prev, tokens = torch.tensor([0, 2]), torch.randint(5, (2, 4), generator=g), torch.randint(6, (2, 8), generator=g)
    logits = r(cond, prev, tokens)
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 6
    assert torch.equal(logits[:, :6], r(cond, prev, changed)[:, :6])
    other = prev.clone()
    other[:, -1] = (other[:, -1] + 1) % 5
    assert not torch.allclose(logits[:, 0], r(cond, other, tokens)[:, 0])  # the first token sees all of the encoder
    for cached in (True, False):
        st = RefinerStepper(r, cond, prev, cached=cached)
        steps = [st.first()] + [st.feed(t) for t in tokens[:, :-1].unbind(1)]
        assert torch.allclose(torch.stack(steps, 1), logits, atol=1e-5)


# ---------------------------------------------------------------- the whole chain
@pytest.fixture(scope="module")
def cascade():
    from raygen.models.cascade import FAMILY
    config, info, components = FAMILY.debug()["label-window-ckpt"]
    torch.manual_seed(0)
    return build_model("cascade", config, info, components).eval()


def test_the_cascade_decodes_to_images_of_the_right_shape_at_every_level(cascade):
    conditions = Conditions.parse("label", ["square", 0, None], cascade.data_info)
    params = parse_params(CascadeSampling, {"level_settings": "0:beam_width=3,num_beam=2,temperature=0;"
                                                                "1:temperature=0.7,top_k=4"})
    out = cascade.sample_tokens(conditions, params, make_generators([0, 1, 2]))
    assert [t.shape for t in out["tokens"]] == [(3, 4), (3, 16)] and out["cond"].shape == (3,)
    assert all(ll.shape == (3,) and (ll <= 0).all() for ll in out["loglik"])
    rows = cascade.sample_levels(conditions, params, make_generators([0, 1, 2]))
    assert [r.shape for r in rows] == [(3, 1, 16, 16)] * 2
    assert torch.equal(rows[-1], cascade.sample(conditions, params, make_generators([0, 1, 2])))
    base_only = cascade.sample(conditions, params.model_copy(update={"levels": 0}), make_generators([0, 1, 2]))
    assert torch.equal(base_only, rows[0])  # the refiners draw after the base, so the base output is the same
    forced = cascade.sample_tokens(conditions, params.model_copy(update={"cond_token": 2}), make_generators([5] * 3))
    assert forced["cond"].tolist() == [2, 2, 2]
    uncached = cascade.sample_tokens(conditions, params.model_copy(update={"cache": False}), make_generators([0, 1, 2]))
    assert all(torch.equal(a, b) for a, b in zip(out["tokens"], uncached["tokens"]))


def test_level_settings_are_checked_like_fields():
    from raygen.models import SamplingParamsError
    p = parse_params(CascadeSampling, {"temperature": 0.5, "level_settings": "1:beam_width=8,num_beam=4"})
    assert p.for_level(0) == LevelDecoding(temperature=0.5)
    assert p.for_level(1) == LevelDecoding(temperature=0.5, beam_width=8, num_beam=4)
    for bad, words in [("1:beam=3", "keys are"), ("x:top_k=2", "LEVEL:key=value"), ("0:top_p=2", "top_p")]:
        with pytest.raises(SamplingParamsError) as err:
            parse_params(CascadeSampling, {"level_settings": bad})
        assert err.value.field == "level_settings" and words in str(err.value) and "\n" not in str(err.value)


def test_training_on_latents_equals_training_on_images(cascade):
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    latents = cascade.components["autoencoder"].encode(images)
    a = cascade.tokenize({"image": images})
    b = cascade.tokenize({"latent": latents})
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    cascade.eval()
    labels = torch.tensor([0, 1, 2, 0])
    loss_a = cascade.training_step({"image": images, "label": labels})["loss"]
    loss_b = cascade.training_step({"latent": latents, "label": labels})["loss"]
    assert torch.allclose(loss_a, loss_b)


def test_built_on_latent_data_it_samples_images(cascade):
    c, h, w = cascade.latent_shape
    info = DataInfo(channels=c, height=h, width=w, num_classes=3, class_names=["a", "b", "c"])
    comps = dict(cascade.components.items())
    model = build_model("cascade", cascade.config, info, comps)
    assert model.data_info.shape == (1, 16, 16) and model.data_info.class_names == ["a", "b", "c"]
    with pytest.raises(ValueError, match="latent maps"):
        build_model("cascade", cascade.config, DataInfo(channels=1, resolution=12), comps)
    with pytest.raises(ValueError, match="train_levels"):
        build_model("cascade", cascade.config.model_copy(update={"train_levels": [2]}), info, comps)


def test_train_levels_trains_only_those_levels(cascade):
    model = build_model("cascade", cascade.config.model_copy(update={"train_levels": [1]}),
                        cascade.data_info, dict(cascade.components.items()))
    out = model.training_step({"image": torch.rand(2, 1, 16, 16), "label": torch.tensor([0, 1])})
    out["loss"].backward()
    assert "level1_ce" in out and "level0_ce" not in out
    assert all(p.grad is None for p in model.base.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.refiners.parameters())
