"""Caption encoders behind one interface (the one `raygen.models.text.TextEncoder` has):

    tokens, mask = enc.encode(["a red circle", ""])   # [B, T, D], [B, T] bool
    vec = enc.pooled(["a red circle"])                # [B, D] (masked mean)
    enc.dim                                           # D

- the built-in `TextEncoder` (raygen.models.text), trained with the model;
- `HFTextEncoder`: a frozen `transformers` encoder (CLIP text, T5, DistilBERT,
  BERT) and its tokenizer, read from a local folder only (no hub access).
Its weights are part of the model's state, so a checkpoint holds what it was
trained with; the folder still provides the architecture and the tokenizer.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from raygen.models.text import TextEncoder, TextEncoderConfig


def _encoder_class(model_type: str):
    import transformers
    if model_type in ("clip", "clip_text_model"):
        return transformers.CLIPTextModel
    if model_type in ("t5", "mt5", "umt5"):
        return transformers.T5EncoderModel
    return transformers.AutoModel


class HFTextEncoder(nn.Module):
    """A frozen transformers text encoder read from `path` (no network)."""

    def __init__(self, path: str, max_length: int = 77):
        super().__init__()
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"text_encoder: {path} is not a folder; give a local folder holding a transformers "
                             "text encoder (config.json, weights) and its tokenizer")
        try:
            import transformers
        except ImportError:  # pragma: no cover - transformers is in the install
            raise ImportError("text_encoder needs the transformers package: pip install transformers") from None
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        self.model = _encoder_class(config.model_type).from_pretrained(folder, local_files_only=True)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model.requires_grad_(False)
        self.model.eval()
        self.path = str(folder)
        self.max_length = min(max_length, getattr(self.model.config, "max_position_embeddings", max_length) or max_length)
        text_config = getattr(self.model.config, "text_config", self.model.config)
        self.dim = int(getattr(text_config, "hidden_size", None) or getattr(text_config, "d_model"))

    def train(self, mode: bool = True) -> "HFTextEncoder":
        super().train(mode)
        self.model.eval()  # frozen: never dropout
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, not one string")
        enc = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device).bool()

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(captions)
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return hidden * mask.unsqueeze(-1).to(hidden.dtype), mask

    def pooled(self, captions: list[str] | None = None, *, tokens: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        if tokens is None:
            tokens, mask = self.encode(captions)
        return TextEncoder.pool(tokens, mask)


def build_text_encoder(config: TextEncoderConfig, path: str | None, max_length: int) -> nn.Module:
    """The built-in encoder (trained jointly), or a frozen transformers one from a local folder."""
    return HFTextEncoder(path, max_length) if path else TextEncoder(config)
