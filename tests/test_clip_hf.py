"""Real CLIP through `transformers`, loaded offline from a local folder holding a
tiny randomly initialised CLIPModel, a locally built tokenizer and an image
processor config, exactly as a downloaded checkpoint would be laid out."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from raygen.metrics import BestOfN, HFClipScorer, MetricsError, load_scorer  # noqa: E402

COLORS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 1.0, 0.1), "blue": (0.1, 0.1, 1.0)}
WORDS = ["a", "red", "green", "blue", "square", "photo", "of"]


def tiny_tokenizer():
    """A byte-level BPE CLIP tokenizer with whole-word merges for a few words."""
    from tokenizers import pre_tokenizers
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    for c in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(c, len(vocab))
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges), len(vocab)


def colored(names, seed=0, size=32):
    """Images of the named colours with noise (every ViT patch sees the colour)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([torch.tensor(COLORS[n]) for n in names]).view(-1, 3, 1, 1)
    return (0.8 * x + 0.2 * torch.rand(len(names), 3, size, size, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """Train the tiny CLIP briefly on coloured squares (with transformers' own loss), then save it."""
    folder = tmp_path_factory.mktemp("clip-tiny")
    tok, vocab_size = tiny_tokenizer()
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    names = list(COLORS)
    for step in range(80):
        batch = [names[(step + i) % 3] for i in range(3)]
        enc = tok([f"a {n} square" for n in batch], padding=True, return_tensors="pt")
        out = model(**enc, pixel_values=(colored(batch, seed=step) - mean) / std, return_loss=True)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_loads_offline_and_matches_the_model_forward(clip_dir):
    scorer = load_scorer(f"hf:{clip_dir}")
    assert isinstance(scorer, HFClipScorer) and scorer.dim == 16 and scorer.name == f"hf-clip:{clip_dir.name}"
    images = colored(["red", "blue", "green", "red"], seed=100)
    texts = ["a red square", "a blue square", "a red square", "a photo of a green square"]
    # independent route: transformers' own processor, tokenizer and forward pass
    model = transformers.CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    proc = transformers.CLIPImageProcessor.from_pretrained(clip_dir, local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)
    pixels = proc(images=list(images.numpy()), do_rescale=False, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(**tok(texts, padding=True, return_tensors="pt"), pixel_values=pixels)
    cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    sim = scorer.similarity(images, texts)
    assert torch.allclose(sim, 100 * cos, atol=1e-3)
    assert torch.allclose(scorer.score(images, texts), (100 * cos).clamp(min=0), atol=1e-3)
    assert torch.allclose(scorer.encode_image(images).norm(dim=1), torch.ones(4))
    assert torch.allclose(scorer.encode_text(texts).norm(dim=1), torch.ones(4))
    # best-of-n order equals the order of the model's own logits for one prompt
    with torch.no_grad():
        logits = model(**tok(["a red square"], return_tensors="pt"), pixel_values=pixels).logits_per_image[:, 0]
    _, _, order = BestOfN(scorer).rerank("a red square", images, k=4)
    assert order.tolist() == torch.argsort(logits, descending=True).tolist()


def test_reranks_coloured_squares_by_prompt(clip_dir):
    scorer = load_scorer(str(clip_dir))  # a bare path is recognised as a transformers folder
    names = ["blue", "red", "green", "green", "red", "blue"]
    images = colored(names, seed=7)
    for color in COLORS:
        _, scores, order = BestOfN(scorer).rerank(f"a {color} square", images, k=2)
        assert sorted(order.tolist()) == [i for i, n in enumerate(names) if n == color], color


def test_grayscale_and_odd_sizes_are_resized_and_cropped(clip_dir):
    scorer = HFClipScorer(clip_dir)
    x = scorer.pixel_values(torch.rand(2, 1, 48, 64))  # shortest side -> 32, centre crop 32x32
    assert x.shape == (2, 3, 32, 32)
    assert scorer.similarity(torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8), "a red square").shape == (2,)


def test_missing_folder_explains_how_to_get_weights(tmp_path):
    with pytest.raises(MetricsError, match="save_pretrained"):
        load_scorer(f"hf:{tmp_path / 'clip-vit-base-patch32'}")
