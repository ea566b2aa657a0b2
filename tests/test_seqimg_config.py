"""seqimg options: validation messages, registry, build-time checks, patch
geometry, the comparison job spec."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from raygen.models.base import DataInfo
from raygen.models.registry import build_model, get_family
from raygen.models.seqimg import BACKBONES, PatchGeometry, SeqImgConfig, SeqImgModel
from raygen.spec.errors import SpecError
from raygen.spec.loader import apply_overrides, load_spec, parse_spec, read_spec_file

REPO = Path(__file__).resolve().parents[1]
INFO = DataInfo(channels=1, resolution=16, num_classes=10)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: one intra-op thread avoids oversubscribing shared cores (30x faster under load)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_family_is_registered():
    fam = get_family("seqimg")
    assert fam.config_cls is SeqImgConfig and fam.description
    model = build_model("seqimg", {"backbone": "lstm", "dim": 16, "depth": 1}, INFO)
    assert isinstance(model, SeqImgModel) and model.config.backbone == "lstm"
    assert sorted(BACKBONES) == sorted(SeqImgConfig.model_fields["backbone"].annotation.__args__)


def test_defaults_are_the_quickstart_model():
    cfg = SeqImgConfig()
    assert (cfg.backbone, cfg.dim, cfg.patch_mode, cfg.head) == ("gpt2", 64, "rowwise", "categorical")
    assert 2 <= cfg.depth <= 4
    assert cfg.positional == "learned"
    model = build_model("seqimg", cfg, INFO)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000  # trains on 2 CPU cores in minutes


def test_per_backbone_defaults():
    modern = SeqImgConfig(backbone="modern")
    assert (modern.positional, modern.dropout_rate, modern.drop_path_rate, modern.layer_scale_init) == ("rotary", 0.1, 0.1, 0.1)
    assert SeqImgConfig(backbone="alibi").positional == "none"
    gpt2 = SeqImgConfig(backbone="gpt2")
    assert (gpt2.dropout_rate, gpt2.drop_path_rate, gpt2.layer_scale_init) == (0.0, 0.0, None)
    assert SeqImgConfig(backbone="modern", dropout=0.0).dropout_rate == 0.0


def _error(**options) -> str:
    with pytest.raises(ValidationError) as err:
        SeqImgConfig.model_validate(options)
    return str(err.value)


def test_bad_values_name_the_field_and_the_choices():
    msg = _error(backbone="transformer")
    assert "backbone" in msg and "gpt2" in msg and "mamba" in msg
    msg = _error(patch_mode="diagonal")
    assert "patch_mode" in msg and "columnwise" in msg
    assert "activation" in _error(activation="swish") and "golu" in _error(activation="swish")
    assert "activation" in _error(activation=23)
    assert "norm" in _error(norm="group")
    assert "unexpected" in _error(colour=1).lower() or "extra" in _error(colour=1).lower()


def test_seed_numbers_are_accepted():
    cfg = SeqImgConfig(activation=6, residual=3, norm=3)
    model = build_model("seqimg", cfg.model_copy(update={"dim": 16, "depth": 1, "heads": 2}), INFO)
    block = model.backbone.blocks[0]
    assert type(block.ff.act).__name__ == "Lambda" and block.ff.act.name == "golu"
    assert type(block.join1.residual).__name__ == "ReZero"
    assert type(block.norm1).__name__ == "RMSNorm"


def test_cross_field_checks():
    assert "rotary" in _error(backbone="lstm", pos_embedding="rotary")
    assert "alibi" in _error(backbone="alibi", pos_embedding="learned")
    assert "divisible" in _error(backbone="gpt2", dim=30, heads=4)
    assert "ff_mult" in _error(backbone="mlp", mlp_token_mixing=False, ff_mult=0)


def test_build_time_checks_name_the_problem():
    with pytest.raises(ValueError, match=r"patch_size 5 must divide the resolution 16 \(divisors: 1, 2, 4, 8, 16\)"):
        build_model("seqimg", SeqImgConfig.debug(patch_mode="square", patch_size=5), INFO)
    with pytest.raises(ValueError, match="one patch"):
        build_model("seqimg", SeqImgConfig.debug(patch_mode="square", patch_size=16), INFO)
    with pytest.raises(ValueError, match="class labels"):
        build_model("seqimg", SeqImgConfig.debug(conditioning="label"), DataInfo(channels=1, resolution=16))
    with pytest.raises(ValueError, match="captions"):
        build_model("seqimg", SeqImgConfig.debug(conditioning="caption"), INFO)


def test_spec_errors_carry_the_yaml_path():
    with pytest.raises(SpecError, match=r"model\.options\.backbone"):
        parse_spec({"model": {"family": "seqimg", "options": {"backbone": "rnn"}}})


@pytest.mark.parametrize("mode,size,tokens,width", [
    ("rowwise", 1, 16, 16), ("rowwise", 2, 8, 32), ("columnwise", 1, 16, 16), ("square", 4, 16, 16),
])
def test_patch_geometry(mode, size, tokens, width):
    geo = PatchGeometry.build(mode, 1, 16, size)
    assert (geo.num_patches, geo.patch_dim) == (tokens, width)
    images = torch.rand(2, 1, 16, 16)
    patches = geo.patchify(images)
    assert patches.shape == (2, tokens, width)
    assert torch.equal(geo.unpatchify(patches), images)


def test_patch_order():
    img = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    rows = PatchGeometry.build("rowwise", 2, 4, 1).patchify(img)
    assert torch.equal(rows[0, 1], torch.cat([img[0, 0, 1], img[0, 1, 1]]))      # token 1 = row 1, both channels
    cols = PatchGeometry.build("columnwise", 2, 4, 1).patchify(img)
    assert torch.equal(cols[0, 2], torch.cat([img[0, 0, :, 2], img[0, 1, :, 2]]))  # token 2 = column 2
    squares = PatchGeometry.build("square", 2, 4, 2)
    assert squares.positions() == [(0, 0), (0, 1), (1, 0), (1, 1)]                # raster order
    assert torch.equal(squares.patchify(img)[0, 1], img[0, :, 0:2, 2:4].reshape(-1))


def test_compare_spec_is_a_valid_grid_over_backbones_and_modes():
    path = REPO / "jobs/specs/seqimg_compare.yaml"
    spec = load_spec(path)
    assert spec.data.dataset == "fashion-mnist" and spec.data.resolution == 16
    assert spec.train.clip.norm == 1.0
    assert (spec.scale.workers, spec.scale.strategy) == (1, "ddp")
    assert (spec.tune.num_samples, spec.tune.metric, spec.tune.mode, spec.tune.scheduler.name) == (1, "val_loss", "min", "fifo")
    backbones = spec.tune.space["model.options.backbone"]["grid"]
    modes = spec.tune.space["model.options.patch_mode"]["grid"]
    assert sorted(backbones) == sorted(BACKBONES) and sorted(modes) == ["columnwise", "rowwise", "square"]
    raw = read_spec_file(path)
    info = DataInfo(channels=spec.data.channels, resolution=spec.data.resolution, num_classes=10)
    for backbone, mode in itertools.product(backbones, modes):  # every trial's spec validates and builds
        trial = parse_spec(apply_overrides(raw, {"model.options.backbone": backbone, "model.options.patch_mode": mode}))
        model = build_model("seqimg", trial.model.config, info)
        assert model.seq_len == 16


def test_clip_effect_spec_is_the_compare_grid_without_clipping():
    """Each no-clip trial must differ from its seqimg_compare twin only by clipping."""
    base, noclip = (read_spec_file(REPO / f"jobs/specs/{name}.yaml") for name in ("seqimg_compare", "seqimg_clip_effect"))
    assert noclip["train"]["clip"] == {"norm": None} and base["train"]["clip"] == {"norm": 1.0}
    for key in ("data", "scale", "track"):
        assert noclip[key] == base[key], key
    assert {k: v for k, v in noclip["train"].items() if k != "clip"} == {k: v for k, v in base["train"].items() if k != "clip"}
    assert noclip["model"] == base["model"]
    space = load_spec(REPO / "jobs/specs/seqimg_clip_effect.yaml").tune.space
    assert set(space["model.options.backbone"]["grid"]) <= set(BACKBONES)
    assert space["model.options.patch_mode"]["grid"] == base["tune"]["space"]["model.options.patch_mode"]["grid"]
