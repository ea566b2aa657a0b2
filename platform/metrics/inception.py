"""InceptionV3 pool3 (2048-d) features from a local weights file.

Two weight layouts load into torchvision's `inception_v3` architecture:

* "fid": `pt_inception-2015-12-05-*.pth`, the TensorFlow FID Inception ported by
  pytorch-fid (1008-way fc). Its graph differs from torchvision's in pooling:
  the Mixed_5*/6*/7b blocks average-pool without counting padding (TF
  semantics) and Mixed_7c max-pools; with these patches the features match
  the reference FID network, so scores are comparable to published ones.
* "torchvision": `inception_v3_google-*.pth` (1000-way fc; AuxLogits ignored).

The layout is read from the fc shape unless given. Weights never download:
they are a file the user places; features need no fc, so the fc is dropped.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception as tv_inception

from raygen.metrics.errors import MetricsError
from raygen.metrics.extractors import TorchExtractor
from raygen.metrics.preprocess import Preprocess

INPUT_SIZE = 299
FEATURE_DIM = 2048
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILE


class _TFPool:
    """Mixin: recompute the pooling branch the way the TF FID graph does."""
    tf_pool = "avg"

    def _forward(self, x):
        outputs = super()._forward(x)
        if self.tf_pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        outputs[-1] = self.branch_pool(pooled)
        return outputs


class _FIDInceptionA(_TFPool, tv_inception.InceptionA):
    pass


class _FIDInceptionC(_TFPool, tv_inception.InceptionC):
    pass


class _FIDInceptionE(_TFPool, tv_inception.InceptionE):
    pass


class _FIDInceptionEMax(_TFPool, tv_inception.InceptionE):
    tf_pool = "max"


def build_inception(layout: str = "fid") -> tv_inception.Inception3:
    """The architecture only (no weights, no init): layout "fid" or "torchvision"."""
    if layout not in ("fid", "torchvision"):
        raise MetricsError(f"inception layout must be 'fid' or 'torchvision' (got {layout!r})")
    net = tv_inception.inception_v3(weights=None, aux_logits=False, init_weights=False,
                                    num_classes=1008 if layout == "fid" else 1000)
    if layout == "fid":
        net.Mixed_5b = _FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = _FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = _FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = _FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = _FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = _FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = _FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = _FIDInceptionE(1280)
        net.Mixed_7c = _FIDInceptionEMax(2048)
    return net


class InceptionPool3(nn.Module):
    """[B, 3, 299, 299] in [0, 1] -> pool3 features [B, 2048]."""

    def __init__(self, net: tv_inception.Inception3):
        super().__init__()
        net.fc = nn.Identity()  # pool3 is what FID uses; the classifier is not needed
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # both weight sets were trained on inputs in [-1, 1]
        return self.net._forward(2.0 * x - 1.0)[0]


def _missing_weights_message(path: Path) -> str:
    return (f"Inception weights not found at {path}. FID with Inception needs a local weights file: on a machine "
            f"with network download {FID_WEIGHTS_URL} (or torchvision's inception_v3_google-0cc3c7bd.pth), copy it "
            f"to {path}, and set track.fid.extractor: inception:{path}. Or use track.fid.extractor: domain, "
            "which trains a feature net on the dataset and needs no download.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a .pth/.pt file (loaded weights_only, never unpickled code)."""
    path = Path(path)
    if not path.is_file():
        raise MetricsError(_missing_weights_message(path))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # a pickle with code in it, or not a torch file at all
            raise MetricsError(f"{path} is not a plain tensor state dict ({type(err).__name__}: {err}); "
                               "save it as a state dict (.pth) or as .safetensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise MetricsError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    fc = state.get("fc.weight")
    if fc is not None and fc.shape[0] == 1008:
        return "fid"
    return "torchvision"


def file_digest(path: str | Path, length: int = 8) -> str:
    """sha256 prefix of the file, the convention of torch hub file names."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def load_inception(path: str | Path, *, layout: str | None = None, device: str | torch.device = "cpu",
                   batch_size: int = 32, preprocess: Preprocess | None = None) -> TorchExtractor:
    """InceptionV3 pool3 extractor from a local weights file.

    Name: "inception-v3-pool3:<sha8>" for the FID weights (the sha256 prefix of the
    file, 6726825d for the standard file), "inception-v3-tv-pool3:<sha8>" for
    torchvision's, so reference statistics never mix weight files."""
    path = Path(path).expanduser()
    state = read_state_dict(path)
    layout = layout or detect_layout(state)
    net = build_inception(layout)
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise MetricsError(f"{path} does not fit InceptionV3 ({layout} layout): missing {missing[:4]}, "
                           f"unexpected {result.unexpected_keys[:4]}; give the pytorch-fid file {FID_WEIGHTS_FILE} "
                           "or torchvision's inception_v3_google weights")
    tag = "inception-v3-pool3" if layout == "fid" else "inception-v3-tv-pool3"
    preprocess = preprocess or Preprocess(size=INPUT_SIZE, channels=3)
    return TorchExtractor(f"{tag}:{file_digest(path)}", InceptionPool3(net), FEATURE_DIM, preprocess,
                          batch_size=batch_size, device=device)
