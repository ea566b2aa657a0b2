"""Domain feature nets, reference-statistics caching and compute_fid end to end."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import raygen.metrics.domain as domain
from raygen.metrics import (FIDEvaluator, MetricsError, ReferenceStats, compute_fid, fid_floor, fit_domain_features,
                            get_dataset_extractor, load_extractor, reference_stats)


def make_patterns(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes of 16x16 grayscale patterns (stripes two ways, a blob, a checkerboard)
    at random phase and contrast, plus noise; uint8 like a decoded dataset."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    phase = torch.rand(n, 1, 1, generator=g) * 6.28
    contrast = 0.3 + 0.2 * torch.rand(n, 1, 1, generator=g)
    pats = torch.stack([torch.sin(yy[None] * 1.2 + phase), torch.sin(xx[None] * 1.2 + phase),
                        torch.exp(-((yy[None] - 8 - 3 * torch.sin(phase)) ** 2 + (xx[None] - 8) ** 2) / 12) * 2 - 1,
                        torch.sign(torch.sin(yy[None] * 0.8 + phase) * torch.sin(xx[None] * 0.8))], 1)
    img = 0.5 + contrast * pats[torch.arange(n), labels] + 0.05 * torch.randn(n, size, size, generator=g)
    return torch.floor(img.clamp(0, 1) * 255 + 0.5).to(torch.uint8)[:, None], labels


@pytest.fixture(scope="module")
def data():
    return make_patterns(1200, seed=0)


@pytest.fixture(scope="module")
def fitted(data, tmp_path_factory):
    images, labels = data
    cache = tmp_path_factory.mktemp("domain-cache")
    return fit_domain_features(images, labels, cache_dir=cache, steps=60, batch_size=32), cache


def test_domain_features_learn_the_labels_and_are_stored_without_pickle(fitted):
    ext, cache = fitted
    assert ext.training["objective"] == "classify" and ext.training["train_accuracy"] > 0.9
    assert ext.name == f"domain:{ext.id}" and ext.path == cache / f"domain-{ext.id}"
    assert sorted(p.name for p in ext.path.iterdir()) == ["config.json", "weights.safetensors"]
    assert ext.dim == 128 and ext.preprocess.size == 16 and ext.preprocess.channels == 1


def test_domain_features_are_standardised_on_the_training_data(fitted, data):
    f = fitted[0](data[0]).double()  # FID then reads in units of the data's own spread
    assert f.mean(0).abs().max() < 1e-3 and f.var(0).mean().item() == pytest.approx(1.0, rel=1e-3)


def test_domain_extractor_reloads_by_path_and_by_id(fitted, data):
    ext, cache = fitted
    images = data[0][:50]
    by_path = load_extractor(f"domain:{ext.path}")
    by_id = load_extractor(f"domain:{ext.id}", cache_dir=cache)
    assert by_path.name == by_id.name == ext.name
    assert torch.equal(by_path(images), ext(images)) and torch.equal(by_id(images), ext(images))
    # float [0, 1] input and uint8 input of the same pixels give the same features
    assert torch.allclose(ext(images.float() / 255), ext(images), atol=1e-6)
    with pytest.raises(MetricsError, match="fit-features"):
        load_extractor("domain:0123456789abcdef", cache_dir=cache)


def test_contrastive_objective_without_labels(data, tmp_path):
    no_labels = torch.full((256,), -1)  # what the dataset writer stores for "no label"
    ext = fit_domain_features(data[0][:256], no_labels, out=tmp_path / "feat", steps=20, batch_size=32)
    assert ext.training["objective"] == "contrastive" and ext.training["steps"] == 20
    assert ext.path == tmp_path / "feat" and ext(data[0][:4]).shape == (4, 128)


def test_fid_and_kid_separate_same_from_different_distributions(fitted, data):
    ext, _ = fitted
    images, labels = data
    held_out, _ = make_patterns(300, seed=1)
    one_class = images[labels == 0][:300]  # mode collapse onto one class
    noisy = (held_out.float() / 255 + 0.3 * torch.randn(held_out.shape, generator=torch.Generator().manual_seed(2)))
    same = compute_fid(held_out, images, ext, kid_subsets=20, kid_subset_size=200)
    collapsed = compute_fid(one_class, images, ext, kid_subsets=20, kid_subset_size=200)
    broken = compute_fid(noisy, images, ext, kid_subsets=20, kid_subset_size=200)
    assert set(same) == {"fid", "kid", "kid_std", "n_generated", "n_reference", "extractor", "generated_out_of_range"}
    assert same["n_generated"] == 300 and same["n_reference"] == 1200 and same["extractor"] == ext.name
    assert collapsed["fid"] > 5 * same["fid"] and broken["fid"] > 5 * same["fid"]
    assert abs(same["kid"]) < collapsed["kid"] / 5 and abs(same["kid"]) < broken["kid"] / 5
    assert same["generated_out_of_range"] == 0.0 and broken["generated_out_of_range"] > 0.05


def test_reference_stats_are_cached_by_dataset_extractor_and_count(fitted, data, tmp_path, monkeypatch):
    ext, _ = fitted
    images = data[0]
    calls = []
    real_call = type(ext).__call__
    monkeypatch.setattr(type(ext), "__call__", lambda self, x: calls.append(len(x)) or real_call(self, x))
    s1 = reference_stats(images, ext, count=500, cache_dir=tmp_path)
    s2 = reference_stats(images, ext, count=500, cache_dir=tmp_path)
    assert calls == [500]  # the second call read the file
    assert np.array_equal(s1.mu, s2.mu) and np.array_equal(s1.sigma, s2.sigma) and s2.n == 500
    assert s2.mu.dtype == np.float64 and s2.features.shape == (500, 128)
    reference_stats(images, ext, count=400, cache_dir=tmp_path)  # another count: another key
    reference_stats(images[:-1], ext, count=500, cache_dir=tmp_path)  # another dataset: another key
    assert calls == [500, 400, 500] and len(list(tmp_path.glob("ref-*.safetensors"))) == 3
    # precomputed statistics work as the reference and must match the extractor
    result = compute_fid(images[:64], s2, ext, kid_subsets=5)
    assert result["n_reference"] == 500
    other = ReferenceStats(mu=s2.mu, sigma=s2.sigma, features=s2.features, n=500, extractor="inception-v3-pool3:x")
    with pytest.raises(MetricsError, match="recompute"):
        compute_fid(images[:64], other, ext)
    evaluator = FIDEvaluator(ext, images, reference_count=500, cache_dir=tmp_path, kid_subsets=5)
    assert evaluator(images[:64])["fid"] == pytest.approx(result["fid"])


def test_dataset_extractor_is_trained_once_then_reused(data, tmp_path, monkeypatch):
    images, labels = data
    images, labels = images[:300], labels[:300]
    fits = []
    real_train = domain._train

    def counting_train(*args, **kwargs):
        fits.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(domain, "_train", counting_train)
    first = get_dataset_extractor("domain", None, images, labels, tmp_path, steps=10, batch_size=32)
    second = get_dataset_extractor("domain", None, images, labels, tmp_path, steps=10, batch_size=32)
    assert len(fits) == 1 and first.name == second.name
    # the id is known before training: the cache folder is named by it
    assert first.id == domain.domain_id(images, labels, steps=10, batch_size=32)
    assert first.path == tmp_path / f"domain-{first.id}"
    # another dataset, or another recipe, trains its own
    get_dataset_extractor("domain", None, images[:200], labels[:200], tmp_path, steps=10, batch_size=32)
    get_dataset_extractor("domain", None, images, labels, tmp_path, steps=11, batch_size=32)
    assert len(fits) == 3 and len(list(tmp_path.glob("domain-*/config.json"))) == 3
    with pytest.raises(MetricsError, match="domain:PATH"):
        get_dataset_extractor("bogus", None, images, labels, tmp_path)
    with pytest.raises(MetricsError, match="not both"):  # a dataset folder is always fit on its own images
        get_dataset_extractor("domain", tmp_path, images, labels, tmp_path)


def _weights(ext) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(ext.path / "weights.safetensors"))


def test_one_dataset_one_net_whatever_the_threads_or_the_cache(data, tmp_path):
    """The fit is a function of the data and the recipe: same id, same bits, even when the
    caller's process runs torch with another thread count."""
    images, labels = data[0][:400], data[1][:400]
    a = fit_domain_features(images, labels, cache_dir=tmp_path / "a", steps=15, batch_size=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads == 1 else 1)
    try:
        b = fit_domain_features(images.float() / 255, labels, cache_dir=tmp_path / "b", steps=15, batch_size=32)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads  # the fit's own thread count does not leak out
    assert a.id == b.id and a.path != b.path
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    config = json.loads((a.path / "config.json").read_text())
    assert config["recipe"]["fit"]["steps"] == 15 and len(config["weights_sha256"]) == 64
    # one changed label, or one changed pixel, is another dataset: another id
    relabelled = labels.clone()
    relabelled[0] = (relabelled[0] + 1) % 4
    repainted = images.clone()
    repainted[0, 0, 0, 0] ^= 1
    assert len({a.id, domain.domain_id(images, relabelled, steps=15, batch_size=32),
                domain.domain_id(repainted, labels, steps=15, batch_size=32),
                domain.domain_id(images, labels, steps=16, batch_size=32)}) == 4


def test_time_budget_options_are_gone_with_a_pointer_to_steps(data, tmp_path):
    with pytest.raises(MetricsError, match="steps=N"):
        fit_domain_features(data[0][:64], data[1][:64], cache_dir=tmp_path, max_seconds=30)
    with pytest.raises(MetricsError, match="steps=N"):
        get_dataset_extractor("domain", None, data[0][:64], data[1][:64], tmp_path, max_steps=10)
    with pytest.raises(MetricsError, match="unknown domain fit option"):
        fit_domain_features(data[0][:64], None, cache_dir=tmp_path, stepz=10)


def test_fid_floor_is_real_vs_real_and_cached_beside_the_reference(fitted, data, tmp_path, monkeypatch):
    ext, _ = fitted
    images, labels = data
    val, _ = make_patterns(200, seed=5)
    floor = fid_floor(images, val, ext, cache_dir=tmp_path)
    # by definition: the first n train images (n = the reference's size) against the reference
    assert floor == pytest.approx(compute_fid(images[:200], val, ext, kid_subsets=2)["fid"], rel=1e-9)
    collapsed = compute_fid(images[labels == 0][:200], val, ext, kid_subsets=2)["fid"]
    assert 0 < floor < collapsed / 5
    assert len(list(tmp_path.glob("ref-*.safetensors"))) == 1 and len(list(tmp_path.glob("floor-*.json"))) == 1
    calls = []
    real_call = type(ext).__call__
    monkeypatch.setattr(type(ext), "__call__", lambda self, x: calls.append(len(x)) or real_call(self, x))
    stats = reference_stats(val, ext, cache_dir=tmp_path)
    assert fid_floor(images, stats, ext, cache_dir=tmp_path) == floor and calls == []  # both read from disk
    assert fid_floor(images[100:], stats, ext, cache_dir=tmp_path) != floor and calls == [200]  # other train images


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_16px_domain_fid(tmp_path):
    import torch.nn.functional as F
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:3000].copy()
    with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as f:
        labels = torch.from_numpy(np.frombuffer(f.read(), np.uint8, offset=8)[:3000].astype(np.int64))
    x = F.interpolate(torch.from_numpy(raw).float() / 255, size=(16, 16), mode="bilinear", antialias=True)
    images = torch.floor(x * 255 + 0.5).to(torch.uint8)
    ext = get_dataset_extractor("domain", None, images[:2500], labels[:2500], tmp_path, steps=100, batch_size=64)
    assert ext.training["train_accuracy"] > 0.65
    real = compute_fid(images[2500:], images[:2500], ext, kid_subsets=10, kid_subset_size=250)
    blurred = F.avg_pool2d(images[2500:].float() / 255, 3, stride=1, padding=1)
    blur = compute_fid(blurred, images[:2500], ext, kid_subsets=10, kid_subset_size=250)
    assert blur["fid"] > 2 * real["fid"] and blur["kid"] > real["kid"]
