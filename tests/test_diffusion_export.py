"""`raygen export MODEL --format diffusers`: the folder loads with diffusers
alone (`from_pretrained`) and a plain diffusers denoising loop (or diffusers'
own DDPMPipeline) reproduces raygen's images for the same seeds, sampler and
steps; a sampler swapped on the diffusers side matches raygen's too."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from raygen.exports import export_generator
from raygen.jobs.cli import main
from raygen.models import Conditions, DataInfo, build_model, make_generators, parse_params
from raygen.models.diffusion import DiffusionConfig
from raygen.spec import parse_spec

diffusers = pytest.importorskip("diffusers")
SEEDS = [4, 1, 7]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def trained(config: DiffusionConfig, info: DataInfo, batch: dict, steps: int = 3):
    """A few optimizer steps, so the weights are not the initial ones (guidance then matters)."""
    torch.manual_seed(0)
    model = build_model("diffusion", config, info)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model.training_step(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def export_both(model, info, tmp_path):
    """raygen's export folder, then `raygen export --format diffusers` of it."""
    spec = parse_spec({"name": "tiny", "model": {"family": "diffusion",
                                                 "options": model.config.model_dump(mode="json")}})
    export_generator(tmp_path / "raygen", model.state_dict(), spec, info, {"step": 3})
    out = tmp_path / "diffusers"
    assert main(["export", str(tmp_path / "raygen"), "--format", "diffusers", "--out", str(out)]) == 0
    return out


def start_noise(shape, seeds=SEEDS):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens


def guided(unet_call, x, t, cond, null, scale):
    if scale == 1.0:
        return unet_call(x, t, cond)
    u, c = unet_call(x, t, null), unet_call(x, t, cond)
    return u + scale * (c - u)


LABELS = DataInfo(channels=1, resolution=8, num_classes=3, class_names=["a", "b", "c"])
LABEL_BATCH = {"image": torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
               "label": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])}


@pytest.mark.parametrize("attention,efficient", [("none", False), ("cross", True)])
def test_a_label_model_is_reproduced_by_a_plain_diffusers_loop(attention, efficient, tmp_path):
    config = DiffusionConfig.debug(conditioning="label", cond_dropout=0.2,
                                   unet={"attention": attention, "efficient": efficient},
                                   noise={"schedule": "cosine", "prediction": "v"},
                                   sampling={"sampler": "ddim", "num_inference_steps": 6, "guidance_scale": 2.0})
    model = trained(config, LABELS, LABEL_BATCH)
    out = export_both(model, LABELS, tmp_path)
    meta = json.loads((out / "raygen.json").read_text())
    assert meta["label"]["null_label"] == 3 and meta["space"] == "pixels"
    assert {p.name for p in out.iterdir()} >= {"unet", "scheduler", "raygen.json", "README.md"}

    unet_cls = diffusers.UNet2DModel if attention == "none" else diffusers.UNet2DConditionModel
    unet = unet_cls.from_pretrained(out / "unet").eval()
    labels, null = torch.tensor([2, 0, 1]), torch.full((3,), 3)

    def call(x, t, lab):
        if efficient:
            x = F.pixel_unshuffle(x, 2)
        if attention == "none":
            y = unet(x, t, class_labels=lab).sample
        else:  # the label as one one-hot token for the cross-attention
            y = unet(x, t, encoder_hidden_states=F.one_hot(lab, 4).float()[:, None]).sample
        return F.pixel_shuffle(y, 2) if efficient else y

    for sampler_cls, raygen_name in ((diffusers.DDIMScheduler, "ddim"),
                                     (diffusers.DPMSolverMultistepScheduler, "dpmsolver++")):
        if raygen_name == "ddim":
            scheduler = diffusers.DDIMScheduler.from_pretrained(out / "scheduler")
        else:  # swapped on the diffusers side, from the exported config
            scheduler = sampler_cls.from_config(diffusers.DDIMScheduler.load_config(out / "scheduler"))
        scheduler.set_timesteps(6)
        x, gens = start_noise((1, 8, 8))
        with torch.no_grad():
            for t in scheduler.timesteps:
                eps = guided(call, scheduler.scale_model_input(x, t), t, labels, null, 2.0)
                x = scheduler.step(eps, t, x, generator=gens).prev_sample
        theirs = ((x + 1) / 2).clamp(0, 1)
        ours = model.sample(Conditions("label", (2, 0, 1)), parse_params(model.sampling_params, {"sampler": raygen_name}),
                            make_generators(SEEDS))
        assert torch.allclose(theirs, ours, atol=1e-5), (raygen_name, float((theirs - ours).abs().max()))


def test_an_unconditional_model_loads_as_a_ddpm_pipeline(tmp_path):
    info = DataInfo(channels=1, resolution=8)
    config = DiffusionConfig.debug(unet={"attention": "self"}, sampling={"sampler": "ddim", "num_inference_steps": 5})
    model = trained(config, info, {"image": LABEL_BATCH["image"]})
    out = export_both(model, info, tmp_path)
    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "DDPMPipeline" and type(pipe.scheduler).__name__ == "DDIMScheduler"
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=3, generator=[torch.Generator().manual_seed(s) for s in SEEDS], num_inference_steps=5,
                  output_type="np").images  # [N, H, W, C] in [0, 1]
    ours = model.sample(Conditions.none(3), parse_params(model.sampling_params, {}), make_generators(SEEDS))
    assert torch.allclose(torch.from_numpy(images).permute(0, 3, 1, 2), ours, atol=1e-5)


def test_a_caption_model_with_a_transformers_encoder_exports_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["a", "red", "blue", "circle", "square"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", "<bos>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", 3), ("<eos>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                bos_token="<bos>", unk_token="<unk>")
    enc_dir = tmp_path / "clip-text"
    torch.manual_seed(0)
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=3, eos_token_id=1, pad_token_id=0)).save_pretrained(enc_dir)
    fast.save_pretrained(enc_dir)

    info = DataInfo(channels=3, resolution=8, has_captions=True)
    config = DiffusionConfig.debug(conditioning="caption", text_encoder=str(enc_dir), unet={"attention": "self_cross"},
                                   sampling={"sampler": "ddim", "num_inference_steps": 4, "guidance_scale": 3.0})
    batch = {"image": torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
             "caption": ["a red circle", "a blue square", "a red square", "a blue circle"]}
    model = trained(config, info, batch)
    out = export_both(model, info, tmp_path)
    assert (out / "text_encoder" / "config.json").is_file() and (out / "tokenizer").is_dir()

    unet = diffusers.UNet2DConditionModel.from_pretrained(out / "unet").eval()
    text = transformers.CLIPTextModel.from_pretrained(out / "text_encoder").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "tokenizer")
    scheduler = diffusers.DDIMScheduler.from_pretrained(out / "scheduler")

    def embed(captions):
        enc = tokenizer(captions, padding="longest", return_tensors="pt")
        mask = enc["attention_mask"]
        hidden = text(**enc).last_hidden_state * mask[..., None]
        pooled = hidden.sum(1) / mask.sum(1, keepdim=True)
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask.float(), "class_labels": pooled}

    captions = ["a red circle", "a blue square", "a red square"]
    with torch.no_grad():
        cond, null = embed(captions), embed([""] * 3)
        scheduler.set_timesteps(4)
        x, gens = start_noise((3, 8, 8))
        for t in scheduler.timesteps:
            eps = guided(lambda x, t, c: unet(x, t, **c).sample, x, t, cond, null, 3.0)
            x = scheduler.step(eps, t, x, generator=gens).prev_sample
    theirs = ((x + 1) / 2).clamp(0, 1)
    ours = model.sample(Conditions("caption", tuple(captions)), parse_params(model.sampling_params, {}),
                        make_generators(SEEDS))
    assert torch.allclose(theirs, ours, atol=1e-5), float((theirs - ours).abs().max())


def test_export_errors_are_one_line(tmp_path, capsys):
    import pipeline_toys  # noqa: F401  (a family with no diffusers export)
    info = DataInfo(channels=1, resolution=8)
    toy = build_model("toy_ae", {}, info)
    export_generator(tmp_path / "toy", toy.state_dict(), parse_spec({"model": {"family": "toy_ae"}}), info)
    assert main(["export", str(tmp_path / "toy"), "--format", "diffusers", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "a toy_ae model has no diffusers export; families that have one: diffusion, vae" in err
    assert not (tmp_path / "o").exists()
