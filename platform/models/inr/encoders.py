"""Image encoders of seed 001: image [B, C, H, W] in [0, 1] -> code [B, code_size].

Each is a convolutional (or patch-transformer) backbone followed by one
linear layer from its flattened output to the code, so `backbone` and
`to_code` are the two parts the `freeze` option tells apart.

    cnn          unpadded k×k convs, channels (16, 24, 32) by default
    dalle        OpenAI's dVAE encoder, shrunk (n_hid, n_blk_per_group, space-to-depth)
    resnet18     torchvision ResNet-18 without its average pool and classifier
    transformer  conv patches (patch, stride) -> transformer encoder
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from raygen.models.inr.config import CNNOptions, DalleOptions, INRConfig, ResNetOptions, TransformerOptions
from raygen.models.layers import make_activation


class Encoder(nn.Module):
    """backbone -> flatten -> linear to the code."""

    def __init__(self, backbone: nn.Module, shape: tuple[int, int, int], code_size: int):
        super().__init__()
        self.backbone = backbone
        with torch.no_grad():
            was = backbone.training
            out = backbone.eval()(torch.zeros(1, *shape))
            backbone.train(was)
        self.backbone_shape = tuple(out.shape[1:])
        self.to_code = nn.Linear(math.prod(self.backbone_shape), code_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.to_code(self.backbone(images).flatten(1))


# ---------------------------------------------------------------- simple CNN
def cnn_backbone(channels_in: int, o: CNNOptions) -> nn.Sequential:
    mods, c = [], channels_in
    for out in o.channels:
        mods += [nn.Conv2d(c, out, o.kernel), make_activation(o.activation)]
        c = out
    return nn.Sequential(*mods)


# ---------------------------------------------------------------- DALL-E-style
def _dalle_conv(n_in: int, n_out: int, k: int) -> nn.Conv2d:
    """DALL-E's conv: weights N(0, 1/fan_in), zero bias, 'same' padding."""
    conv = nn.Conv2d(n_in, n_out, k, padding=(k - 1) // 2)
    nn.init.normal_(conv.weight, std=1 / math.sqrt(n_in * k * k))
    nn.init.zeros_(conv.bias)
    return conv


class DalleBlock(nn.Module):
    """id_path(x) + post_gain · (act, 3×3, act, 3×3, act, 3×3, act, 1×1)(x), bottleneck n_out/4."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, activation: str):
        super().__init__()
        hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2  # DALL-E's: keeps the sum of many residuals near unit scale
        self.id_path = _dalle_conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            make_activation(activation), _dalle_conv(n_in, hid, 3),
            make_activation(activation), _dalle_conv(hid, hid, 3),
            make_activation(activation), _dalle_conv(hid, hid, 3),
            make_activation(activation), _dalle_conv(hid, n_out, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class SpaceToDepth(nn.Module):
    """[B, C, H, W] -> [B, 4C, H/2, W/2]: every 2×2 neighbourhood becomes channels (no pixel is dropped)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], dim=-3)


def dalle_backbone(channels_in: int, out_channels: int, o: DalleOptions) -> nn.Sequential:
    n_layers = o.groups * o.blocks_per_group
    mods: list[nn.Module] = [_dalle_conv(channels_in, o.hid, 7)]
    width = o.hid
    for g in range(o.groups):
        group_width = o.hid * 2 ** g
        for b in range(o.blocks_per_group):
            mods.append(DalleBlock(width, group_width, n_layers, o.activation))
            width = group_width
        if g < o.groups - 1:  # downsample between groups
            mods += [SpaceToDepth(), _dalle_conv(4 * width, width, 1)] if o.space_to_depth else [nn.MaxPool2d(2)]
    mods += [make_activation(o.activation), _dalle_conv(width, out_channels, 1)]
    return nn.Sequential(*mods)


# ---------------------------------------------------------------- ResNet-18
class ResNet18Backbone(nn.Module):
    """torchvision's resnet18 up to layer4 (no average pool, no classifier). Grey images are
    repeated to 3 channels so ImageNet weights apply; other channel counts get a new first conv."""

    def __init__(self, channels_in: int, o: ResNetOptions):
        super().__init__()
        import torchvision
        net = torchvision.models.resnet18(weights=None)
        if o.weights:
            net.load_state_dict(read_resnet_state(o.weights), strict=False)
        self.repeat = 3 if channels_in == 1 else 1
        if channels_in not in (1, 3):
            net.conv1 = nn.Conv2d(channels_in, 64, 7, 2, 3, bias=False)
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                  net.layer4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.repeat(1, self.repeat, 1, 1) if self.repeat > 1 else x)


def read_resnet_state(path: str) -> dict[str, torch.Tensor]:
    """A resnet18 state dict from a local file; the classifier (fc.*) is dropped, anything else must match."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"resnet18.weights: {path} is not a file; give a local resnet18 state dict "
                         "(.pth or .safetensors) or leave it out for random weights")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(p))
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
    import torchvision
    expected = {k for k in torchvision.models.resnet18(weights=None).state_dict() if not k.startswith("fc.")}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"resnet18.weights: {path} is not a resnet18 state dict (missing {missing[0]} and "
                         f"{len(missing) - 1} more keys)")
    return state


# ---------------------------------------------------------------- transformer
class PatchTransformer(nn.Module):
    """Conv patches -> tokens + learned positions -> transformer encoder -> [B, tokens, hid]."""

    def __init__(self, shape: tuple[int, int, int], o: TransformerOptions):
        super().__init__()
        c, h, w = shape
        stride = o.stride or o.patch
        if o.patch > min(h, w):
            raise ValueError(f"transformer.patch {o.patch} is larger than the {h}x{w} images; lower it")
        self.patches = nn.Conv2d(c, o.hid, o.patch, stride)
        tokens = ((h - o.patch) // stride + 1) * ((w - o.patch) // stride + 1)
        self.pos = nn.Parameter(torch.randn(tokens, o.hid) * 0.02)
        layer = nn.TransformerEncoderLayer(o.hid, o.heads, dim_feedforward=o.mlp or o.hid, dropout=o.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, o.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(o.hid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2) + self.pos
        return self.norm(self.transformer(tokens))


# ---------------------------------------------------------------- the choice
def build_encoder(config: INRConfig, shape: tuple[int, int, int]) -> Encoder:
    c, h, w = shape
    if config.encoder == "cnn":
        lost = len(config.cnn.channels) * (config.cnn.kernel - 1)
        if lost >= min(h, w):
            raise ValueError(f"cnn: {len(config.cnn.channels)} unpadded {config.cnn.kernel}x{config.cnn.kernel} "
                             f"convs need images larger than {lost}px; the data is {h}x{w}")
        backbone = cnn_backbone(c, config.cnn)
    elif config.encoder == "dalle":
        need = 2 ** (config.dalle.groups - 1)
        if h % need or w % need:
            raise ValueError(f"dalle: {config.dalle.groups} groups need sides divisible by {need}, got {h}x{w}; "
                             "lower dalle.groups")
        backbone = dalle_backbone(c, config.code_size, config.dalle)  # the seed: its last conv has code_size channels
    elif config.encoder == "resnet18":
        backbone = ResNet18Backbone(c, config.resnet18)
    else:
        backbone = PatchTransformer(shape, config.transformer)
    return Encoder(backbone, shape, config.code_size)
