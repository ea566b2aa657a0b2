"""The 23 activations of seed 000, selectable by name or by the seed's number.

Each entry of `ACTIVATIONS` holds the seed's number, a factory that builds a
fresh module (several activations own trainable parameters, so every layer
gets its own), and the name of the initialization (`INITS`) that the linear
layer feeding the activation should get.

    make_activation("golu")  == make_activation(6)
    init_linear(layer, "sine")   # SIREN-like uniform init
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

HELU_ALPHA = 0.05   # seed: HeLU's backward threshold sits this far left of 0
GOLU_MIN = -5.0     # seed: GoLU's input is clamped here (exp(-x) overflows below, inf * 0 = NaN)
TELU_MAX = 5.0      # seed: TeLU clamps the exponent's input at 5
PWLU_BREAKPOINTS = 32
PWLU_RANGE = 3.0    # breakpoints start evenly spread over [-3, 3], where normalized inputs live


# ---------------------------------------------------------------- plain functions
def cone(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - (x - 1.0).abs()


def golu(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(min=GOLU_MIN)
    return x * torch.exp(-torch.exp(-x))


def telu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tanh(torch.exp(x.clamp(max=TELU_MAX)))


def growing_sine(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sin(x)


def growing_cosine(x: torch.Tensor) -> torch.Tensor:
    return x * torch.cos(x)


def parabolic_cone(x: torch.Tensor) -> torch.Tensor:
    return x * (2.0 - x)


class _HeLUFn(torch.autograd.Function):
    """ReLU forward; the backward lets gradient through for x > -alpha."""

    @staticmethod
    def forward(ctx, x, alpha: float):
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > -ctx.alpha).to(grad.dtype), None


class _SignSTE(torch.autograd.Function):
    """sign(x) forward. Its true gradient is zero everywhere, which would freeze
    every layer below it, so the backward is the straight-through estimator
    (the gradient of hardtanh: 1 on |x| <= 1, else 0)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


# ---------------------------------------------------------------- modules
class Lambda(nn.Module):
    """A parameter-free activation given as a function."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str):
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class HeLU(nn.Module):
    def __init__(self, alpha: float = HELU_ALPHA):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        return _HeLUFn.apply(x, self.alpha)


class Sign(nn.Module):
    def forward(self, x):
        return _SignSTE.apply(x)


class Square(nn.Module):
    """A point in a unit square whose corners are Tanh, TeLU, Sine and Cone.

    The trainable coordinates (u, v) = sigmoid(p) stay inside the square and the
    output is the bilinear blend of the four corners: tanh at (0, 0), TeLU at
    (1, 0), sine at (0, 1), cone at (1, 1). It starts at the centre.
    """

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        u, v = torch.sigmoid(self.p).unbind()
        return ((1 - u) * (1 - v) * torch.tanh(x) + u * (1 - v) * telu(x)
                + (1 - u) * v * torch.sin(x) + u * v * cone(x))


class AGLU(nn.Module):
    """Adaptive Gated Linear Unit: x * (1 + lam * exp(-kappa x)) ** (-1 / lam).

    lam = 1 gives x * sigmoid(kappa x) (SiLU), lam -> 0 the Gumbel gate
    x * exp(-exp(-kappa x)); both are trainable and start at 1 (SiLU). Written
    through softplus, which stays finite for any input.
    """

    def __init__(self):
        super().__init__()
        self.lam = nn.Parameter(torch.ones(1))
        self.kappa = nn.Parameter(torch.ones(1))

    def forward(self, x):
        lam = self.lam.clamp(min=1e-4)
        # log(1 + lam e^{-kx}) = softplus(-kx + log lam)
        return x * torch.exp(-F.softplus(-self.kappa * x + torch.log(lam)) / lam)


class PiecewiseLinear(nn.Module):
    """Trainable piecewise linear unit with 32 breakpoints.

    f(x) = bias + slope * x + sum_k delta_k * relu(x - b_k): the breakpoints b_k
    and every segment's slope change delta_k are trainable. It starts as the
    identity (slope 1, deltas 0), as the seed's does.
    """

    def __init__(self, n: int = PWLU_BREAKPOINTS, span: float = PWLU_RANGE):
        super().__init__()
        self.breakpoints = nn.Parameter(torch.linspace(-span, span, n))
        self.deltas = nn.Parameter(torch.zeros(n))
        self.slope = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        hinges = F.relu(x.unsqueeze(-1) - self.breakpoints)
        return self.bias + self.slope * x + (hinges * self.deltas).sum(-1)


# ---------------------------------------------------------------- initializations
def _zero_bias(layer: nn.Linear) -> None:
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def init_siren(layer: nn.Linear) -> None:
    """SIREN hidden-layer init with omega_0 folded into the weights:
    U(-sqrt(6/fan_in), sqrt(6/fan_in)), so sin(Wx) sees unit-scale arguments."""
    bound = math.sqrt(6.0 / layer.in_features)
    nn.init.uniform_(layer.weight, -bound, bound)
    _zero_bias(layer)


def init_lecun(layer: nn.Linear) -> None:
    """LeCun normal, N(0, 1/fan_in): the init SELU's self-normalization assumes."""
    nn.init.normal_(layer.weight, 0.0, 1.0 / math.sqrt(layer.in_features))
    _zero_bias(layer)


def _xavier(gain: float) -> Callable[[nn.Linear], None]:
    def init(layer: nn.Linear) -> None:
        nn.init.xavier_uniform_(layer.weight, gain=gain)
        _zero_bias(layer)
    return init


def init_growing(layer: nn.Linear) -> None:
    """x*sin(x) and x*cos(x) grow with |x|: Xavier normal with gain 1 keeps the
    pre-activations near unit scale, inside the first lobe, where they neither
    explode nor (for x*sin(x), which is ~x^2 at 0) vanish."""
    nn.init.xavier_normal_(layer.weight, gain=1.0)
    _zero_bias(layer)


INITS: dict[str, Callable[[nn.Linear], None]] = {
    "siren": init_siren,
    "lecun": init_lecun,
    "xavier_relu": _xavier(nn.init.calculate_gain("relu")),   # sqrt(2)
    "xavier_sigmoid": _xavier(nn.init.calculate_gain("sigmoid")),  # 1
    "xavier_tanh": _xavier(nn.init.calculate_gain("tanh")),   # 5/3
    "xavier": _xavier(1.0),
    "growing": init_growing,
}


# ---------------------------------------------------------------- the registry
@dataclass(frozen=True)
class ActivationInfo:
    number: int
    factory: Callable[[], nn.Module]
    init: str
    description: str


def _fn(fn, name):
    return lambda: Lambda(fn, name)


ACTIVATIONS: dict[str, ActivationInfo] = {
    "sigmoid": ActivationInfo(0, nn.Sigmoid, "xavier_sigmoid", "logistic sigmoid"),
    "tanh": ActivationInfo(1, nn.Tanh, "xavier_tanh", "hyperbolic tangent"),
    "sine": ActivationInfo(2, _fn(torch.sin, "sine"), "siren", "sin(x), SIREN-like init"),
    "relu": ActivationInfo(3, nn.ReLU, "xavier_relu", "max(0, x)"),
    "selu": ActivationInfo(4, nn.SELU, "lecun", "scaled ELU, LeCun init (best without residuals or norm)"),
    "cone": ActivationInfo(5, _fn(cone, "cone"), "xavier_relu", "1 - |x - 1|"),
    "golu": ActivationInfo(6, _fn(golu, "golu"), "xavier_relu", "x * exp(-exp(-x)), input clamped at -5"),
    "prelu": ActivationInfo(7, lambda: nn.PReLU(init=0.25), "xavier_relu", "leaky ReLU with a trainable slope (starts 0.25)"),
    "leaky_relu": ActivationInfo(8, lambda: nn.LeakyReLU(0.01), "xavier_relu", "leaky ReLU, slope 0.01"),
    "leaky_relu_0.2": ActivationInfo(9, lambda: nn.LeakyReLU(0.2), "xavier_relu", "leaky ReLU, slope 0.2"),
    "leaky_relu_-1": ActivationInfo(10, lambda: nn.LeakyReLU(-1.0), "xavier_relu", "leaky ReLU, slope -1 (= |x|)"),
    "silu": ActivationInfo(11, nn.SiLU, "xavier_relu", "x * sigmoid(x)"),
    "gelu": ActivationInfo(12, nn.GELU, "xavier_relu", "Gaussian error linear unit"),
    "telu": ActivationInfo(13, _fn(telu, "telu"), "xavier_relu", "x * tanh(exp(min(x, 5)))"),
    "square": ActivationInfo(14, Square, "xavier_relu", "trainable blend of tanh, TeLU, sine and cone"),
    "growing_sine": ActivationInfo(15, _fn(growing_sine, "growing_sine"), "growing", "x * sin(x)"),
    "growing_cosine": ActivationInfo(16, _fn(growing_cosine, "growing_cosine"), "growing", "x * cos(x)"),
    "helu": ActivationInfo(17, HeLU, "xavier_relu", "ReLU forward, backward threshold at -0.05"),
    "sign": ActivationInfo(18, Sign, "xavier_relu", "sign(x), straight-through backward"),
    "aglu": ActivationInfo(19, AGLU, "xavier_relu", "adaptive gate between SiLU and Gumbel (trainable)"),
    "pwlu": ActivationInfo(20, PiecewiseLinear, "xavier_relu", "trainable piecewise linear, 32 breakpoints"),
    "parabolic_cone": ActivationInfo(21, _fn(parabolic_cone, "parabolic_cone"), "xavier_relu", "x * (2 - x)"),
    "identity": ActivationInfo(22, nn.Identity, "xavier_relu", "no activation (linear network)"),
}
ACTIVATION_NUMBERS: dict[int, str] = {info.number: name for name, info in ACTIVATIONS.items()}
assert sorted(ACTIVATION_NUMBERS) == list(range(23))


def activation_name(key: str | int) -> str:
    """Resolve a name or the seed's number (0-22) to the activation's name."""
    if isinstance(key, bool):
        raise ValueError(f"activation must be a name or a number 0-22, got {key!r}")
    if isinstance(key, int):
        if key not in ACTIVATION_NUMBERS:
            raise ValueError(f"activation number {key} is not one of 0-22 "
                             f"({', '.join(f'{n} {ACTIVATION_NUMBERS[n]}' for n in sorted(ACTIVATION_NUMBERS))})")
        return ACTIVATION_NUMBERS[key]
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{key}'; choose one of: {', '.join(ACTIVATIONS)} (or its number 0-22)")
    return key


def make_activation(key: str | int) -> nn.Module:
    return ACTIVATIONS[activation_name(key)].factory()


def init_linear(layer: nn.Linear, activation: str | int) -> None:
    """Initialize a linear layer for the activation that follows it."""
    INITS[ACTIVATIONS[activation_name(activation)].init](layer)
