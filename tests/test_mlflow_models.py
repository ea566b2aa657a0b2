"""raygen models are MLflow Models: pyfunc flavor from code (no pickles), a
signature, the raygen export inside, one LoggedModel linked to its run and
metrics, registered once, and loaded alike by MLflow and by raygen.

Checked through MLflow's own APIs (MlflowClient, mlflow.pyfunc,
mlflow.models.get_model_info); no Ray, no server."""
from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from PIL import Image

import pipeline_toys  # noqa: F401  (toy_ae / toy_refiner: a model with a frozen component)
from raygen.data.manifest import Manifest, SplitInfo
from raygen.exports import export_generator, load_exported, load_generator, locate_export
from raygen.images import png_bytes, to_uint8
from raygen.models import Capability, build_model, get_family
from raygen.spec import parse_spec
from raygen.tracking.lineage import log_dataset_inputs
from raygen.tracking.models import log_and_register, run_model_id, using_store
from raygen.tracking.pyfunc import save_pyfunc, task_for
from raygen.tracking.store import client, open_run


def _export(tmp_path: Path, family: str, flavor: str, components: dict | None = None) -> Path:
    config, info, *rest = get_family(family).debug()[flavor]
    torch.manual_seed(0)
    comps = components if components is not None else (rest[0] if rest else {})
    model = build_model(family, config, info, comps)
    paths = {}
    for name, comp in comps.items():  # a component is an earlier run's export
        comp_spec = parse_spec({"model": {"family": comp.family, "options": {}}})
        paths[name] = str(export_generator(tmp_path / f"component-{name}" / "export", comp.state_dict(), comp_spec,
                                           comp.data_info))
    spec = parse_spec({"name": "toy", "model": {"family": family, "options": config.model_dump(mode="json"),
                                                "components": paths}})
    return export_generator(tmp_path / family / "export", model.state_dict(), spec, info, {"step": 8})


def _pngs(column) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in column])


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A seqimg label model logged into a real run the way finish_run does it, and registered."""
    tmp = tmp_path_factory.mktemp("mlflow-models")
    export = _export(tmp, "seqimg", "lstm-label")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    run = open_run(uri, "toy", "toy-run", spec=load_exported(export).spec)
    splits = {"train": SplitInfo(rows=30, shards=[]), "val": SplitInfo(rows=6, shards=[])}
    log_dataset_inputs(run, tmp / "toy-data", Manifest(name="toy", height=8, width=8, channels=1, splits=splits,
                                                       num_classes=3))
    run.log_metrics({"loss": 1.5, "val_loss": 1.25}, step=6)  # last evaluated before the final step
    run.log_metrics({"loss": 1.0, "fid": 40.0, "kid": 0.02}, step=8)
    run.log_metrics({"system/cpu_utilization_percentage": 50.0}, step=8)  # the 9th sample, not training step 8
    model_uri = log_and_register(uri, run.run_id, export, "toy", step=8, tags={"raygen.checkpoint": "step-00000008"})
    run.finish()
    return {"uri": uri, "run_id": run.run_id, "experiment_id": run.experiment_id, "model_uri": model_uri,
            "export": export}


def test_pyfunc_predict_equals_raygen_sampling(logged):
    assert logged["model_uri"] == "models:/toy/1"
    with using_store(logged["uri"]):
        pyfunc = mlflow.pyfunc.load_model(logged["model_uri"])
    own = load_exported(logged["export"]).model
    out = pyfunc.predict({"n": 4, "label": 1, "seed": 0})
    assert list(out.columns) == ["request", "index", "seed", "png"]
    assert out["seed"].tolist() == [0, 1, 2, 3] and out["request"].tolist() == [0] * 4
    expected = to_uint8(own.generate(4, condition=1, seed=0))  # [n, H, W, 1]
    np.testing.assert_array_equal(_pngs(out["png"]), expected[..., 0])
    # several requests in one call, a class name, and a sampling parameter given as an MLflow param
    out = pyfunc.predict([{"n": 2, "label": "square", "seed": 7}, {"n": 1, "label": 0, "seed": 3}],
                         params={"temperature": 0.5})
    assert out["request"].tolist() == [0, 0, 1] and out["seed"].tolist() == [7, 8, 3]
    np.testing.assert_array_equal(_pngs(out["png"][:2]),
                                  to_uint8(own.generate(2, condition="square", seed=7, temperature=0.5))[..., 0])
    np.testing.assert_array_equal(_pngs(out["png"][2:]),
                                  to_uint8(own.generate(1, condition=0, seed=3, temperature=0.5))[..., 0])


def test_signature_and_flavor_are_what_mlflow_reads(logged):
    with using_store(logged["uri"]):
        info = mlflow.models.get_model_info(logged["model_uri"])
    sig = info.signature
    assert sig.inputs.input_names() == ["n", "seed", "label"]
    assert not any(spec.required for spec in sig.inputs.inputs)  # each has a default
    assert sig.outputs.input_names() == ["request", "index", "seed", "png"]
    assert {p.name: p.default for p in sig.params.params} == {"temperature": 1.0, "top_k": 0, "use_cache": True}
    pyfunc = info.flavors["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # models-from-code, not a pickle
    assert Path(pyfunc["model_code_path"]).name == "pyfunc_model.py"
    assert pyfunc["config"] == {"raygen.task": "sample"}


def test_the_model_folder_holds_the_export_and_no_pickles(logged):
    folder = locate_export(logged["model_uri"], logged["uri"])  # what raygen serve/sample/eval load
    root = folder.parents[1]
    assert (root / "MLmodel").is_file() and folder == root / "artifacts" / "export"
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert {"MLmodel", "pyfunc_model.py", "artifacts/export/raygen-model.json",
            "artifacts/export/weights.safetensors", "artifacts/export/spec.yaml"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt"))], files
    # raygen loads the same registered model: equal weights, its own meta
    loaded = load_generator(logged["model_uri"], logged["uri"])
    assert loaded.source == "models:/toy/1" and loaded.meta["step"] == 8
    own = load_exported(logged["export"]).model.state_dict()
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in own.items())


def test_one_logged_model_linked_to_its_run_metrics_and_version(logged):
    c = client(logged["uri"])
    models = c.search_logged_models(experiment_ids=[logged["experiment_id"]])
    assert len(models) == 1
    model = models[0]
    assert model.name == "model" and model.source_run_id == logged["run_id"] and model.status == LoggedModelStatus.READY
    assert model.tags["raygen.family"] == "seqimg" and model.tags["raygen.checkpoint"] == "step-00000008"
    assert model.params["model.family"] == "seqimg"  # the run's flattened spec, for the UI's model comparison
    metrics = {m.key: (m.value, m.step) for m in model.metrics}
    assert metrics["fid"] == (40.0, 8) and metrics["kid"] == (0.02, 8) and metrics["loss"] == (1.0, 8)
    assert metrics["val_loss"] == (1.25, 6)  # the latest eval, though logged before the final step
    assert set(metrics) == {"loss", "val_loss", "fid", "kid"}  # no system metric
    datasets = {m.key: m.dataset_name for m in model.metrics}  # eval metrics name the validation split
    assert datasets == {"loss": None, "val_loss": "toy/val", "fid": "toy/val", "kid": "toy/val"}
    run = c.get_run(logged["run_id"])
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model.model_id, 8)]
    assert [m.step for m in c.get_metric_history(logged["run_id"], "val_loss")] == [6]  # linking adds no point
    # one artifact: the run holds no second copy, and the version points at the LoggedModel
    assert "model" not in {a.path for a in c.list_artifacts(logged["run_id"])}
    assert c.get_model_version("toy", "1").source == f"models:/{model.model_id}"
    assert [(v["name"], str(v["version"])) for v in json.loads(model.tags["mlflow.modelVersions"])] == [("toy", "1")]
    assert run_model_id(logged["uri"], logged["run_id"]) == model.model_id


def test_bad_requests_name_the_field(logged):
    with using_store(logged["uri"]):
        pyfunc = mlflow.pyfunc.load_model(logged["model_uri"])
    cases = [({"n": 2, "label": 3}, "label 3 is out of range"), ({"n": 0}, "row 0.n must be 1..256"),
             ({"n": 1, "label": "dog"}, "unknown label 'dog'")]
    for request, words in cases:
        with pytest.raises(MlflowException, match=words):
            pyfunc.predict(request)
    with pytest.raises(MlflowException, match="temperature"):
        pyfunc.predict({"n": 1}, params={"temperature": 50.0})


def test_models_that_do_not_sample_get_what_they_can(tmp_path):
    # a codebook reconstructs, a clip scores, and a model with frozen components is one MLflow Model
    image = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    pngs = [png_bytes(im) for im in to_uint8(image)]
    pixels = torch.from_numpy(_pngs(pngs)).float()[:, None] / 255  # what the model sees after PNG

    refiner = _export(tmp_path, "toy_refiner", "tiny")
    assert (refiner / "components" / "base" / "weights.safetensors").is_file()
    model_dir = save_pyfunc(refiner, tmp_path / "refiner-mlflow")
    assert (model_dir / "artifacts" / "export" / "components" / "base" / "raygen-model.json").is_file()
    out = mlflow.pyfunc.load_model(str(model_dir)).predict({"image": pngs})
    with torch.no_grad():
        expected = to_uint8(load_exported(refiner).model.reconstruct(pixels))
    np.testing.assert_array_equal(_pngs(out["png"]), expected[..., 0])
    assert locate_export(str(model_dir)) == model_dir / "artifacts" / "export"  # raygen reads the folder too

    clip = _export(tmp_path, "clip", "tiny")
    out = mlflow.pyfunc.load_model(str(save_pyfunc(clip, tmp_path / "clip-mlflow"))).predict(
        {"image": pngs, "text": ["red circle", "blue square"]})
    with torch.no_grad():
        expected = load_exported(clip).model.score(pixels, ["red circle", "blue square"])
    np.testing.assert_allclose(out["score"].to_numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_a_model_that_can_do_none_of_it_says_so(tmp_path):
    from raygen.tracking.pyfunc import RaygenPyfunc, signature_for
    model = build_model("toy_ae", *get_family("toy_ae").debug()["tiny"])
    assert task_for(model) == "reconstruct"
    model.capabilities = frozenset({Capability.TRAIN, Capability.ENCODE})  # as a family that only encodes
    assert task_for(model) == "none" and signature_for(model).inputs.input_names() == ["n"]
    pyfunc = RaygenPyfunc()
    pyfunc.model, pyfunc.task = model, "none"
    with pytest.raises(MlflowException, match="family 'toy_ae' has no pyfunc predict: it can encode and decode "
                                              "images, train by gradient descent"):
        pyfunc.predict(None, {"n": 1})


def test_a_model_logged_before_mlflow_models_still_registers_and_loads(logged, tmp_path):
    # a run whose `model` is a plain run artifact holding the export (raygen before MLflow Models)
    from raygen.tracking.models import register
    run = open_run(logged["uri"], "legacy", "legacy-run")
    client(logged["uri"]).log_artifacts(run.run_id, str(logged["export"]), "model")
    assert run_model_id(logged["uri"], run.run_id) is None
    assert register(logged["uri"], run.run_id, "legacy") == "models:/legacy/1"
    assert client(logged["uri"]).get_model_version("legacy", "1").source == f"runs:/{run.run_id}/model"
    for uri in ("models:/legacy/1", f"runs:/{run.run_id}/model"):
        loaded = load_generator(uri, logged["uri"])
        assert loaded.meta["step"] == 8 and loaded.spec.model.family == "seqimg"
