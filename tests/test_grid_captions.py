"""Sample grids show each image's class name or caption under it (issue 11 item 7),
and the CLIP score of label/caption-conditioned samples scores them against that
same text."""
import numpy as np
import pytest
import torch
from PIL import Image

import raygen.models.clip  # noqa: F401  (registers the family)
from raygen.images import CAPTION_HEIGHT, caption_cells, make_grid, save_grid
from raygen.metrics import TrainedClipScorer
from raygen.models import Conditions, DataInfo, build_model
from raygen.models.clip import ClipConfig
from raygen.models.seqimg import SeqImgConfig
from raygen.train.clip_score import condition_clip_score
from raygen.train.sampling import sample_grid_png

CLASSES = DataInfo(channels=1, resolution=8, num_classes=3, class_names=["circle", "square", "triangle"])


def test_caption_cells_write_text_in_a_strip_under_each_image():
    images = np.full((2, 32, 32, 3), 100, dtype=np.uint8)
    cells = caption_cells(images, ["a red circle", ""])
    assert cells.shape == (2, 32 + CAPTION_HEIGHT, 32, 3)
    assert (cells[:, :32] == 100).all()                    # the images are untouched
    assert cells[0, 32:].max() == 255                      # text is drawn under the first
    assert cells[1, 32:].max() == 0                        # an empty caption leaves the strip blank
    assert (cells[0, 32:, :, 0] == cells[0, 32:, :, 2]).all()  # the same text in every channel
    with pytest.raises(ValueError, match="one caption per image"):
        caption_cells(images, ["only one"])


def test_long_captions_are_cut_to_the_cell_width_and_texts_differ():
    images = np.zeros((2, 40, 40, 1), dtype=np.uint8)
    cells = caption_cells(images, ["sneaker", "a very long caption that cannot fit in forty pixels"])
    assert cells.shape == (2, 40 + CAPTION_HEIGHT, 40, 1)
    assert not np.array_equal(cells[0, 40:], cells[1, 40:])


def test_make_grid_with_captions_upscales_before_writing(tmp_path):
    x = torch.rand(4, 1, 8, 8)
    plain = make_grid(x, upscale=4, pad=2)
    captioned = make_grid(x, upscale=4, pad=2, captions=["a", "b", "c", "d"])
    assert captioned.shape == (plain.shape[0] + 2 * CAPTION_HEIGHT, plain.shape[1], 1)
    path = save_grid(x, tmp_path / "g.png", upscale=4, captions=["a", "b", "c", "d"])
    assert np.asarray(Image.open(path)).shape == captioned.shape[:2]


def test_conditions_as_text():
    assert Conditions("label", (0, 2, None)).texts(CLASSES) == ["circle", "triangle", ""]
    assert Conditions("caption", ("a red circle", None)).texts(CLASSES) == ["a red circle", ""]
    assert Conditions.none(3).texts(CLASSES) is None
    assert Conditions("label", (1,)).texts(DataInfo(channels=1, resolution=8, num_classes=3)) == ["class 1"]


def test_training_grid_of_a_label_model_carries_class_names(tmp_path):
    torch.manual_seed(0)
    model = build_model("seqimg", SeqImgConfig.debug(conditioning="label"), CLASSES).eval()
    path = sample_grid_png(model, 6, tmp_path / "grid.png")
    height = np.asarray(Image.open(path)).shape[0]
    unconditioned = build_model("seqimg", SeqImgConfig.debug(), DataInfo(channels=1, resolution=8)).eval()
    plain = np.asarray(Image.open(sample_grid_png(unconditioned, 6, tmp_path / "plain.png"))).shape[0]
    assert height == plain + 2 * CAPTION_HEIGHT  # two rows of three, each with its caption strip


def test_clip_score_scores_samples_against_their_class_names():
    torch.manual_seed(0)
    info = DataInfo(channels=1, resolution=8, num_classes=3, class_names=["circle", "square", "triangle"])
    clip = build_model("clip", ClipConfig.debug(), DataInfo(channels=1, resolution=8, has_captions=True))
    scorer = TrainedClipScorer(clip)
    model = build_model("seqimg", SeqImgConfig.debug(conditioning="label"), info).eval()
    records = {"image": torch.rand(4, 1, 8, 8), "label": np.array([0, 1, 2, 0])}
    images = torch.rand(4, 1, 8, 8)
    score = condition_clip_score(scorer, model, records, images)
    expected = scorer.score(images, ["circle", "square", "triangle", "circle"]).mean().item()
    assert score == pytest.approx(expected)
    unconditioned = build_model("seqimg", SeqImgConfig.debug(), DataInfo(channels=1, resolution=8)).eval()
    assert condition_clip_score(scorer, unconditioned, {"image": records["image"]}, images) is None
