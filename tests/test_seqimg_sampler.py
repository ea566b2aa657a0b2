"""The categorical sampler: the two-level inverse CDF draws what the plain one
draws, respects top-k exactly, and matches the distribution it is given."""
from __future__ import annotations

import torch

from raygen.models.seqimg.sampling import CategoricalSampler, inverse_cdf


def _one_level(probs, u):
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, u.double() * cdf[..., -1:]).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def test_two_level_search_equals_one_level_search():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 48, 256, generator=g) * 3, -1)
    u = torch.rand(64, 48, 1, generator=g)
    two = inverse_cdf(probs, u)
    one = _one_level(probs, u)
    # float32 block sums against a float64 reference: only draws that land
    # within rounding of a level boundary may differ, and then by one level
    differ = two != one
    assert differ.float().mean() < 1e-3
    assert (two - one).abs().max() <= 1
    # sizes that do not split into blocks take the one-level path
    odd = torch.softmax(torch.randn(10, 7, generator=g), -1)
    u_odd = torch.rand(10, 1, generator=g)
    assert torch.equal(inverse_cdf(odd, u_odd), _one_level(odd, u_odd))


def test_extreme_uniforms_never_pick_a_level_of_probability_zero():
    probs = torch.zeros(4, 256)
    probs[0, [17, 200]] = 0.5          # mass in two blocks, with empty blocks between
    probs[1, 255] = 1.0                # all mass on the last level
    probs[2, 0] = 1.0                  # all mass on the first level
    probs[3, 31] = 1e-30               # a tiny level before a big one
    probs[3, 32] = 1.0
    for value in (0.0, 1e-12, 0.5, 1 - 2 ** -24):
        u = torch.full((4, 1), value)
        levels = inverse_cdf(probs, u)
        assert (probs.gather(-1, levels[:, None]) > 0).all(), (value, levels)


def test_top_k_and_temperature_zero():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 3, 256, generator=g)
    allowed = logits.topk(5, dim=-1).indices
    drawn = CategoricalSampler(temperature=1.3, top_k=5)(logits, torch.Generator().manual_seed(2))
    assert (allowed == drawn.unsqueeze(-1)).any(-1).all()
    assert torch.equal(CategoricalSampler(temperature=0.0)(logits), logits.argmax(-1))


def test_draws_follow_the_softmax_distribution():
    logits = torch.linspace(-3, 3, 256)
    probs = torch.softmax(logits, -1)
    n = 200_000
    drawn = CategoricalSampler()(logits.expand(n, 256), torch.Generator().manual_seed(3))
    counts = torch.bincount(drawn, minlength=256).double()
    expected = probs.double() * n
    # chi-square with 255 degrees of freedom: mean 255, sd ~22.6; a wrong
    # block/offset computation gives values in the thousands
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 400, chi2
    # temperature sharpens: at T=0.5 the top level's share follows softmax(logits / 0.5)
    sharp = CategoricalSampler(temperature=0.5)(logits.expand(n, 256), torch.Generator().manual_seed(4))
    top_share = (sharp == 255).double().mean().item()
    assert abs(top_share - torch.softmax(logits / 0.5, -1)[-1].item()) < 0.01
