"""Model family `clip`: registry, InfoNCE loss, training on known captions,
reranking with the trained model, export and load_scorer."""
import math

import pytest
import torch
import torch.nn.functional as F

import raygen.models.clip  # noqa: F401  (registers the family)
from raygen.metrics import BestOfN, MetricsError, TrainedClipScorer, load_scorer
from raygen.models.base import DataInfo
from raygen.models import Capability, CapabilityError
from raygen.models.clip import ClipConfig
from raygen.models.registry import build_model, family_names

COLORS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 1.0, 0.1), "blue": (0.1, 0.1, 1.0)}
INFO = DataInfo(channels=3, resolution=8, has_captions=True)


def colored(names, seed=0):
    """8x8 images: a square of the named colour on a noisy gray background."""
    g = torch.Generator().manual_seed(seed)
    x = 0.4 + 0.1 * torch.rand(len(names), 3, 8, 8, generator=g)
    for i, n in enumerate(names):
        x[i, :, 2:6, 2:6] = torch.tensor(COLORS[n]).view(3, 1, 1)
    return x


def test_registered_with_config_and_debug_flavor():
    assert "clip" in family_names()
    model = build_model("clip", {"embed_dim": 16, "image_width": 8, "image_depth": 2}, INFO)
    assert model.encode_image(torch.rand(2, 3, 8, 8)).shape == (2, 16)
    with pytest.raises(Exception, match="unknown_option"):
        build_model("clip", {"unknown_option": 1}, INFO)
    assert model.capabilities == {Capability.TRAIN, Capability.SCORE}
    with pytest.raises(CapabilityError, match="cannot sample images.*families that can: .*seqimg"):
        model.generate(2)


def test_loss_is_symmetric_infonce_for_distinct_captions():
    torch.manual_seed(0)
    model = build_model("clip", ClipConfig.debug(), INFO)
    batch = {"image": torch.rand(4, 3, 8, 8), "caption": ["a", "b c", "d", "e f g"]}
    out = model.training_step(batch)
    img, txt = model.encode_image(batch["image"]), model.encode_text(batch["caption"])
    assert torch.allclose(img.norm(dim=1), torch.ones(4)) and torch.allclose(txt.norm(dim=1), torch.ones(4))
    logits = model.logit_scale.exp() * img @ txt.T
    target = torch.arange(4)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    out["loss"].backward()
    assert model.image_encoder.proj.weight.grad.abs().sum() > 0 and model.logit_scale.grad is not None


def test_repeated_captions_are_soft_positives_and_labels_give_captions():
    torch.manual_seed(0)
    info = DataInfo(channels=3, resolution=8, num_classes=2, class_names=["cat", "dog"])
    model = build_model("clip", ClipConfig.debug(), info)
    assert model.captions_for({"label": torch.tensor([1, 0])}) == ["a photo of a dog", "a photo of a cat"]
    # two identical captions: the best achievable loss is log 2 per row, not 0
    out = model.training_step({"image": torch.rand(2, 3, 8, 8), "label": torch.tensor([0, 0])})
    assert out["loss"].item() >= math.log(2) - 1e-5 and out["accuracy"].item() == 1.0
    with pytest.raises(ValueError, match="captions"):
        build_model("clip", ClipConfig.debug(), INFO).training_step({"image": torch.rand(2, 3, 8, 8)})


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = build_model("clip", ClipConfig.debug(), INFO)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    names = list(COLORS)
    for step in range(120):
        batch_names = [names[(step + i) % 3] for i in range(12)]
        loss = model.training_step({"image": colored(batch_names, seed=step),
                                    "caption": [f"a {n} square" for n in batch_names]})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_trained_clip_reranks_by_prompt(trained):
    scorer = TrainedClipScorer(trained)
    names = ["blue", "red", "green", "red", "blue", "green"]
    images = colored(names, seed=999)
    for prompt, color in (("a red square", "red"), ("a green square", "green"), ("a blue square", "blue")):
        top, scores, order = BestOfN(scorer).rerank(prompt, images, k=2)
        assert sorted(order.tolist()) == [i for i, n in enumerate(names) if n == color], prompt
        assert torch.equal(top, images[order]) and scores[0] >= scores[1]
    s = scorer.score(images, "a red square")
    assert s.shape == (6,) and (s >= 0).all() and s[1] > s[0]


def test_export_and_load_scorer(trained, tmp_path):
    from raygen.exports import export_generator
    from raygen.spec import JobSpec
    spec = JobSpec.model_validate({"name": "clip-test", "model": {"family": "clip",
                                                                   "options": ClipConfig.debug().model_dump()}})
    export_generator(tmp_path / "model", trained.state_dict(), spec, INFO)
    scorer = load_scorer(f"clip:{tmp_path / 'model'}")
    images = colored(["red", "blue"], seed=5)
    assert torch.allclose(scorer.similarity(images, "a red square"),
                          TrainedClipScorer(trained).similarity(images, "a red square"), atol=1e-5)
    assert scorer.name.startswith("clip:")
    with pytest.raises(MetricsError, match="hf:PATH"):
        load_scorer(str(tmp_path / "missing"))


def test_clip_score_command(trained, tmp_path, capsys):
    import json

    from raygen.jobs.cli import main
    from raygen.metrics.imageio import write_image_folder
    from raygen.exports import export_generator
    from raygen.spec import JobSpec
    spec = JobSpec.model_validate({"model": {"family": "clip", "options": ClipConfig.debug().model_dump()}})
    export_generator(tmp_path / "model", trained.state_dict(), spec, INFO)
    write_image_folder(colored(["red", "blue"], seed=3), tmp_path / "imgs")
    assert main(["metrics", "clip-score", "--images", str(tmp_path / "imgs"), "--prompt", "a red square",
                 "--scorer", f"clip:{tmp_path / 'model'}"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 2 and out["scores"][0] > out["scores"][1]
