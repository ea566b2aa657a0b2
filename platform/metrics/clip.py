"""Image-text scoring: one interface over real CLIP weights and the platform's
own small CLIP (model family `clip`).

    scorer = load_scorer("hf:/models/clip-vit-base-patch32")   # local folder, offline
    scorer = load_scorer("clip:runs/my-clip/model")            # trained by raygen
    scorer.score(images, "a red circle")                       # [N], CLIPScore

Scores follow CLIPScore (Hessel et al. 2021, torchmetrics): 100 * cosine
similarity, clamped at 0. `similarity` is the same without the clamp; ranking
uses it, so poor matches are still ordered among themselves.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.nn.functional as F

from raygen.metrics.errors import MetricsError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageTextScorer(ABC):
    name: str = "scorer"
    batch_size: int = 64

    @abstractmethod
    def _encode_image(self, images: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _encode_text(self, texts: list[str]) -> torch.Tensor: ...

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [0, 1] (or uint8) -> L2-normalised float32 [N, D] on the CPU."""
        if images.dim() != 4:
            raise MetricsError(f"images must be [N, C, H, W] (got shape {tuple(images.shape)})")
        out = [self._encode_image(images[i:i + self.batch_size]).float().cpu()
               for i in range(0, images.shape[0], self.batch_size)]
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str] | str) -> torch.Tensor:
        """texts -> L2-normalised float32 [N, D] on the CPU."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = [self._encode_text(texts[i:i + self.batch_size]).float().cpu()
               for i in range(0, len(texts), self.batch_size)]
        return F.normalize(torch.cat(out), dim=-1)

    def similarity(self, images: torch.Tensor, texts: list[str] | str) -> torch.Tensor:
        """100 * cos(image_i, text_i), [N]; one text is compared with every image."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if len(texts) not in (1, images.shape[0]):
            raise MetricsError(f"give one text or one per image (got {len(texts)} texts for {images.shape[0]} images)")
        img = self.encode_image(images)
        txt = self.encode_text(texts)
        return 100.0 * (img * txt).sum(-1)

    def score(self, images: torch.Tensor, texts: list[str] | str) -> torch.Tensor:
        """CLIPScore [N]: max(100 * cos, 0)."""
        return self.similarity(images, texts).clamp(min=0.0)


# ---------------------------------------------------------------- real CLIP weights
def _hf_missing(path: Path) -> str:
    return (f"no CLIP weights at {path}. On a machine with network run: python -c \"from transformers import "
            f"CLIPModel, CLIPProcessor; m='openai/clip-vit-base-patch32'; CLIPModel.from_pretrained(m)."
            f"save_pretrained('{path}'); CLIPProcessor.from_pretrained(m).save_pretrained('{path}')\", copy the "
            f"folder here and use hf:{path}; or train the platform's own scorer (model.family: clip) "
            "and use clip:RUN_MODEL_DIR")


class HFClipScorer(ImageTextScorer):
    """CLIP from a local `transformers` folder (config.json + weights + tokenizer),
    loaded with local_files_only: nothing is downloaded. Images are preprocessed in
    torch the way CLIPImageProcessor does (shortest side to `size`, bicubic; centre
    crop; mean/std from preprocessor_config.json, else OpenAI's)."""

    def __init__(self, folder: str | Path, *, device: str | torch.device = "cpu", batch_size: int = 64):
        folder = Path(folder).expanduser()
        if not (folder / "config.json").is_file():
            raise MetricsError(_hf_missing(folder))
        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError:
            raise MetricsError("scoring with hf: CLIP weights needs transformers: pip install 'raygen[hub]'") from None
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().to(self.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as err:
            raise MetricsError(f"{folder} has CLIP weights but no usable tokenizer ({err}); save the tokenizer "
                               "there too (CLIPProcessor.from_pretrained(...).save_pretrained(folder))") from None
        self.name = f"hf-clip:{folder.name}"
        vision = self.model.config.vision_config
        self.max_text_len = self.model.config.text_config.max_position_embeddings
        pre = {}
        if (folder / "preprocessor_config.json").is_file():
            pre = json.loads((folder / "preprocessor_config.json").read_text())
            pre = pre.get("image_processor", pre)  # processor_config.json nests it
        size = pre.get("size", vision.image_size)
        crop = pre.get("crop_size", size)
        if isinstance(size, dict):
            size = size.get("shortest_edge", size.get("height", vision.image_size))
        if isinstance(crop, dict):
            crop = crop.get("height", crop.get("shortest_edge", size))
        self.resize, self.crop = int(size), int(crop)
        self.mean = torch.tensor(pre.get("image_mean", OPENAI_MEAN), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("image_std", OPENAI_STD), dtype=torch.float32).view(1, 3, 1, 1)
        self.dim = self.model.config.projection_dim

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if min(h, w) != self.resize:
            s = self.resize / min(h, w)
            nh, nw = max(self.resize, round(h * s)), max(self.resize, round(w * s))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=s < 1).clamp(0, 1)
        h, w = x.shape[-2:]
        top, left = (h - self.crop) // 2, (w - self.crop) // 2
        x = x[..., top:top + self.crop, left:left + self.crop]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers 4 returns the projected tensor, 5 an output object holding it
        return out if torch.is_tensor(out) else out.pooler_output

    def _encode_image(self, images):
        return self._features(self.model.get_image_features(pixel_values=self.pixel_values(images.to(self.device))))

    def _encode_text(self, texts):
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_len, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        return self._features(self.model.get_text_features(**enc))


# ---------------------------------------------------------------- platform-trained CLIP
class TrainedClipScorer(ImageTextScorer):
    """A `clip` family model (raygen.models.clip.SmallClip) as a scorer."""

    def __init__(self, model, *, name: str = "clip", device: str | torch.device | None = None, batch_size: int = 256):
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.name = name
        self.batch_size = batch_size
        self.dim = model.config.embed_dim

    def _encode_image(self, images):
        return self.model.encode_image(images)

    def _encode_text(self, texts):
        return self.model.encode_text(texts)


def _is_hf_folder(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return cfg.get("model_type") == "clip" or "vision_config" in cfg


def load_scorer(spec: str, *, device: str | torch.device = "cpu", tracking_uri: str | None = None) -> ImageTextScorer:
    """Resolve a scorer:
      "hf:PATH"              CLIP weights in a local transformers folder
      "clip:PATH_OR_URI"     a `clip` family model trained by raygen (model folder,
                             run folder or models:/NAME/VERSION)
      "PATH"                 either, detected from the folder's contents"""
    if spec.startswith("hf:"):
        return HFClipScorer(spec[len("hf:"):], device=device)
    arg = spec[len("clip:"):] if spec.startswith("clip:") else spec
    path = Path(arg).expanduser()
    if path.is_dir() and _is_hf_folder(path):
        return HFClipScorer(path, device=device)
    if not arg.startswith(("models:/", "runs:/")) and not path.exists():
        raise MetricsError(f"scorer '{spec}' not found: use hf:PATH (a local CLIP folder) or clip:PATH (a model "
                           "trained with model.family: clip)")
    from raygen.models import Capability, CapabilityError, require
    from raygen.exports import load_generator
    loaded = load_generator(arg, tracking_uri=tracking_uri)
    try:
        require(loaded.model, Capability.SCORE)
    except CapabilityError as err:
        raise MetricsError(f"{spec}: {err}; or give hf:PATH for CLIP weights") from None
    return TrainedClipScorer(loaded.model, name=f"clip:{loaded.source}", device=device)
