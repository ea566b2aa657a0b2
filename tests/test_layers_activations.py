"""The seed's 23 activations: numbering, forward formulas, gradients, inits."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raygen.models.layers import ACTIVATIONS, FeedForward, activation_name, init_linear, make_activation
from raygen.models.layers.activations import GOLU_MIN, HELU_ALPHA


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: one intra-op thread avoids oversubscribing shared cores (30x faster under load)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SEED_ORDER = ["sigmoid", "tanh", "sine", "relu", "selu", "cone", "golu", "prelu", "leaky_relu", "leaky_relu_0.2",
              "leaky_relu_-1", "silu", "gelu", "telu", "square", "growing_sine", "growing_cosine", "helu", "sign",
              "aglu", "pwlu", "parabolic_cone", "identity"]


def _ref_telu(x):
    return x * torch.tanh(torch.exp(torch.clamp(x, max=5.0)))


def _ref_cone(x):
    return 1 - (x - 1).abs()


# The seed's definitions, written out independently of the implementation.
REFERENCE = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "sine": torch.sin,
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "selu": lambda x: 1.0507009873554805 * torch.where(x > 0, x, 1.6732632423543772 * (torch.exp(x) - 1)),
    "cone": _ref_cone,
    "golu": lambda x: torch.clamp(x, min=-5.0) * torch.exp(-torch.exp(-torch.clamp(x, min=-5.0))),
    "prelu": lambda x: torch.where(x > 0, x, 0.25 * x),
    "leaky_relu": lambda x: torch.where(x > 0, x, 0.01 * x),
    "leaky_relu_0.2": lambda x: torch.where(x > 0, x, 0.2 * x),
    "leaky_relu_-1": lambda x: x.abs(),
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "telu": _ref_telu,
    # the centre of the square: equal blend of the four corners
    "square": lambda x: 0.25 * (torch.tanh(x) + _ref_telu(x) + torch.sin(x) + _ref_cone(x)),
    "growing_sine": lambda x: x * torch.sin(x),
    "growing_cosine": lambda x: x * torch.cos(x),
    "helu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "sign": torch.sign,
    "aglu": lambda x: x * torch.sigmoid(x),   # lam = kappa = 1 at init: SiLU
    "pwlu": lambda x: x,                     # initialized as the identity
    "parabolic_cone": lambda x: x * (2 - x),
    "identity": lambda x: x,
}


def test_numbering_matches_the_seed():
    assert list(ACTIVATIONS) == SEED_ORDER
    for number, name in enumerate(SEED_ORDER):
        assert ACTIVATIONS[name].number == number
        assert activation_name(number) == name
        assert activation_name(name) == name


def test_unknown_activation_lists_choices():
    with pytest.raises(ValueError, match="golu"):
        activation_name("gelu2")
    with pytest.raises(ValueError, match="0-22"):
        activation_name(23)


@pytest.mark.parametrize("name", SEED_ORDER)
def test_forward_matches_seed_definition(name):
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    act = make_activation(name).double()
    torch.testing.assert_close(act(x), REFERENCE[name](x), rtol=1e-6, atol=1e-9)
    # by number too, and every layer gets its own module (own parameters)
    assert type(make_activation(SEED_ORDER.index(name))) is type(act)
    assert make_activation(name) is not make_activation(name)


SMOOTH = ["sigmoid", "tanh", "sine", "silu", "gelu", "growing_sine", "growing_cosine", "parabolic_cone", "aglu",
          "square", "identity"]


@pytest.mark.parametrize("name", SMOOTH)
def test_smooth_gradients_are_exact(name):
    act = make_activation(name).double()
    x = (torch.randn(40, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(act, (x,))


def test_helu_backward_threshold_is_shifted_left():
    act = make_activation("helu")
    x = torch.tensor([-1.0, -0.06, -0.04, -0.01, 0.0, 0.3, 2.0], requires_grad=True)
    y = act(x)
    assert torch.equal(y, torch.relu(x))
    y.sum().backward()
    # gradient 1 wherever x > -alpha, even where the forward output is 0
    expected = (x.detach() > -HELU_ALPHA).float()
    assert torch.equal(x.grad, expected)
    assert HELU_ALPHA == 0.05
    assert x.grad[2] == 1.0 and y[2] == 0.0


def test_golu_clamp_keeps_gradients_finite():
    act = make_activation("golu")
    x = torch.tensor([-1e4, -100.0, -6.0, -5.0 + 1e-3, -1.0, 0.0, 1.5, 10.0], requires_grad=True)
    y = act(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    below = x.detach() < GOLU_MIN
    assert (x.grad[below] == 0).all()  # clamped: no gradient below -5
    # above the clamp: d/dx x exp(-e^{-x}) = exp(-e^{-x}) (1 + x e^{-x})
    xd = x.detach()[~below].double()
    analytic = torch.exp(-torch.exp(-xd)) * (1 + xd * torch.exp(-xd))
    torch.testing.assert_close(x.grad[~below].double(), analytic, rtol=1e-4, atol=1e-6)
    # the unclamped formula is what produced the seed's NaNs
    raw = torch.tensor([-100.0], requires_grad=True)
    (raw * torch.exp(-torch.exp(-raw))).sum().backward()
    assert torch.isnan(raw.grad).all()


def test_telu_gradient_and_clamp():
    act = make_activation("telu").double()
    x = torch.tensor([-3.0, -0.5, 0.0, 1.0, 4.0, 6.0, 20.0], dtype=torch.float64, requires_grad=True)
    act(x).sum().backward()
    xd = x.detach()
    e = torch.exp(xd.clamp(max=5.0))
    inner = torch.where(xd < 5, xd * (1 - torch.tanh(e) ** 2) * e, torch.zeros_like(xd))
    torch.testing.assert_close(x.grad, torch.tanh(e) + inner)


def test_sign_uses_straight_through_gradient():
    act = make_activation("sign")
    x = torch.tensor([-2.0, -0.5, 0.25, 0.9, 1.5], requires_grad=True)
    act(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_square_interpolates_its_corners():
    act = make_activation("square").double()
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    corners = {(-30.0, -30.0): torch.tanh, (30.0, -30.0): _ref_telu, (-30.0, 30.0): torch.sin, (30.0, 30.0): _ref_cone}
    for (px, py), fn in corners.items():
        with torch.no_grad():
            act.p.copy_(torch.tensor([px, py]))
        torch.testing.assert_close(act(x), fn(x), atol=1e-10, rtol=1e-10)
    assert sum(p.numel() for p in act.parameters()) == 2


def test_aglu_interpolates_silu_and_gumbel():
    act = make_activation("aglu").double()
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    with torch.no_grad():
        act.lam.fill_(1e-4)
        act.kappa.fill_(1.5)
    # lam -> 0: Gumbel gate exp(-exp(-kappa x))
    torch.testing.assert_close(act(x), x * torch.exp(-torch.exp(-1.5 * x)), atol=2e-3, rtol=1e-3)


def test_pwlu_has_32_trainable_breakpoints_and_fits_a_kink():
    act = make_activation("pwlu")
    assert act.breakpoints.numel() == 32 and act.breakpoints.requires_grad and act.deltas.requires_grad
    x = torch.linspace(-3, 3, 200)
    target = torch.where(x > 0.5, 3 * (x - 0.5), -0.5 * (x - 0.5))
    opt = torch.optim.Adam(act.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss = (act(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01


def test_prelu_slope_is_trainable():
    act = make_activation("prelu")
    assert [p.shape for p in act.parameters()] == [torch.Size([1])]


# ---------------------------------------------------------------- initialization statistics
FAN = 512


def _weights(name, glu=False):
    torch.manual_seed(0)
    ff = FeedForward(FAN, FAN, name, glu=glu)
    w = ff.inp.weight.detach().double()
    return (w[:FAN] if glu else w), ff.inp.bias.detach()


def _is_normal_like(w):
    """Share beyond 2 sigma: 4.6% for a normal, 0 for a uniform."""
    return ((w.abs() > 2 * w.std()).double().mean().item()) > 0.03


def test_init_sine_is_siren_uniform():
    w, b = _weights("sine")
    bound = math.sqrt(6 / FAN)
    assert w.abs().max() <= bound and w.abs().max() > 0.98 * bound
    assert w.std().item() == pytest.approx(math.sqrt(2 / FAN), rel=0.03)
    assert not _is_normal_like(w) and (b == 0).all()


def test_init_selu_is_lecun_normal():
    w, b = _weights("selu")
    assert w.std().item() == pytest.approx(math.sqrt(1 / FAN), rel=0.03)
    assert abs(w.mean().item()) < 0.05 * w.std().item()
    assert _is_normal_like(w) and (b == 0).all()


@pytest.mark.parametrize("name,gain", [("sigmoid", 1.0), ("tanh", 5 / 3)])
def test_init_sigmoid_tanh_use_their_xavier_gain(name, gain):
    w, _ = _weights(name)
    bound = gain * math.sqrt(6 / (2 * FAN))
    assert w.abs().max() <= bound + 1e-9 and w.abs().max() > 0.98 * bound
    assert w.std().item() == pytest.approx(gain * math.sqrt(2 / (2 * FAN)), rel=0.03)


@pytest.mark.parametrize("name", ["growing_sine", "growing_cosine"])
def test_init_growing_is_unit_gain_normal(name):
    w, _ = _weights(name)
    assert w.std().item() == pytest.approx(math.sqrt(2 / (2 * FAN)), rel=0.03)
    assert _is_normal_like(w)


OTHERS = [n for n in SEED_ORDER if ACTIVATIONS[n].init == "xavier_relu"]


@pytest.mark.parametrize("name", OTHERS)
def test_init_others_are_xavier_with_relu_gain(name):
    w, b = _weights(name)
    gain = math.sqrt(2)
    assert w.abs().max() <= gain * math.sqrt(6 / (2 * FAN)) + 1e-9
    assert w.std().item() == pytest.approx(gain * math.sqrt(2 / (2 * FAN)), rel=0.03)
    assert (b == 0).all()


def test_glu_gate_half_gets_the_activation_init():
    torch.manual_seed(0)
    ff = FeedForward(FAN, FAN, "selu", glu=True)
    gate, value = ff.inp.weight.detach()[:FAN], ff.inp.weight.detach()[FAN:]
    assert gate.std().item() == pytest.approx(math.sqrt(1 / FAN), rel=0.03)        # LeCun
    assert value.std().item() == pytest.approx(math.sqrt(2 / (2 * FAN)), rel=0.03)  # Xavier
    x = torch.randn(3, FAN)
    h = ff.inp(x)
    expected = ff.out(nn.functional.selu(h[:, :FAN]) * h[:, FAN:])
    torch.testing.assert_close(ff(x), expected)


def test_init_linear_by_number():
    layer = nn.Linear(FAN, FAN)
    init_linear(layer, 4)  # SELU
    assert layer.weight.std().item() == pytest.approx(math.sqrt(1 / FAN), rel=0.03)


def _piecewise_grads():
    selu_scale, selu_alpha = 1.0507009873554805, 1.6732632423543772
    one = torch.ones(())
    return {
        "relu": lambda x: (x > 0).double(),
        "leaky_relu": lambda x: torch.where(x > 0, one, 0.01 * one).double(),
        "leaky_relu_0.2": lambda x: torch.where(x > 0, one, 0.2 * one).double(),
        "leaky_relu_-1": lambda x: torch.where(x > 0, one, -one).double(),
        "prelu": lambda x: torch.where(x > 0, one, 0.25 * one).double(),
        "cone": lambda x: -torch.sign(x - 1),
        "selu": lambda x: torch.where(x > 0, selu_scale * one, selu_scale * selu_alpha * torch.exp(x)).double(),
        "pwlu": lambda x: torch.ones_like(x),
    }


@pytest.mark.parametrize("name", list(_piecewise_grads()))
def test_piecewise_gradients_match_their_derivative(name):
    x = torch.linspace(-4, 4, 997, dtype=torch.float64)
    x = x[((x.abs() > 1e-3) & ((x - 1).abs() > 1e-3))].clone().requires_grad_()
    make_activation(name).double()(x).sum().backward()
    torch.testing.assert_close(x.grad, _piecewise_grads()[name](x.detach()))


def test_pwlu_gradient_after_training_moves_it():
    act = make_activation("pwlu").double()
    with torch.no_grad():
        act.deltas.copy_(torch.randn(32, dtype=torch.float64))
        act.slope.fill_(0.7)
    x = (torch.rand(500, dtype=torch.float64) * 8 - 4).requires_grad_()
    act(x).sum().backward()
    expected = 0.7 + ((x.detach()[:, None] > act.breakpoints.detach()) * act.deltas.detach()).sum(-1)
    torch.testing.assert_close(x.grad, expected)
