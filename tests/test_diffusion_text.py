"""Caption conditioning through a frozen `transformers` encoder read from a
local folder: a tiny CLIP text model and a tiny T5 encoder, each built from a
config with a locally built tokenizer and saved the way a downloaded
checkpoint is laid out (nothing is fetched from the hub)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from raygen.models import Conditions, DataInfo, build_model, make_generators, parse_params  # noqa: E402
from raygen.models.diffusion import DiffusionConfig  # noqa: E402
from raygen.models.diffusion.text_encoders import HFTextEncoder  # noqa: E402

WORDS = ["a", "an", "red", "blue", "green", "circle", "square", "triangle", "above", "below", "of", "the",
         "left", "right", "to"]
INFO = DataInfo(channels=3, resolution=8, has_captions=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def word_level_tokenizer(bos: str | None, eos: str, pad: str, unk: str):
    """A fast word-level tokenizer over WORDS (what a real vocabulary file gives, but tiny)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    specials = [t for t in (pad, eos, unk, bos) if t]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[
            (bos, vocab[bos]), (eos, vocab[eos])])
    else:
        tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    kwargs = dict(tokenizer_object=tok, pad_token=pad, eos_token=eos, unk_token=unk)
    if bos:
        kwargs["bos_token"] = bos
    return transformers.PreTrainedTokenizerFast(**kwargs), vocab


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-text")
    tok, vocab = word_level_tokenizer("<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>")
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=24,
                                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                         pad_token_id=vocab["<pad>"])
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5-enc")
    tok, vocab = word_level_tokenizer(None, "</s>", "<pad>", "<unk>")
    config = transformers.T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"], decoder_start_token_id=0)
    torch.manual_seed(0)
    transformers.T5EncoderModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("which,cls", [("clip", "CLIPTextModel"), ("t5", "T5EncoderModel")])
def test_a_local_transformers_encoder_conditions_the_unet_frozen(which, cls, request, tmp_path):
    folder = request.getfixturevalue(f"{which}_dir")
    torch.manual_seed(0)
    config = DiffusionConfig.debug(conditioning="caption", text_encoder=str(folder), unet={"attention": "self_cross"})
    model = build_model("diffusion", config, INFO)
    encoder = model.conditioner.text
    assert isinstance(encoder, HFTextEncoder) and type(encoder.model).__name__ == cls and encoder.dim == 16
    assert model.denoiser.unet.config.cross_attention_dim == 16

    # tokens are the transformers forward pass itself, padding zeroed and masked
    captions = ["a red circle above a blue square", "a green triangle"]
    tokens, mask = encoder.encode(captions)
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ref_model = getattr(transformers, cls).from_pretrained(folder, local_files_only=True).eval()
    enc = tok(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = ref_model(**enc).last_hidden_state
    assert torch.equal(mask, enc["attention_mask"].bool())
    assert torch.allclose(tokens[mask], ref[enc["attention_mask"].bool()], atol=1e-6)
    assert (tokens[~mask] == 0).all()

    # frozen: out of training, no gradient, never in train mode; the UNet still learns
    model.train()
    assert not encoder.model.training
    batch = {"image": torch.rand(4, 3, 8, 8), "caption": captions * 2}
    out = model.training_step(batch)
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    assert model.denoiser.unet.conv_in.weight.grad.abs().sum() > 0

    # guided sampling, and a saved model loads back with the same weights
    from raygen.exports import export_generator, load_exported
    from raygen.spec import parse_spec
    spec = parse_spec({"model": {"family": "diffusion", "options": config.model_dump(mode="json")}})
    export_generator(tmp_path / "m", model.state_dict(), spec, INFO)
    loaded = load_exported(tmp_path / "m").model
    p = parse_params(loaded.sampling_params, {"guidance_scale": 2.0, "num_inference_steps": 3})
    conds = Conditions("caption", ("a red circle", "a blue square"))
    model.eval()
    assert torch.equal(loaded.sample(conds, p, make_generators([0, 1])), model.sample(conds, p, make_generators([0, 1])))


def test_a_missing_folder_is_a_clear_error(tmp_path):
    config = DiffusionConfig.debug(conditioning="caption", text_encoder=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="text_encoder: .*nope is not a folder; give a local folder"):
        build_model("diffusion", config, INFO)
