"""Write a trained diffusion model as a folder diffusers loads with `from_pretrained`.

    OUT/
      unet/                 UNet2DModel or UNet2DConditionModel (config.json + safetensors)
      scheduler/            the model's default sampler (DDIMScheduler, ...) with its training betas
      vae/                  AutoencoderKL, scaling_factor and shift_factor measured on the data (latent models)
      text_encoder/ tokenizer/   a frozen transformers caption encoder and its tokenizer
      raygen_text_encoder/  the built-in caption encoder (raygen's own; no transformers class exists for it)
      model_index.json      unconditional pixel models: DiffusionPipeline.from_pretrained(OUT) gives a DDPMPipeline
      raygen.json           how raygen's sampling loop feeds the UNet (see below), and the sampling defaults
      README.md             that loop, in plain diffusers code

What diffusers alone needs to reproduce raygen's images (raygen.json):
- x_T: image i's noise from torch.Generator seeded with its seed, shape `x_shape`;
- labels: `class_labels` = label (timestep embedding) and/or `encoder_hidden_states` = one-hot(label,
  num_classes + 1) as one token; the null label (guidance) is `num_classes`;
- captions: the encoder's last hidden state with padding zeroed, `encoder_attention_mask` = the tokenizer's
  mask, and (when the condition is in the timestep embedding) `class_labels` = the masked mean of the tokens;
  the null caption is "";
- guidance: out = u + s (c - u); efficient layout: pixel_unshuffle(2) before the UNet, pixel_shuffle(2) after;
- pixels: image = (x + 1) / 2 clamped to [0, 1]; latents: image = vae.decode(x / scaling_factor + shift_factor)
  mapped the same way.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from raygen.models.diffusion.model import DiffusionModel
from raygen.models.diffusion.noise import make_sampler
from raygen.models.diffusion.text_encoders import HFTextEncoder
from raygen.models.diffusion.unet import SPACE_TO_DEPTH
from raygen.models.errors import ModelLoadError

README = """# {name}: a raygen diffusion model in diffusers' layout

```python
import torch, json
from diffusers import {unet_class}, {scheduler_class}

folder = "{folder}"
meta = json.load(open(f"{{folder}}/raygen.json"))
unet = {unet_class}.from_pretrained(f"{{folder}}/unet").eval()
scheduler = {scheduler_class}.from_pretrained(f"{{folder}}/scheduler")
seeds = [0, 1, 2, 3]
gens = [torch.Generator().manual_seed(s) for s in seeds]
x = torch.stack([torch.randn(meta["x_shape"], generator=g) for g in gens]) * scheduler.init_noise_sigma
scheduler.set_timesteps({steps})
cond = {cond_example}
with torch.no_grad():
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t, **cond).sample
        x = scheduler.step(out, t, x, generator=gens).prev_sample
images = ((x + 1) / 2).clamp(0, 1)
```
raygen.json says how labels, captions, guidance, the efficient layout and latents enter this loop.
"""


def _cond_example(model: DiffusionModel) -> str:
    kind = model.condition_kind
    unet_cfg = model.denoiser.unet.config
    if kind == "label":
        parts = []
        if getattr(unet_cfg, "num_class_embeds", None):
            parts.append('"class_labels": torch.tensor([0, 1, 2, 3])')
        if model.conditioner.cross:
            parts.append('"encoder_hidden_states": torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), '
                         f'{model.data_info.num_classes + 1}).float()[:, None]')
        return "{" + ", ".join(parts) + "}"
    if kind == "caption":
        return '{...}  # tokens, mask and pooled caption: see raygen.json "caption"'
    return "{}"


def export_diffusers(model: DiffusionModel, out: str | Path, name: str = "model") -> Path:
    """Write the folder atomically (a temp folder, then rename); returns its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write(model, tmp, name, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _write(model: DiffusionModel, tmp: Path, name: str, final: Path) -> None:
    import diffusers

    config = model.config
    if model.upscaler:
        raise ModelLoadError("a super-resolution stage has no diffusers form yet (diffusers' upscaler pipeline "
                             "conditions differently); export its base model instead")
    unet = model.denoiser.unet
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    defaults = config.sampling
    scheduler = make_sampler(defaults.sampler, config.noise)
    scheduler.save_pretrained(tmp / "scheduler")
    meta: dict = {
        "format": "raygen-diffusers/1", "family": "diffusion", "name": name,
        "conditioning": model.condition_kind, "x_shape": list(model.x_shape),
        "image_shape": list(model.data_info.shape), "space": "latent" if model.latent else "pixels",
        "pixels": "image = ((x + 1) / 2).clamp(0, 1)",
        "efficient": {"space_to_depth": SPACE_TO_DEPTH} if config.unet.efficient else None,
        "prediction_type": scheduler.config.prediction_type,
        "sampling_defaults": defaults.model_dump(),
        "options": config.model_dump(mode="json"),
    }
    if model.condition_kind == "label":
        meta["label"] = {
            "num_classes": model.data_info.num_classes, "class_names": list(model.data_info.class_names),
            "null_label": model.data_info.num_classes,
            "class_labels": bool(getattr(unet.config, "num_class_embeds", None)),
            "one_hot_token": model.conditioner.cross,
        }
    if model.condition_kind == "caption":
        encoder = model.conditioner.text
        meta["caption"] = {"null_caption": "", "tokens": model.conditioner.cross,
                           "pooled_class_labels": model.conditioner.in_time,
                           "padding": "hidden states zeroed where the mask is 0; encoder_attention_mask = mask",
                           "pooled": "masked mean of the (zeroed) tokens"}
        if isinstance(encoder, HFTextEncoder):
            encoder.model.save_pretrained(tmp / "text_encoder", safe_serialization=True)
            encoder.tokenizer.save_pretrained(tmp / "tokenizer")
            meta["caption"].update(text_encoder="text_encoder", tokenizer="tokenizer",
                                   max_length=encoder.max_length, padding_strategy="longest")
        else:  # the built-in encoder: no transformers class exists for it
            folder = tmp / "raygen_text_encoder"
            folder.mkdir()
            save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
                      str(folder / "model.safetensors"))
            (folder / "config.json").write_text(json.dumps(encoder.config.model_dump(), indent=2))
            meta["caption"].update(text_encoder="raygen_text_encoder",
                                   note="raygen's built-in encoder: load with raygen.models.text.TextEncoder")
    if model.latent:
        vae = model.components["vae"]
        to_autoencoder_kl = getattr(type(vae), "to_diffusers", None)
        if to_autoencoder_kl is None:
            raise ModelLoadError(f"the model's vae component (family {vae.family!r}) has no diffusers form; "
                                 "only a vae-family AutoencoderKL exports to diffusers")
        vae.to_diffusers(tmp / "vae")
        meta["vae"] = {"folder": "vae", "decode": "image = ((vae.decode(x / scaling_factor + shift_factor)"
                                                  ".sample + 1) / 2).clamp(0, 1)"}
    if model.condition_kind == "none" and not model.latent and not config.unet.efficient \
            and isinstance(unet, diffusers.UNet2DModel):
        index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
                 "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", type(scheduler).__name__]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    (tmp / "raygen.json").write_text(json.dumps(meta, indent=2))
    (tmp / "README.md").write_text(README.format(
        name=name, folder=str(final), unet_class=type(unet).__name__, scheduler_class=type(scheduler).__name__,
        steps=defaults.num_inference_steps, cond_example=_cond_example(model)))
