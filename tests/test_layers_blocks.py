"""Norms, residual joins, DropPath, layer scale, positional embeddings."""
from __future__ import annotations

import math

import pytest
import torch

from raygen.models.layers import (NORM_NUMBERS, NORMS, RESIDUAL_NUMBERS, RESIDUALS, Branch, DropPath, Rotary,
                                  alibi_slopes, make_norm, make_positional, make_residual, norm_name,
                                  residual_name, sinusoidal_table)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: one intra-op thread avoids oversubscribing shared cores (30x faster under load)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _seq(b=3, t=7, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, d, generator=g, dtype=torch.float64) * 2 + 0.5


# ---------------------------------------------------------------- norms
def test_norm_registry_and_seed_numbers():
    assert NORM_NUMBERS == {0: "none", 1: "instance", 2: "batch", 3: "rms", 4: "layer"}
    assert set(NORMS) == set(NORM_NUMBERS.values())
    assert norm_name(3) == "rms"
    with pytest.raises(ValueError, match="layer"):
        norm_name("group")


def test_rms_norm_formula():
    x = _seq()
    norm = make_norm("rms", 6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1, 7, dtype=torch.float64))
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * torch.arange(1, 7)
    torch.testing.assert_close(norm(x), expected)


def test_layer_norm_zero_mean_unit_var():
    y = make_norm("layer", 6).double()(_seq())
    torch.testing.assert_close(y.mean(-1), torch.zeros(3, 7, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(3, 7, dtype=torch.float64), atol=1e-4, rtol=0)


def test_instance_norm_uses_prefix_statistics_only():
    x = _seq()
    norm = make_norm("instance", 6).double()
    y = norm(x)
    for t in range(x.shape[1]):
        prefix = x[:, : t + 1]
        mean, var = prefix.mean(1), prefix.var(1, unbiased=False)
        torch.testing.assert_close(y[:, t], (x[:, t] - mean) / torch.sqrt(var + 1e-5))
    # the future never leaks in
    x2 = x.clone()
    x2[:, 4:] += 10
    torch.testing.assert_close(norm(x2)[:, :4], y[:, :4])


@pytest.mark.parametrize("kind", list(NORMS))
def test_norm_step_equals_forward(kind):
    x = _seq()
    norm = make_norm(kind, 6).double()
    norm(x)  # one training pass so batch norm has running statistics
    norm.eval()
    full = norm(x)
    state, steps = None, []
    for t in range(x.shape[1]):
        y, state = norm.step(x[:, t], state)
        steps.append(y)
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-12, rtol=1e-12)


def test_batch_norm_eval_is_per_token():
    norm = make_norm("batch", 6).double()
    norm(_seq())
    norm.eval()
    x = _seq(seed=1)
    x2 = x.clone()
    x2[:, 3:] = 0
    torch.testing.assert_close(norm(x2)[:, :3], norm(x)[:, :3])


# ---------------------------------------------------------------- residuals
def test_residual_registry_and_seed_numbers():
    assert RESIDUAL_NUMBERS == {0: "none", 1: "highway", 2: "standard", 3: "rezero"}
    assert set(RESIDUALS) == set(RESIDUAL_NUMBERS.values())
    assert residual_name(1) == "highway"
    with pytest.raises(ValueError, match="rezero"):
        residual_name("dense")


def test_residual_formulas():
    x, h = _seq(seed=2), _seq(seed=3)
    torch.testing.assert_close(make_residual("none", 6)(x, h), h)
    torch.testing.assert_close(make_residual("standard", 6)(x, h), x + h)
    rz = make_residual("rezero", 6).double()
    torch.testing.assert_close(rz(x, h), x)  # gamma starts at 0: identity
    with torch.no_grad():
        rz.gamma.fill_(0.3)
    torch.testing.assert_close(rz(x, h), x + 0.3 * h)
    hw = make_residual("highway", 6).double()
    t = torch.sigmoid(hw.gate(x))
    torch.testing.assert_close(hw(x, h), t * h + (1 - t) * x)
    assert (hw.gate.bias == -1).all()  # carry-biased start


def test_rezero_gamma_learns():
    rz = make_residual("rezero", 4)
    x, h = torch.randn(8, 4), torch.randn(8, 4, requires_grad=True)
    (rz(x, h) * h.detach()).sum().backward()
    assert rz.gamma.grad.abs().item() > 0


def test_drop_path_drops_whole_samples_and_keeps_expectation():
    dp = DropPath(0.25)
    h = torch.ones(4000, 3, 5)
    dp.train()
    out = dp(h)
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()
    assert out.mean().item() == pytest.approx(1.0, abs=0.05)
    dp.eval()
    assert torch.equal(dp(h), h)


def test_branch_layer_scale_and_no_droppath_without_skip():
    br = Branch(4, "standard", layer_scale=0.1)
    x, h = torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(br(x, h), x + 0.1 * h)
    assert br.scale.gamma.requires_grad
    assert Branch(4, "none", drop_path=0.5).drop_path.p == 0.0


# ---------------------------------------------------------------- positional
def test_sinusoidal_table_formula():
    table = sinusoidal_table(10, 8)
    pos, i = 7, 2
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 8)), abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 8)), abs=1e-6)


def test_positional_kinds():
    assert make_positional("none", 5, 4)(0, 5) is None
    learned = make_positional("learned", 5, 4)
    assert learned(1, 3).shape == (3, 4) and learned.table.requires_grad
    assert not any(p.requires_grad for p in make_positional("sinusoidal", 5, 4).parameters())
    with pytest.raises(ValueError, match="exceed"):
        learned(3, 3)


def test_rotary_scores_depend_only_on_offset():
    rot = Rotary(8)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(i, j):
        ci, si = rot.cos_sin(torch.tensor([i]), torch.float64)
        cj, sj = rot.cos_sin(torch.tensor([j]), torch.float64)
        return (Rotary.rotate(q, ci, si) * Rotary.rotate(k, cj, sj)).sum().item()

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-9)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-6)
    c, s = rot.cos_sin(torch.tensor([3]), torch.float64)
    assert Rotary.rotate(q, c, s).norm().item() == pytest.approx(q.norm().item())  # a rotation


def test_alibi_slopes():
    assert alibi_slopes(8).tolist() == pytest.approx([2 ** -(i + 1) for i in range(8)])
    assert alibi_slopes(4).tolist() == pytest.approx([2 ** (-2 * (i + 1)) for i in range(4)])
    six = alibi_slopes(6)
    assert len(six) == 6 and len(set(six.tolist())) == 6 and (six > 0).all()
