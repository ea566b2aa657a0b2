"""Every family's every debug flavor, as an MLflow Model: `mlflow.pyfunc`
predicts what the raygen model itself does (samples for the same seeds,
reconstructions, scores), multi-component models included."""
from __future__ import annotations

import io
import json

import mlflow.pyfunc
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from raygen.exports import export_generator
from raygen.images import png_bytes, to_uint8
from raygen.models import build_model, family_names, get_family
from raygen.spec import parse_spec
from raygen.tracking.pyfunc import save_pyfunc, task_for


def _flavors() -> list[tuple[str, str]]:
    # the pyfunc takes images as PNG bytes: flavors whose input is not an image (a SOM over
    # 2-channel latent maps) have no PNG form
    return [(name, flavor) for name in family_names() if get_family(name).debug is not None
            for flavor, (_, info, *_) in get_family(name).debug().items() if info.channels in (1, 3, 4)]


def _pngs(column) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in column])


def _hwc(images: torch.Tensor) -> np.ndarray:
    """What a PNG of each image decodes to: [n, H, W] for one channel, else [n, H, W, C]."""
    out = to_uint8(images)
    return out[..., 0] if out.shape[-1] == 1 else out


def _request_value(model, info, image_png: bytes):
    """A raw condition value of the model's kind, as a request gives it."""
    kind = model.condition_kind
    if kind == "label":
        return info.class_names[-1] if info.class_names else info.num_classes - 1
    if kind == "caption":
        return "a red circle"
    if kind == "scene":
        objects, glob = info.condition_columns["scene"], info.condition_columns.get("scene_globals", {})

        def value(col, f, default):  # inside the field's declared range (the request check refuses others)
            lo, hi = (col.get("ranges") or {}).get(f, (default, default))
            return (lo + hi) / 2
        # as JSON text: a nested object in a table cell would be spread over rows by pandas
        return json.dumps({"objects": [{f: value(objects, f, 0.5) for f in objects["fields"]}],
                           "globals": {f: value(glob, f, 0.25) for f in glob.get("fields", [])}})
    if kind == "image":
        return image_png
    return None


@pytest.mark.parametrize("family, flavor", _flavors(), ids=lambda v: str(v))
def test_pyfunc_does_what_the_raygen_model_does(family, flavor, tmp_path):
    config, info, *rest = get_family(family).debug()[flavor]
    components = rest[0] if rest else {}
    torch.manual_seed(0)
    model = build_model(family, config, info, components).eval()
    paths = {}
    for name, comp in components.items():  # an earlier run's export, copied into this model's
        comp_spec = parse_spec({"model": {"family": comp.family, "options": {}}})
        paths[name] = str(export_generator(tmp_path / name, comp.state_dict(), comp_spec, comp.data_info))
    spec = parse_spec({"model": {"family": family, "options": config.model_dump(mode="json"), "components": paths}})
    export = export_generator(tmp_path / "export", model.state_dict(), spec, info)
    folder = save_pyfunc(export, tmp_path / "mlflow-model")
    for name in components:  # one MLflow Model holds its components
        assert (folder / "artifacts" / "export" / "components" / name / "weights.safetensors").is_file()
    pyfunc = mlflow.pyfunc.load_model(str(folder))

    image = torch.rand(2, info.channels, info.height, info.width, generator=torch.Generator().manual_seed(1))
    pngs = [png_bytes(im) for im in to_uint8(image)]
    arr = torch.from_numpy(_pngs(pngs)).float() / 255
    pixels = arr[:, None] if arr.dim() == 3 else arr.permute(0, 3, 1, 2)  # what the model sees after PNG
    task = task_for(model)
    with torch.no_grad():
        if task == "sample":
            value = _request_value(model, info, pngs[0])
            field = {"none": None}.get(model.condition_kind, model.condition_kind)
            # one image: sampling is the slow part, and seed + i is checked in test_mlflow_models
            out = pyfunc.predict({"n": 1, "seed": 3, **({field: value} if field else {})})
            assert out["seed"].tolist() == [3]
            np.testing.assert_array_equal(_pngs(out["png"]), _hwc(model.generate(1, condition=value, seed=3)))
        elif task == "reconstruct":
            out = pyfunc.predict({"image": pngs})
            np.testing.assert_array_equal(_pngs(out["png"]), _hwc(model.reconstruct(pixels)))
        elif task == "score":
            texts = ["a red circle", "a blue square"]
            out = pyfunc.predict({"image": pngs, "text": texts})
            np.testing.assert_allclose(out["score"].to_numpy(), model.score(pixels, texts).numpy(),
                                       rtol=1e-5, atol=1e-6)
        else:
            with pytest.raises(MlflowException, match="has no pyfunc predict"):
                pyfunc.predict({"n": 1})
