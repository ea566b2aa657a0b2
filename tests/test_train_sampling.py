"""What the platform samples to judge a model: FID sets are conditioned on the
validation records they are compared with; grids cycle the classes; image i
of a set uses seed + i whatever the batch size."""
from __future__ import annotations

import torch

from raygen.models import DataInfo, build_model
from raygen.models.seqimg import SeqImgConfig
from raygen.train.sampling import conditions_from_records, cycling_conditions, sample_set
from raygen.train.wrapup import generate

INFO = DataInfo(channels=1, resolution=8, num_classes=3, class_names=["a", "b", "c"])


def _model(**options):
    torch.manual_seed(0)
    return build_model("seqimg", SeqImgConfig.debug(backbone="gpt2", **options), INFO).eval()


def test_fid_samples_take_the_conditions_of_the_validation_records():
    model = _model(conditioning="label")
    records = {"image": torch.rand(5, 1, 8, 8), "label": torch.tensor([2, 0, 1, 1, 2])}
    seen = []
    real_sample = model.sample
    model.sample = lambda conditions, params, generators: (seen.append(conditions), real_sample(conditions, params, generators))[1]
    images = generate(model, records, seed=4)
    assert images.shape == (5, 1, 8, 8)
    assert [v for c in seen for v in c.values] == [2, 0, 1, 1, 2]


def test_sets_do_not_depend_on_the_batch_size():
    model = _model(conditioning="label")
    conditions = conditions_from_records(model, {"image": torch.rand(6, 1, 8, 8), "label": torch.arange(6) % 3}, 6)
    assert torch.equal(sample_set(model, conditions, seed=1, batch=6), sample_set(model, conditions, seed=1, batch=4))


def test_grids_cycle_through_the_classes():
    assert cycling_conditions(_model(conditioning="label"), 5).values == (0, 1, 2, 0, 1)
    assert cycling_conditions(_model(), 2).values == (None, None)


def test_fid_samples_take_the_specs_sampling_parameters():
    """track.fid.sampling (e.g. a few-step sampler) reaches FID's samples: they are what
    `sample` draws with those parameters, and not the model's defaults."""
    from raygen.models import make_generators, parse_params
    from raygen.models.sampling import image_seeds

    model = _model(conditioning="label")
    records = {"image": torch.rand(4, 1, 8, 8), "label": torch.tensor([2, 0, 1, 1])}
    cold = generate(model, records, seed=3, params={"temperature": 0.1})
    conditions = conditions_from_records(model, records, 4)
    expected = model.sample(conditions, parse_params(model.sampling_params, {"temperature": 0.1}),
                            make_generators(image_seeds(3, 4), "cpu"))
    assert torch.equal(cold, expected)
    assert not torch.equal(cold, generate(model, records, seed=3))
