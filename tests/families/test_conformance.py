"""What every family promises, checked on every debug flavor of every registered family."""
from __future__ import annotations

import jsonschema
import numpy as np
import pytest
import torch

from raygen.exports import export_generator, load_exported
from raygen.models import Capability, CapabilityError, Conditions, build_model, has, require
from raygen.models.conditions import get_kind
from raygen.models.sampling import image_seeds, make_generators, parse_params
from raygen.spec import parse_spec
from raygen.images import to_uint8
from raygen.train.sampling import conditions_from_records

from .conftest import synthetic_batch


def _build(flavor):
    torch.manual_seed(0)
    return build_model(flavor.family.name, flavor.config, flavor.info, flavor.components)


def test_one_step_gives_a_finite_loss(flavor):
    fam, _, config, info = flavor
    model = _build(flavor)
    batch = synthetic_batch(info)
    if has(model, Capability.TRAIN):
        model.train()
        out = model.training_step(batch)
        assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
        out["loss"].backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), "the loss reaches no parameter"
    if has(model, Capability.FIT):
        stats = model.fit_statistics(batch)
        assert stats and all(torch.is_tensor(v) and torch.isfinite(v).all() for v in stats.values())
        metrics = model.apply_fit(stats, 1)
        assert all(np.isfinite(v) for v in metrics.values())


def test_export_load_round_trip_gives_equal_weights(flavor, tmp_path):
    fam, _, config, info = flavor
    model = _build(flavor)
    components = {}
    for name, component in flavor.components.items():  # a component is exported first, like an earlier run
        comp_spec = parse_spec({"model": {"family": component.family, "options": {}}})
        components[name] = str(export_generator(tmp_path / name, component.state_dict(), comp_spec,
                                                component.data_info))
    spec = parse_spec({"model": {"family": fam.name, "options": config.model_dump(mode="json"),
                                 "components": components}})
    export_generator(tmp_path / "model", model.state_dict(), spec, info, {"step": 0})
    loaded = load_exported(tmp_path / "model")
    assert loaded.data_info == info
    mine, theirs = model.state_dict(), loaded.model.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key


def _conditions(model, info, n):
    """Conditions drawn from (synthetic) records, as FID draws them from the validation split."""
    return conditions_from_records(model, synthetic_batch(info, n, seed=5), n)


def test_samples_have_the_right_shape_and_range(flavor):
    fam, _, config, info = flavor
    model = _build(flavor).eval()
    if not has(model, Capability.SAMPLE):
        pytest.skip(f"{fam.name} does not sample")
    images = model.sample(_conditions(model, info, 3), parse_params(model.sampling_params, {}),
                          make_generators(image_seeds(0, 3)))
    assert images.shape == (3, *info.shape) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and torch.isfinite(images).all()


def test_the_condition_kinds_example_samples(flavor):
    """What samples before any request (the serving memory probe) uses the kind's example value."""
    fam, _, config, info = flavor
    model = _build(flavor).eval()
    if not has(model, Capability.SAMPLE):
        pytest.skip(f"{fam.name} does not sample")
    example = get_kind(model.condition_kind).example(info)
    images = model.sample(Conditions.repeat(model.condition_kind, example, 2),
                          parse_params(model.sampling_params, {}), make_generators(image_seeds(0, 2)))
    assert images.shape == (2, *info.shape) and torch.isfinite(images).all()


def test_a_batch_equals_one_by_one_sampling(flavor):
    fam, _, config, info = flavor
    model = _build(flavor).eval()
    if not has(model, Capability.SAMPLE):
        pytest.skip(f"{fam.name} does not sample")
    params = parse_params(model.sampling_params, {})
    conditions = _conditions(model, info, 4)
    seeds = [11, 3, 7, 5]
    batch = model.sample(conditions, params, make_generators(seeds))
    alone = torch.cat([model.sample(conditions[i:i + 1], params, make_generators(seeds[i:i + 1])) for i in range(4)])
    # Some CPU kernels (oneDNN LSTM/GRU, conv1d) block their sums by batch size, so floats may differ in
    # the last bits; the 8-bit image, which is what every output path writes, must be identical.
    assert np.array_equal(to_uint8(batch), to_uint8(alone))
    assert torch.allclose(batch, alone, atol=1e-5)
    again = model.sample(conditions, params, make_generators(seeds))
    assert torch.equal(batch, again)  # same seeds, same batch: bit for bit


def test_request_schema_round_trips(flavor):
    fam, _, config, info = flavor
    model = _build(flavor)
    cls = model.sampling_params
    schema = cls.model_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    defaults = cls()
    dumped = defaults.model_dump(mode="json")
    jsonschema.validate(dumped, schema)
    assert parse_params(cls, dumped) == defaults  # JSON -> params -> JSON -> params
    assert hash(defaults.key()) == hash(parse_params(cls, dumped).key())
    kind = get_kind(model.condition_kind)
    if kind.field:
        jsonschema.Draft202012Validator.check_schema(kind.json_schema)
    # the config the spec carries round-trips too
    assert type(config).model_validate(config.model_dump(mode="json")) == config


def test_a_missing_capability_is_a_one_line_error(flavor):
    fam, _, config, info = flavor
    model = _build(flavor)
    missing = [c for c in Capability if c not in fam.capabilities]
    for cap in missing:
        with pytest.raises(CapabilityError) as err:
            require(model, cap)
        text = str(err.value)
        assert "\n" not in text and fam.name in text and cap.value in text
    for cap in fam.capabilities:
        require(model, cap)


def test_declared_capabilities_are_implemented(flavor):
    fam, _, config, info = flavor
    model = _build(flavor).eval()
    batch = synthetic_batch(info, 2)
    if has(model, Capability.ENCODE):
        latents = model.encode(batch["image"])
        assert model.decode(latents).shape == batch["image"].shape
    if has(model, Capability.RECONSTRUCT):
        out = model.reconstruct(batch["image"])
        assert out.shape == batch["image"].shape and out.min() >= 0 and out.max() <= 1
    if has(model, Capability.SCORE):
        texts = batch.get("caption") or ["an image"] * 2
        assert model.score(batch["image"], texts).shape == (2,)
    assert model.condition_kind in fam.conditions
    assert isinstance(Conditions.none(1), Conditions)
