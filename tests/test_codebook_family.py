"""The `codebook` family: a k-means codebook over pixel patches, fitted without gradients.

Fast tier (plain torch, real digits): the registry entry, shapes of encode and
decode, reconstruction error falling as fit steps run, fitting split over two
"workers" (statistics summed) equal to fitting on the whole batch, and the
export round trip. Slow tier: `raygen train` through Ray with 2 workers, then
`raygen eval` reporting reconstruction metrics.
"""
from __future__ import annotations

import pytest
import torch

from raygen.data import load_split_images, prepare_dataset
from raygen.models import Capability, CapabilityError, DataInfo, build_model, get_family, require
from raygen.models.codebook import CodebookConfig, PatchCodebook
from raygen.spec import DataSpec, parse_spec

DEBUG = CodebookConfig.debug().model_dump()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(train images, val images, DataInfo) of sklearn's 8x8 digits, prepared as shards."""
    root = tmp_path_factory.mktemp("codebook")
    manifest = prepare_dataset("digits", root / "digits", resolution=8, count=600)
    spec = DataSpec(dataset=str(root / "digits"), resolution=8, channels=1)
    train = load_split_images(root / "digits", "train", spec)["image"]
    val = load_split_images(root / "digits", "val", spec)["image"]
    return train, val, manifest.data_info(spec), root


def batches(images: torch.Tensor, size: int, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield images[torch.randint(len(images), (size,), generator=g)]


def fit(model: PatchCodebook, images: torch.Tensor, steps: int, size: int = 32) -> list[dict[str, float]]:
    return [model.apply_fit(model.fit_statistics({"image": b}), step)
            for step, b in enumerate(batches(images, size, steps), start=1)]


def val_mse(model: PatchCodebook, images: torch.Tensor) -> float:
    return float(((model.reconstruct(images) - images) ** 2).mean())


# ------------------------------------------------------------------ the registry entry
def test_registered_with_fit_encode_reconstruct_and_no_sample():
    fam = get_family("codebook")
    assert fam.capabilities == {Capability.FIT, Capability.ENCODE, Capability.RECONSTRUCT}
    assert fam.conditions == ("none",) and fam.sampling_params.model_fields == {}
    model = build_model("codebook", DEBUG, DataInfo(channels=1, resolution=8))
    assert (model.family, model.condition_kind) == ("codebook", "none")
    with pytest.raises(CapabilityError, match="cannot sample images"):
        require(model, Capability.SAMPLE)
    with pytest.raises(CapabilityError, match="cannot sample images"):
        model.generate(2)


def test_config_rejects_bad_options_naming_the_field():
    with pytest.raises(ValueError, match="extra"):
        CodebookConfig.model_validate({"patches": 2})
    with pytest.raises(ValueError, match="decay"):
        CodebookConfig(decay=1.0)
    with pytest.raises(ValueError, match=r"model.options.patch: 3 must divide the image size 8x12 \(accepted: 1, 2, 4\)"):
        build_model("codebook", {"patch": 3}, DataInfo(channels=1, height=8, width=12))


def test_same_seed_same_codes_other_seed_other_codes():
    info = DataInfo(channels=3, resolution=4)
    a, b = (build_model("codebook", {**DEBUG, "seed": 1}, info) for _ in range(2))
    c = build_model("codebook", {**DEBUG, "seed": 2}, info)
    assert torch.equal(a.codebook, b.codebook) and not torch.equal(a.codebook, c.codebook)
    assert a.codebook.shape == (16, 3 * 2 * 2)


# ------------------------------------------------------------------ encode / decode
def test_encode_decode_shapes_and_exact_codes():
    info = DataInfo(channels=3, height=8, width=12)
    model = build_model("codebook", {**DEBUG, "patch": 4}, info)
    images = torch.rand(5, 3, 8, 12)
    index = model.encode(images)
    assert index.shape == (5, 2, 3) and index.dtype == torch.long
    assert 0 <= int(index.min()) and int(index.max()) < 16
    out = model.decode(index)
    assert out.shape == (5, 3, 8, 12) and out.dtype == torch.float32
    assert torch.equal(model.reconstruct(images), out)
    # an image made of codes encodes to exactly those codes and decodes to itself
    chosen = torch.randint(16, (2, 2, 3), generator=torch.Generator().manual_seed(0))
    made = model.decode(chosen)
    assert torch.equal(model.encode(made), chosen)
    assert torch.allclose(model.reconstruct(made), made)
    # each patch goes to its nearest code
    patches = model.patchify(images).reshape(-1, model.dim)
    brute = torch.cdist(patches.double(), model.codebook.double()).argmin(1)
    assert torch.equal(index.reshape(-1), brute)


def test_decode_rejects_bad_indices():
    model = build_model("codebook", DEBUG, DataInfo(channels=1, resolution=8))
    with pytest.raises(ValueError, match=r"0..15, got 0..16"):
        model.decode(torch.tensor([[[0, 16, 0, 0]] * 4]))
    with pytest.raises(ValueError, match=r"expected code indices \[B, 4, 4\]"):
        model.decode(torch.zeros(1, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        model.decode(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"expected images \[B, 1, 8, 8\]"):
        model.encode(torch.zeros(1, 3, 8, 8))


# ------------------------------------------------------------------ fitting on real data
def test_reconstruction_error_falls_as_fit_steps_run(digits):
    train, val, info, _ = digits
    model = build_model("codebook", {"patch": 2, "codes": 64, "decay": 0.9}, info)
    before = val_mse(model, val)
    history = fit(model, train, steps=5)
    after_5 = val_mse(model, val)
    history += fit(model, train, steps=25)
    after_30 = val_mse(model, val)
    assert after_5 < 0.5 * before and after_30 < after_5, (before, after_5, after_30)
    assert int(model.fitted_steps) == 30
    # the batch error reported by apply_fit falls too, and the codebook ends up well used
    assert history[-1]["mse"] < 0.5 * history[0]["mse"]
    assert history[0]["codes_reseeded"] > 0  # the random starts no patch chose were re-seeded
    last = history[-1]
    assert last["codebook_usage"] > 0.8 and 1.0 < last["codebook_perplexity"] <= 64
    assert last["codebook_used"] == pytest.approx(last["codebook_usage"] * 64)
    # the metric agrees with encoding that batch with the codes before the step
    batch = next(batches(train, 32, 1, seed=7))
    stats = model.fit_statistics({"image": batch})
    expected = float(((model.reconstruct(batch).double() - batch.double()) ** 2).mean())
    assert model.apply_fit(stats, 31)["mse"] == pytest.approx(expected, rel=1e-9)


def test_dead_codes_are_reseeded_where_the_error_is():
    """Two tight clusters far apart: codes that no patch chooses are moved onto
    the clusters, so after one step every code is used and the error is tiny."""
    info = DataInfo(channels=1, resolution=2)
    model = build_model("codebook", {"patch": 2, "codes": 4, "decay": 0.5, "dead_below": 0.1}, info)
    model.codebook.copy_(torch.tensor([[0.5, 0.5, 0.5, 0.5]] + [[1.0, 0.0, 1.0, 0.0]] * 3))
    g = torch.Generator().manual_seed(0)
    images = torch.cat([0.1 + 0.02 * torch.randn(20, 1, 2, 2, generator=g),
                        0.9 + 0.02 * torch.randn(20, 1, 2, 2, generator=g)]).clamp(0, 1)
    first = model.apply_fit(model.fit_statistics({"image": images}), 1)
    assert first["codebook_used"] == 1 and first["codes_reseeded"] == 1  # one cluster to split, three dead codes
    for step in range(2, 6):
        last = model.apply_fit(model.fit_statistics({"image": images}), step)
    assert last["codebook_used"] >= 3 and last["mse"] < 0.005, last


def test_statistics_summed_over_workers_equal_the_whole_batch(digits):
    """The property that makes multi-worker fitting exact: two workers' summed
    statistics update the model exactly as one worker seeing both halves."""
    train, _, info, _ = digits
    options = {"patch": 2, "codes": 32, "decay": 0.7, "dead_below": 0.2}
    whole, split = build_model("codebook", options, info), build_model("codebook", options, info)
    reseeded = 0.0
    for step, batch in enumerate(batches(train, 48, 6, seed=3), start=1):
        a, b = batch[:20], batch[20:]
        sa, sb = split.fit_statistics({"image": a}), split.fit_statistics({"image": b})
        summed = {k: sa[k] + sb[k] for k in sa}
        full = whole.fit_statistics({"image": batch})
        assert summed.keys() == full.keys()
        for k in full:
            assert torch.allclose(summed[k], full[k], rtol=1e-12, atol=1e-10), k
        m_split, m_whole = split.apply_fit(summed, step), whole.apply_fit(full, step)
        assert m_split == pytest.approx(m_whole, rel=1e-9)
        reseeded += m_whole["codes_reseeded"]
        for name in ("codebook", "counts", "fitted_steps"):
            assert torch.allclose(getattr(split, name).double(), getattr(whole, name).double(), atol=1e-6), name
    assert reseeded > 0  # the re-seeding path was part of what matched


# ------------------------------------------------------------------ export
def test_export_and_load_round_trip(digits, tmp_path):
    from raygen.exports import export_generator, load_exported

    train, val, info, root = digits
    spec = parse_spec({"name": "cb", "run_dir": str(tmp_path / "runs"),
                       "data": {"dataset": str(root / "digits"), "resolution": 8, "channels": 1},
                       "model": {"family": "codebook", "options": DEBUG}})
    model = build_model("codebook", DEBUG, info)
    fit(model, train, steps=3)
    path = export_generator(tmp_path / "model", model.state_dict(), spec, info, meta={"step": 3})
    loaded = load_exported(path)
    assert loaded.spec.model.family == "codebook" and isinstance(loaded.model, PatchCodebook)
    state, back = model.state_dict(), loaded.model.state_dict()
    assert state.keys() == back.keys() == {"codebook", "counts", "fitted_steps"}
    for key in state:
        assert torch.equal(state[key], back[key]), key
    assert torch.equal(loaded.model.encode(val), model.encode(val))


# ------------------------------------------------------------------ through Ray and the CLI
@pytest.mark.slow
def test_raygen_train_fits_on_two_workers_and_eval_reports_reconstruction(ray_session, workdir, digits, capsys):
    import re

    from raygen.exports import load_generator
    from raygen.jobs.cli import main
    from raygen.tracking.store import client

    _, val, info, root = digits
    spec = workdir / "codebook.yaml"
    spec.write_text(f"""
name: cb
run_dir: {workdir / 'runs'}
data: {{dataset: {root / 'digits'}, resolution: 8, channels: 1, batch_size: 16}}
model: {{family: codebook, options: {{patch: 2, codes: 32, decay: 0.8}}}}
train: {{steps: 6, eval_every: 3, checkpoint_every: 3, log_every: 1, ema: {{enabled: false}}}}
scale: {{workers: 2}}
track: {{experiment: cb, fid: {{enabled: false}}}}
""")
    assert main(["train", str(spec)]) == 0
    out = capsys.readouterr().out
    tracking_uri = re.search(r"in (sqlite:\S+)", out).group(1)
    c = client(tracking_uri)
    run = c.search_runs([c.get_experiment_by_name("cb").experiment_id])[0]
    assert run.info.status == "FINISHED"
    mse = [m.value for m in sorted(c.get_metric_history(run.info.run_id, "fit_mse"), key=lambda m: m.step)]
    loss = [m.value for m in sorted(c.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(mse) == 6 and loss == mse and mse[-1] < 0.5 * mse[0], mse
    assert 0 < run.data.metrics["fit_codebook_usage"] <= 1 and run.data.metrics["fit_codebook_perplexity"] > 1

    loaded = load_generator(str(workdir / "runs" / "cb"))
    assert int(loaded.model.fitted_steps) == 6
    unfitted = build_model("codebook", loaded.spec.model.config, info)
    assert main(["eval", str(workdir / "runs" / "cb"), "--no-log"]) == 0
    printed = capsys.readouterr().out
    recon = {k: float(v) for k, v in re.findall(r"(recon_\w+): (\S+)", printed)}
    assert recon.keys() == {"recon_l1", "recon_l2", "recon_psnr"}, printed
    assert recon["recon_l2"] < 0.5 * val_mse(unfitted, val[:256]), (recon, printed)
    assert recon["recon_l2"] == pytest.approx(val_mse(loaded.model, val[:256]), rel=1e-3)
