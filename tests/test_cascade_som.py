"""The SOM codebooks (family `som`): cluster recovery, the neighbourhood and learning-rate schedules, the batch
SOM over workers, resume, pruning's remap, and the metrics."""
from __future__ import annotations

import math

import pytest
import torch

from raygen.models import DataInfo, build_model
from raygen.models.cascade.som import grid_shape, patchify, unpatchify

CENTRES = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0], [0.0, 0.0], [4.0, 0.0]])
MAP = DataInfo(channels=2, resolution=4)


def cluster_batch(g: torch.Generator, n: int = 32) -> dict:
    """Latent maps [n, 2, 4, 4] whose 1x1 patches are points of six Gaussian clusters (std 0.1)."""
    k = torch.randint(len(CENTRES), (n * 16,), generator=g)
    x = CENTRES[k] + 0.1 * torch.randn(n * 16, 2, generator=g)
    return {"latent": x.reshape(n, 4, 4, 2).permute(0, 3, 1, 2)}


def som(**options):
    level = {"patch_H": 1, "patch_W": 1, "num_embeddings": 6, "neighbourhood_step": 5, "lr": 1.0}
    level.update(options.pop("level", {}))
    return build_model("som", {"levels": [level], "condition": None, "lr_half_life": 1000, **options}, MAP)


def fit(model, steps, seed=0, start=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(start - 1):
        cluster_batch(g)
    metrics = None
    for step in range(start, start + steps):
        metrics = model.apply_fit(model.fit_statistics(cluster_batch(g)), step)
    return metrics


def test_the_som_recovers_the_centres_of_gaussian_clusters():
    model = som()
    metrics = fit(model, 60)
    units = model.levels[0].weight
    nearest = torch.cdist(CENTRES.double(), units).min(1).values
    assert (nearest < 0.05).all(), units  # every centre has a unit on it
    assert metrics["level0_usage"] == 1.0 and metrics["level0_dead"] == 0
    assert metrics["level0_qerr"] < 0.011  # about the clusters' own variance (0.1² per value)
    assert metrics["level0_perplexity"] > 5.5


def test_the_neighbourhood_shrinks_and_the_learning_rate_decays_on_schedule():
    model = build_model("som", {"levels": [{"patch_H": 1, "patch_W": 1, "num_embeddings": 12,
                                            "neighbourhood_step": 10, "lr": 0.8}],
                                "condition": None, "lr_half_life": 20, "min_lr": 0.1, "neighbourhood_end": 0.25},
                        MAP)
    m = model.levels[0]
    assert grid_shape(12) == (3, 4) and m.sigma0 == 2.0
    assert m.sigma(1, 0.25) == 2.0 and m.sigma(11, 0.25) == 1.0 and m.sigma(21, 0.25) == 0.5
    assert m.sigma(200, 0.25) == 0.25  # floored at neighbourhood_end
    assert m.rate(1, 20, 0.1) == 0.8 and m.rate(21, 20, 0.1) == pytest.approx(0.4) and m.rate(500, 20, 0.1) == 0.1
    # the neighbourhood's reach: a grid neighbour pulls with exp(-1 / 2σ²)
    assert float(m.neighbourhood(1.0)[0, 1]) == pytest.approx(math.exp(-0.5))
    assert float(m.neighbourhood(0.25)[0, 1]) < 1e-3
    g = torch.Generator().manual_seed(0)
    sigmas = [model.apply_fit(model.fit_statistics(cluster_batch(g, 4)), s)["level0_sigma"] for s in range(1, 31)]
    assert sigmas == [m.sigma(s, 0.25) for s in range(1, 31)] and sigmas == sorted(sigmas, reverse=True)


def test_statistics_add_over_workers_and_a_resumed_fit_equals_an_uninterrupted_one():
    a, b = som(), som()
    g = torch.Generator().manual_seed(3)
    for step in range(1, 6):
        batch = cluster_batch(g, 16)
        a.apply_fit(a.fit_statistics(batch), step)
        halves = [b.fit_statistics({"latent": part}) for part in batch["latent"].split(8)]
        b.apply_fit({k: halves[0][k] + halves[1][k] for k in halves[0]}, step)  # what the engine's all-reduce does
    assert torch.allclose(a.levels[0].weight, b.levels[0].weight, atol=1e-12)

    whole = som()
    fit(whole, 20)
    first = som()
    fit(first, 8)
    resumed = som()
    resumed.load_state_dict(first.state_dict())  # a checkpoint is the state_dict
    fit(resumed, 12, start=9)
    assert torch.equal(resumed.levels[0].weight, whole.levels[0].weight)


def test_pruning_removes_rare_units_and_its_remap_keeps_every_tokens_decoded_vector():
    model = som(level={"num_embeddings": 9}, count_from=41, prune_threshold=1)
    fit(model, 40)
    m = model.levels[0]
    before = m.weight.clone()
    g = torch.Generator().manual_seed(9)
    x = patchify(cluster_batch(g, 8)["latent"].double(), 1, 1).reshape(-1, 2)
    old_tokens = m.encode(x)  # nothing pruned yet: tokens are unit indices
    assert m.vocab == 9 and torch.equal(old_tokens, m.bmu(x)[0])
    metrics = fit(model, 5, start=41)  # counting steps: units frozen, use counted, then pruned
    assert torch.equal(m.weight, before)
    kept = m.kept
    assert metrics["level0_kept"] == m.vocab and 6 <= m.vocab < 9  # 9 units for 6 clusters: some go unused
    assert torch.equal(kept, m.usage >= 1)
    new_tokens = m.remap[old_tokens]
    assert new_tokens.max() < m.vocab
    was_kept = kept[old_tokens]
    assert torch.equal(m.decode(new_tokens[was_kept]).double(), before[old_tokens[was_kept]].float().double())
    # every unit, kept or not, decodes through the remap to itself or to its nearest kept unit
    for unit in range(9):
        target = m.decode(m.remap[unit:unit + 1])[0].double()
        if kept[unit]:
            assert torch.equal(target, before[unit].float().double())
        else:
            dists = (before[kept] - before[unit]).norm(dim=1)
            assert torch.equal(target, before[kept][int(dists.argmin())].float().double())
    assert torch.equal(m.encode(x), new_tokens)  # encoding after pruning gives the remapped tokens


def test_levels_tokens_decode_and_the_decoded_psnr_metric():
    from raygen.models.cascade import SOM_FAMILY
    config, info, components = SOM_FAMILY.debug()["with-autoencoder"]
    model = build_model("som", config, info, components)
    latents = torch.rand(3, *info.shape) * 2 - 1
    tokens = model.tokens(latents)
    assert [t.shape for t in tokens] == [(3, 1), (3, 4)] and model.cond_tokens(latents).shape == (3,)
    quant = model.decode_level(1, tokens[1])
    assert quant.shape == latents.shape
    assert torch.equal(model.decode(model.encode(latents)), quant)
    metrics = model.apply_fit(model.fit_statistics({"latent": latents}), 1)
    assert {"level0_psnr", "level1_psnr", "condition_qerr", "level1_perplexity"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())


def test_patchify_round_trips_and_bad_options_fail_with_one_line():
    x = torch.randn(2, 3, 4, 6)
    assert torch.equal(unpatchify(patchify(x, 2, 3), (3, 4, 6), 2, 3), x)
    with pytest.raises(ValueError, match="must divide the latent map 4x4"):
        som(level={"patch_H": 3})
    with pytest.raises(ValueError, match="coarse to fine"):
        build_model("som", {"levels": [{"patch_H": 1, "patch_W": 1}, {"patch_H": 2, "patch_W": 2}]}, MAP)
    with pytest.raises(ValueError, match="count_from"):
        som(prune_threshold=3)
