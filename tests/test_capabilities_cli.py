"""Commands ask a model's declared capabilities: a missing one is a one-line
error naming the model, the capability and the families that have it; the
one label parser matches class names in any case, in the CLI as in the API."""
from __future__ import annotations

import math
import re

import pytest
import torch

import pipeline_toys  # noqa: F401  (toy_ae: an autoencoder, which cannot sample)
from raygen.exports import export_generator
from raygen.jobs.cli import main
from raygen.models import ConditionError, DataInfo, build_model
from raygen.models.conditions import parse_label
from raygen.spec import parse_spec

NAMES = ["T-shirt/top", "Trouser", "Sneaker"]


def run_cli(capfd, *argv):
    capfd.readouterr()
    rc = main([str(a) for a in argv])
    return (rc, *capfd.readouterr())


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from raygen.data import prepare_dataset
    root = tmp_path_factory.mktemp("caps")
    prepare_dataset("digits", root / "digits", resolution=8, count=200)
    return root


def export(root, name, family, options, info, data=None):
    spec = parse_spec({"name": name, "run_dir": str(root / "runs"), "model": {"family": family, "options": options},
                       "data": data or {"dataset": str(root / "digits"), "root": str(root), "resolution": 8},
                       "track": {"fid": {"samples": 16}}})
    torch.manual_seed(0)
    model = build_model(family, options, info)
    return export_generator(root / name, model.state_dict(), spec, info, {"step": 0})


def test_the_label_parser_matches_names_in_any_case():
    info = DataInfo(channels=1, resolution=8, num_classes=3, class_names=NAMES)
    assert [parse_label(v, info) for v in ("sneaker", "SNEAKER", "Sneaker", " trouser ", 2, "0")] == [2, 2, 2, 1, 2, 0]
    for bad, needle in ((3, "out of range"), ("boot", "unknown label 'boot'"), (True, "class index or name"),
                        ("-1", "out of range")):
        with pytest.raises(ConditionError, match=needle):
            parse_label(bad, info)
    with pytest.raises(ConditionError, match="no classes"):
        parse_label(0, DataInfo(channels=1, resolution=8))


def test_sample_label_by_name_any_case(digits, tmp_path, capfd):
    info = DataInfo(channels=1, resolution=8, num_classes=3, class_names=NAMES)
    model = export(digits, "named", "seqimg", {"backbone": "gpt2", "dim": 16, "depth": 1, "heads": 2,
                                               "conditioning": "label"}, info)
    grids = []
    for label in ("sneaker", "SNEAKER", "2"):
        out = tmp_path / f"{label}.png"
        rc, _, err = run_cli(capfd, "sample", model, "-n", 4, "--label", label, "--out", out)
        assert rc == 0, err
        grids.append(out.read_bytes())
    assert grids[0] == grids[1] == grids[2]


def test_missing_capabilities_are_one_line_errors(digits, tmp_path, capfd):
    clip = export(digits, "scorer", "clip", {"embed_dim": 16, "image_width": 8, "image_depth": 2},
                  DataInfo(channels=1, resolution=8, num_classes=10, class_names=[str(i) for i in range(10)]))
    ae = export(digits, "ae", "toy_ae", {}, DataInfo(channels=1, resolution=8))
    for model, family in ((clip, "clip"), (ae, "toy_ae")):
        rc, _, err = run_cli(capfd, "sample", model, "-n", 2, "--out", tmp_path / "x.png")
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"(family {family}) cannot sample images" in err and "families that can: " in err and "seqimg" in err
    assert not (tmp_path / "x.png").exists()


def test_eval_reports_what_the_capabilities_allow(digits, capfd):
    clip = export(digits, "scorer2", "clip", {"embed_dim": 16, "image_width": 8, "image_depth": 2},
                  DataInfo(channels=1, resolution=8, num_classes=10, class_names=[str(i) for i in range(10)]))
    rc, out, err = run_cli(capfd, "eval", clip, "--no-log")
    assert rc == 0, err  # a scorer: no FID, but its contrastive validation loss
    found = dict(re.findall(r"^\s*(\w+): (\S+)$", out, flags=re.M))
    assert "fid" not in found and math.isfinite(float(found["val_loss"]))
    ae = export(digits, "ae2", "toy_ae", {}, DataInfo(channels=1, resolution=8))
    rc, out, err = run_cli(capfd, "eval", ae, "--no-log")
    assert rc == 0, err
    found = dict(re.findall(r"^\s*(\w+): (\S+)$", out, flags=re.M))
    assert "fid" not in found and math.isfinite(float(found["recon_l2"])) and "val_loss" in found
