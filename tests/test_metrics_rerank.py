"""Best-of-n with a scorer whose scores are known."""
import pytest
import torch

from raygen.metrics import BestOfN, ImageTextScorer, MetricsError


class BrightnessScorer(ImageTextScorer):
    """Image embedding (b, 1-b) for mean brightness b, text embedding (1, 0):
    similarity rises with brightness, so the order is known."""
    name = "brightness"

    def _encode_image(self, images):
        b = images.float().mean(dim=(1, 2, 3))
        return torch.stack([b, 1 - b], 1)

    def _encode_text(self, texts):
        return torch.tensor([[1.0, 0.0]] * len(texts))


def test_rerank_orders_by_score_descending():
    levels = torch.tensor([0.2, 0.9, 0.5, 0.7, 0.1])
    images = levels.view(5, 1, 1, 1).expand(5, 3, 4, 4).clone()
    top, scores, order = BestOfN(BrightnessScorer()).rerank("bright", images, k=3)
    assert order.tolist() == [1, 3, 2]
    assert torch.equal(top, images[[1, 3, 2]])
    expected = 100 * levels / torch.sqrt(levels ** 2 + (1 - levels) ** 2)
    assert scores.tolist() == pytest.approx(expected[[1, 3, 2]].tolist(), rel=1e-5)
    assert scores[0] >= scores[1] >= scores[2]


def test_rerank_ties_keep_generation_order_and_k_is_checked():
    images = torch.full((4, 1, 2, 2), 0.5)
    _, _, order = BestOfN(BrightnessScorer()).rerank("x", images, k=4)
    assert order.tolist() == [0, 1, 2, 3]
    with pytest.raises(MetricsError, match="k must be"):
        BestOfN(BrightnessScorer()).rerank("x", images, k=5)


def test_clipscore_clamps_at_zero_but_similarity_does_not():
    class Opposite(BrightnessScorer):
        def _encode_text(self, texts):
            return torch.tensor([[-1.0, 0.0]] * len(texts))
    s = Opposite()
    images = torch.ones(2, 1, 2, 2)
    assert s.similarity(images, "x").tolist() == pytest.approx([-100.0, -100.0])
    assert s.score(images, "x").tolist() == [0.0, 0.0]
