"""Serving rules that need no Ray: request validation from each model's own types,
batched sampling, the HTTP app with stand-in deployment handles, its OpenAPI
schema, replica sizing, PNG encoding, app args, the example Serve config and
the CLI's flags."""
from __future__ import annotations

import asyncio
import io
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import test_serving_family as toy
from raygen.images import grid, png_bytes, to_uint8
from raygen.models import DataInfo, build_model
from raygen.serving.app import AppArgs, ResourceError, _scorer_available, resolve_serve_spec, size_replicas
from raygen.serving.deployments import BatchSampler
from raygen.serving.loading import model_card, parse_model_arg
from raygen.serving.requests import RequestError, SampleJob, ServedModel, resolve
from raygen.serving.schema import MAX_SEED
from raygen.spec import ServeSpec, SpecError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "Bird"]


def _loaded(family: str, config: dict, info: DataInfo, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(family, config, info).eval()
    return SimpleNamespace(model=model, data_info=info, meta={"run_id": f"run-{family}"}, source="memory")


def _seqimg_loaded():
    from raygen.models.seqimg import SeqImgConfig
    info = DataInfo(channels=1, resolution=8, num_classes=3, class_names=["a", "b", "c"])
    return _loaded("seqimg", SeqImgConfig.debug(backbone="gpt2", conditioning="label").model_dump(), info)


LOADED = {
    "cls": _loaded(toy.FAMILY, {"conditioning": "label"}, DataInfo(channels=1, resolution=8, num_classes=3,
                                                                   class_names=CLASSES)),
    "plain": _loaded(toy.FAMILY, {}, DataInfo(channels=1, resolution=8)),
    "text": _loaded(toy.FAMILY, {"conditioning": "caption"}, DataInfo(channels=3, resolution=8, has_captions=True)),
    "seq": _seqimg_loaded(),
}
CARDS = {name: model_card(loaded, name=name) for name, loaded in LOADED.items()}
MODELS = {name: ServedModel.from_card(card) for name, card in CARDS.items()}


def plan(body, reranking: str = "ready", max_n: int = 8):
    return resolve(body, MODELS, default_model="cls", max_n=max_n, reranking=reranking, rng_seed=123)


def rejected(body, reranking: str = "ready") -> RequestError:
    with pytest.raises(RequestError) as info:
        plan(body, reranking)
    return info.value


# ---------------------------------------------------------------- requests from the family's types
def test_defaults_and_params():
    p = plan({"temperature": 1, "style": "inverted"})
    assert (p.model, p.job.n, p.keep, p.job.seed, p.job.condition, p.format) == ("cls", 1, 1, 123, None, "base64")
    assert p.job.params == {"temperature": 1.0, "style": "inverted", "reject": False, "explode": False,
                            "delay_s": 0.0}
    assert isinstance(p.job.params["temperature"], float) and p.job.kind == "label"
    seq = plan({"model": "seq", "top_k": 4, "label": "B"})
    assert seq.job.params == {"temperature": 1.0, "top_k": 4, "use_cache": True} and seq.job.condition == 1
    # JSON Schema's integers: 2.0 is 2 (what the OpenAPI document promises), 2.5 is not
    whole = plan({"model": "seq", "n": 2.0, "seed": 7.0, "top_k": 3.0, "label": 2.0})
    assert (whole.job.n, whole.job.seed, whole.job.params["top_k"], whole.job.condition) == (2, 7, 3, 2)
    assert isinstance(whole.job.params["top_k"], int) and isinstance(whole.job.n, int)


def test_label_by_index_or_name():
    assert plan({"label": 1}).job.condition == 1
    assert plan({"label": "dog"}).job.condition == 1
    assert plan({"label": "bird"}).job.condition == 2  # names match without regard to case
    assert plan({"label": "DOG"}).job.condition == 1


def test_prompt_is_the_caption_of_a_text_model():
    assert plan({"model": "text", "prompt": "a red circle"}).job.condition == "a red circle"
    assert plan({"model": "text", "caption": "x", "prompt": "y"}).job.condition == "x"
    assert plan({"model": "text"}).job.condition is None


@pytest.mark.parametrize("body, field, status", [
    ([1, 2], "body", 422),
    ("text", "body", 422),
    ({"n": 0}, "n", 422),
    ({"n": 9}, "n", 422),
    ({"n": "2"}, "n", 422),
    ({"n": 2.5}, "n", 422),
    ({"n": True}, "n", 422),
    ({"seed": -1}, "seed", 422),
    ({"seed": MAX_SEED, "n": 2}, "seed", 422),  # image 1 would need seed MAX_SEED + 1
    ({"format": "gif"}, "format", 422),
    ({"model": "nope"}, "model", 404),
    ({"label": 3}, "label", 422),
    ({"label": -1}, "label", 422),
    ({"label": 1.5}, "label", 422),
    ({"label": True}, "label", 422),
    ({"label": "horse"}, "label", 422),
    ({"model": "plain", "label": 0}, "label", 422),
    ({"model": "text", "label": 0}, "label", 422),
    ({"caption": "a cat"}, "caption", 422),
    ({"scene": {"objects": [{"x": 1}]}}, "scene", 422),
    ({"image": "aGVsbG8="}, "image", 422),
    ({"model": "text", "caption": ""}, "caption", 422),
    ({"model": "plain", "prompt": "a cat"}, "prompt", 422),
    ({"temperature": "hot"}, "temperature", 422),
    ({"temperature": 0}, "temperature", 422),        # the family says > 0
    ({"temperature": 10.5}, "temperature", 422),     # ... and <= 10
    ({"style": "bold"}, "style", 422),
    ({"reject": 1}, "reject", 422),                  # strict: 1 is not a bool
    ({"delay_s": "1"}, "delay_s", 422),
    ({"top_k": 3}, "top_k", 422),                    # a parameter of another family
    ({"steps": 4}, "steps", 422),
    ({"model": "seq", "top_k": 1.5}, "top_k", 422),
    ({"model": "seq", "top_k": 257}, "top_k", 422),
    ({"model": "seq", "top_k": True}, "top_k", 422),
    ({"model": "seq", "use_cache": 1}, "use_cache", 422),
    ({"model": "seq", "style": "plain"}, "style", 422),
    ({"k": 2}, "k", 422),
    ({"best_of": 9, "prompt": "x"}, "best_of", 422),
    ({"best_of": 2, "k": 3, "prompt": "x"}, "k", 422),
    ({"best_of": 4, "n": 2, "k": 3, "prompt": "x"}, "k", 422),
    ({"model": "plain", "best_of": 4}, "prompt", 422),
])
def test_rejections_name_the_field(body, field, status):
    err = rejected(body)
    assert (err.field, err.status) == (field, status), err.message
    assert "\n" not in err.message and err.message


def test_rejections_say_what_is_accepted():
    assert "0..2" in rejected({"label": 3}).message
    assert "'dog'" in rejected({"label": "horse"}).message
    assert "temperature, style" in rejected({"steps": 4}).message
    assert "takes no sampling parameters" not in rejected({"model": "seq", "style": "x"}).message
    assert "use 'caption'" in rejected({"model": "text", "label": 0}).message
    assert "unconditional" in rejected({"model": "plain", "label": 0}).message
    assert "greater than 0" in rejected({"temperature": 0}).message


def test_best_of_needs_a_working_scorer():
    assert (rejected({"best_of": 4, "prompt": "x"}, "off").status, rejected({"best_of": 4}, "off").field) == \
        (400, "best_of")
    assert rejected({"best_of": 4, "prompt": "x"}, "unavailable").status == 501


def test_best_of_plan():
    p = plan({"best_of": 6, "k": 2, "prompt": "a cat", "seed": 4})
    assert (p.job.n, p.keep, p.rerank_text, p.job.seed) == (6, 2, "a cat", 4)
    # a class name is the text to score against when no prompt is given
    assert plan({"best_of": 3, "label": "dog"}).rerank_text == "dog"
    # on a model without captions the prompt is only the reranking text, never a condition
    p = plan({"model": "plain", "best_of": 3, "n": 2, "prompt": "bright"})
    assert (p.job.condition, p.keep, p.rerank_text) == (None, 2, "bright")


# ---------------------------------------------------------------- model cards
def test_model_card_describes_the_model():
    card = CARDS["seq"]
    assert (card["family"], card["capabilities"], card["run_id"]) == ("seqimg", ["sample", "train"], "run-seqimg")
    assert card["condition"]["kind"] == "label" and card["condition"]["field"] == "label"
    assert card["condition"]["schema"]["anyOf"][0] == {"type": "integer", "minimum": 0, "maximum": 2}
    assert card["params"]["properties"]["top_k"]["maximum"] == 256
    assert (card["data"]["channels"], card["data"]["height"], card["data"]["width"],
            card["data"]["num_classes"]) == (1, 8, 8, 3)
    assert CARDS["plain"]["condition"] == {"kind": "none", "field": None, "description": "unconditional",
                                           "schema": None}
    assert CARDS["cls"]["params"]["properties"]["style"]["$ref"] == "#/$defs/Style"


def test_a_model_that_cannot_sample_is_refused(tmp_path):
    from raygen.exports import export_generator
    from raygen.models import CapabilityError, get_family
    from raygen.serving.app import load_plan
    from raygen.spec import parse_spec

    config, info = next(iter(get_family("clip").debug().values()))
    model = build_model("clip", config, info)
    spec = parse_spec({"name": "scorer", "model": {"family": "clip", "options": config.model_dump(mode="json")}})
    path = export_generator(tmp_path / "clip", model.state_dict(), spec, info)
    with pytest.raises(CapabilityError) as err:
        load_plan(AppArgs(model=str(path)))
    text = str(err.value)
    assert "\n" not in text and "'scorer'" in text and "cannot sample images" in text and "seqimg" in text


# ---------------------------------------------------------------- batched, deterministic sampling
def _job(seed, n=1, condition=None, kind="label", **params):
    defaults = {"temperature": 1.0, "style": "plain", "reject": False, "explode": False, "delay_s": 0.0}
    return SampleJob(n=n, seed=seed, kind=kind, condition=condition, params={**defaults, **params})


def test_equal_params_share_one_forward_call():
    sampler = BatchSampler(LOADED["cls"].model, name="cls")
    jobs = [_job(0, 2, 1), _job(5, 1, None), _job(9, 3, 2, temperature=0.5), _job(7, 2, 0)]
    merged = sampler.run(jobs)
    assert sampler.forward_calls == 2  # three jobs at temperature 1 in one call, the other alone
    assert [r["batch_images"] for r in merged] == [5, 5, 3, 5]
    assert [r["seeds"] for r in merged] == [[0, 1], [5], [9, 10, 11], [7, 8]]
    alone = [BatchSampler(LOADED["cls"].model, name="cls").run([job])[0] for job in jobs]
    for m, a in zip(merged, alone):
        assert np.array_equal(m["images"], a["images"])  # a request's images do not depend on its neighbours
    off = BatchSampler(LOADED["cls"].model, name="cls", merge=False)
    assert all(np.array_equal(r["images"], a["images"]) for r, a in zip(off.run(jobs), alone))
    assert off.forward_calls == 4


def test_merged_seqimg_requests_match_their_lone_runs():
    model = LOADED["seq"].model
    params = {"temperature": 1.0, "top_k": 0, "use_cache": True}
    jobs = [SampleJob(n=2, seed=3, kind="label", condition=0, params=params),
            SampleJob(n=1, seed=4, kind="label", condition=None, params=params),
            SampleJob(n=2, seed=40, kind="label", condition=2, params=params)]
    sampler = BatchSampler(model, name="seq")
    merged = sampler.run(jobs)
    assert sampler.forward_calls == 1
    for job, result in zip(jobs, merged):
        assert np.array_equal(result["images"], BatchSampler(model, name="seq").run([job])[0]["images"])
    # image i of seed s is the lone image of seed s + i
    lone = BatchSampler(model, name="seq").run([SampleJob(n=1, seed=41, kind="label", condition=2, params=params)])
    assert np.array_equal(merged[2]["images"][1], lone[0]["images"][0])


def test_a_failing_request_does_not_fail_its_batch_neighbours(monkeypatch):
    model = build_model(toy.FAMILY, {"conditioning": "caption"},
                        DataInfo(channels=3, resolution=8, has_captions=True)).eval()
    original = model.sample

    def picky(conditions, params, generators):
        if "forbidden" in conditions.values:
            raise ValueError("this caption is forbidden")
        return original(conditions, params, generators)

    monkeypatch.setattr(model, "sample", picky)
    jobs = [_job(0, 1, "ok", kind="caption"), _job(1, 2, "forbidden", kind="caption"),
            _job(2, 1, "fine", kind="caption"), _job(3, 1, "x", kind="caption", explode=True)]
    results = BatchSampler(model, name="text").run(jobs)
    assert (results[1]["status"], results[3]["status"]) == (422, 500)
    assert "forbidden" in results[1]["error"] and "boom" in results[3]["error"]
    assert results[0]["images"].shape == (1, 8, 8, 3) and results[2]["images"].shape == (1, 8, 8, 3)


def test_a_batch_takes_what_queued_while_the_previous_one_ran():
    import threading

    from raygen.serving.deployments import ContinuousBatcher

    gate, batches = threading.Event(), []

    def run(items):
        batches.append(list(items))
        if len(batches) == 1:
            gate.wait(30)  # the first batch holds the worker until everything else has queued
        return [f"done {i}" for i in items]

    async def scenario():
        batcher = ContinuousBatcher(run, max_batch_size=4, batch_wait_timeout_s=0.0)
        first = asyncio.ensure_future(batcher.submit(0))
        while not batches:  # the worker found no company: a batch of one
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 7)]
        cancelled = asyncio.ensure_future(batcher.submit("gone"))
        await asyncio.sleep(0)
        cancelled.cancel()  # a caller that gave up while queued is never sampled
        gate.set()
        return await asyncio.gather(first, *rest)

    results = asyncio.run(scenario())
    assert results == [f"done {i}" for i in range(7)]
    assert batches == [[0], [1, 2, 3, 4], [5, 6]]  # at most max_batch_size, in arrival order

    def broken(items):
        raise RuntimeError("the whole batch failed")

    async def failing():
        batcher = ContinuousBatcher(broken, max_batch_size=4, batch_wait_timeout_s=0.0)
        with pytest.raises(RuntimeError, match="whole batch"):
            await batcher.submit(1)
        with pytest.raises(RuntimeError, match="whole batch"):  # and the worker goes on serving
            await batcher.submit(2)

    asyncio.run(failing())


# ---------------------------------------------------------------- the HTTP app, without Ray
class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __await__(self):
        async def run():
            return self.fn(*self.args)
        return run().__await__()

    def cancel(self):
        pass


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return _Call(self.fn, *args)


def local(name, max_in_flight=64):
    """The model in process, as a one-model app's replica holds it (`LocalGenerator`)."""
    from raygen.serving.deployments import ContinuousBatcher, LocalGenerator

    batcher = ContinuousBatcher(BatchSampler(LOADED[name].model, name=name).run, max_batch_size=4,
                                batch_wait_timeout_s=0.0)
    slot = SimpleNamespace(info={**CARDS[name], "device": "cpu", "replicas": 1})  # a ModelSlot's info
    return LocalGenerator(batcher, slot, max_in_flight=max_in_flight)


class StandInScorer:
    def __init__(self):
        self.rerank = _Method(self._rerank)

    @staticmethod
    def _rerank(text, images, k):
        brightness = images.reshape(len(images), -1).mean(1)
        order = list(np.argsort(-brightness)[:k])
        return {"order": order, "scores": [float(brightness[i]) for i in order]}


@pytest.fixture(scope="module")
def api():
    from fastapi.testclient import TestClient

    from raygen.serving.ingress import Frontend, make_api

    front = Frontend({name: local(name) for name in CARDS}, StandInScorer(), cards=list(CARDS.values()),
                     default_model="cls", max_n=8, request_timeout_s=30, reranking="ready")
    with TestClient(make_api(front)) as client:
        yield client


def test_http_generate_returns_a_seed_per_image(api):
    r = api.post("/v1/generate", json={"n": 3, "label": "dog", "seed": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["seed"], body["run_id"]) == ("cls", 5, f"run-{toy.FAMILY}")
    assert [i["seed"] for i in body["images"]] == [5, 6, 7] and all(i["score"] is None for i in body["images"])
    again = api.post("/v1/generate", json={"n": 1, "label": 1, "seed": 7}).json()["images"][0]
    assert again["png_base64"] == body["images"][2]["png_base64"]  # image i redrawn alone with seed s + i
    ranked = api.post("/v1/generate", json={"best_of": 4, "k": 2, "prompt": "bright", "seed": 0}).json()["images"]
    assert len(ranked) == 2 and {i["seed"] for i in ranked} <= {0, 1, 2, 3}
    cands = api.post("/v1/generate", json={"n": 4, "seed": 0}).json()["images"]
    for kept in ranked:
        assert kept["png_base64"] == cands[kept["seed"]]["png_base64"]
    png = api.post("/v1/generate", json={"n": 2, "seed": 3, "format": "png"})
    assert png.headers["content-type"] == "image/png" and png.headers["x-raygen-seeds"] == "3,4"


@pytest.mark.parametrize("content, field, status", [
    ("{not json", "body", 422),
    ("[1, 2]", "body", 422),
    ('{"temperature": 11}', "temperature", 422),
    ('{"model": "seq", "top_k": -1}', "top_k", 422),
    ('{"model": "nope"}', "model", 404),
    ('{"reject": true}', None, 422),     # the model itself refuses: its reason, no single field
    ('{"explode": true}', None, 500),
])
def test_http_errors_are_json(api, content, field, status):
    r = api.post("/v1/generate", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status and r.json()["field"] == field and "Traceback" not in r.text, r.text


def test_models_route_lists_the_cards(api):
    body = api.get("/v1/models").json()
    assert (body["default_model"], body["max_n"], body["reranking"]) == ("cls", 8, "ready")
    seq = {m["name"]: m for m in body["models"]}["seq"]
    assert seq["params"] == CARDS["seq"]["params"] and seq["condition"]["schema"] == CARDS["seq"]["condition"]["schema"]
    assert (seq["device"], seq["family"], seq["parameters"]) == ("cpu", "seqimg", CARDS["seq"]["parameters"])


def test_a_full_queue_is_a_json_503():
    from fastapi.testclient import TestClient

    from raygen.serving.ingress import Frontend, make_api

    front = Frontend({"plain": local("plain", max_in_flight=0)}, None, cards=[CARDS["plain"]],
                     default_model="plain", max_n=8, request_timeout_s=30, reranking="off")
    with TestClient(make_api(front)) as client:
        r = client.post("/v1/generate", json={"seed": 1})
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "max_queued_requests" in r.json()["error"]


def _request_schema(api) -> dict:
    doc = api.get("/openapi.json").json()
    body = doc["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return {**body, "components": doc["components"]}  # refs resolve against this root


def test_openapi_documents_every_models_params(api):
    schema = _request_schema(api)
    jsonschema.Draft202012Validator.check_schema(schema)
    comps = schema["components"]["schemas"]
    seq = comps["GenerateRequest.seq"]["properties"]
    assert (seq["top_k"]["type"], seq["top_k"]["minimum"], seq["top_k"]["maximum"]) == ("integer", 0, 256)
    assert seq["use_cache"]["type"] == "boolean" and (seq["n"]["type"], seq["n"]["maximum"]) == ("integer", 8)
    cls = comps["GenerateRequest.cls"]
    assert cls["properties"]["temperature"]["exclusiveMinimum"] == 0
    assert cls["properties"]["style"]["$ref"] == f"#/components/schemas/{toy.FAMILY}.Style"
    assert comps[f"{toy.FAMILY}.Style"]["enum"] == ["plain", "inverted"]
    assert cls["properties"]["label"]["anyOf"][1]["enum"] == CLASSES
    assert "required" not in cls and comps["GenerateRequest.seq"]["required"] == ["model"]
    assert "caption" in comps["GenerateRequest.text"]["properties"] and "label" not in comps["GenerateRequest.text"][
        "properties"]

    valid = [{}, {"n": 2, "label": "dog", "temperature": 0.5, "style": "inverted"}, {"model": "seq", "top_k": 5},
             {"model": "text", "caption": "a cat"}, {"model": "plain", "best_of": 2, "prompt": "x"},
             {"model": "seq", "n": 2.0, "top_k": 3.0}, {"model": "text", "best_of": 2, "caption": "x"},
             {"best_of": 3, "label": 1}, {"seed": MAX_SEED - 7, "n": 8}]
    invalid = [{"temperature": 0}, {"model": "seq", "top_k": 300}, {"model": "seq", "style": "plain"},
               {"colour": 1}, {"n": 9}, {"n": 2.5}, {"label": 5}, {"model": "plain", "label": 1}, {"k": 2},
               {"model": "plain", "prompt": "x"}, {"model": "text", "best_of": 2}, {"best_of": 2}]
    for body in valid:
        jsonschema.validate(body, schema)
        assert api.post("/v1/generate", json=body).status_code == 200, body
    for body in invalid:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(body, schema)
        assert api.post("/v1/generate", json=body).status_code == 422, body


def test_reranking_fields_are_documented_only_when_ready():
    from raygen.serving.schema import request_schemas

    _, comps = request_schemas(list(CARDS.values()), default_model="cls", max_n=4, reranking="off")
    assert not {"best_of", "k", "prompt"} & set(comps["GenerateRequest.cls"]["properties"])
    assert "prompt" in comps["GenerateRequest.text"]["properties"]


def test_playground_builds_its_form_from_the_schemas(api):
    page = api.get("/").text
    assert "raygen playground" in page and "/v1/models" in page and "/v1/generate" in page
    # no family's parameter is written into the page: the form comes from each model's JSON schema
    for name in ("temperature", "top_k", "use_cache", "inverted", "delay_s"):
        assert name not in page, name
    for handled in ('"enum"', '"boolean"', '"integer"', '"number"', "maximum", "minimum", "$ref"):
        assert handled in page, handled


# ---------------------------------------------------------------- replicas sized to the machine
def test_two_models_on_two_cores_get_shares_that_fit():
    sizing = size_replicas(AppArgs(models=["a", "b"]), generator_replicas=2, scorer=False, total_cpus=2,
                           free_cpus=2)
    assert sizing.replica_cpus == 0.95 and sizing.needed_cpus <= 2
    with_scorer = size_replicas(AppArgs(models=["a", "b"], scorer="s"), generator_replicas=2, scorer=True,
                                total_cpus=2, free_cpus=2)
    assert (with_scorer.replica_cpus, with_scorer.scorer_cpus) == (0.63, 0.63) and with_scorer.needed_cpus <= 2
    roomy = size_replicas(AppArgs(models=["a", "b"]), generator_replicas=2, scorer=False, total_cpus=16,
                          free_cpus=16)
    assert roomy.replica_cpus == 1.0


def test_replicas_that_cannot_fit_fail_at_once_naming_the_cpus():
    with pytest.raises(ResourceError) as err:
        size_replicas(AppArgs(models=["a", "b"], replica_cpus=1), generator_replicas=2, scorer=False, total_cpus=2,
                      free_cpus=2, where="this machine")
    text = str(err.value)
    assert "needs 2.1 CPUs" in text and "this machine has 2 CPUs (2 free)" in text and "\n" not in text
    with pytest.raises(ResourceError, match="less than 0.05 CPU each"):
        size_replicas(AppArgs(models=["a"]), generator_replicas=40, scorer=False, total_cpus=2, free_cpus=2)
    with pytest.raises(ResourceError, match="needs 1 GPUs"):
        size_replicas(AppArgs(models=["a"], replica_gpus=1), generator_replicas=1, scorer=False, total_cpus=8,
                      free_cpus=8, total_gpus=0)
    # CPUs held by other work now: the replicas wait for them, with a note rather than an error
    busy = size_replicas(AppArgs(models=["a"], replica_cpus=1), generator_replicas=1, scorer=False, total_cpus=2,
                         free_cpus=0.5)
    assert busy.note and "0.5 of 2 are free" in busy.note
    unchecked = size_replicas(AppArgs(models=["a", "b"], replica_cpus=1, check_resources=False),
                              generator_replicas=2, scorer=False, total_cpus=2, free_cpus=2)
    assert unchecked.replica_cpus == 1


def test_plan_app_sizes_the_bound_replicas(tmp_path):
    from raygen.serving.app import plan_app

    a = toy.export_toy(tmp_path / "a", name="a", resolution=8, channels=1)
    b = toy.export_toy(tmp_path / "b", name="b", resolution=8, channels=1)
    _, plan = plan_app(AppArgs(models=[str(a), str(b)], imports=[toy.FILE]), resources=(2.0, 2.0, 0.0, "test"))
    assert [m.name for m in plan.models] == ["a", "b"] and plan.sizing.replica_cpus == 0.95
    assert plan.models[0].card["family"] == toy.FAMILY
    with pytest.raises(ResourceError):
        plan_app(AppArgs(models=[str(a), str(b)], imports=[toy.FILE], replica_cpus=1),
                 resources=(2.0, 2.0, 0.0, "test"))


def test_build_app_exits_with_one_line_for_a_bad_model(tmp_path):
    from raygen.serving.app import build_app

    with pytest.raises(SystemExit) as err:
        build_app({"model": str(tmp_path / "missing")})
    text = str(err.value.code)
    assert text.startswith("raygen.serving: error: model not found") and "\n" not in text


# ---------------------------------------------------------------- images, args, config, CLI
def test_png_and_grid():
    images = np.random.default_rng(0).random((5, 3, 8, 8)).astype(np.float32)
    u8 = to_uint8(images)
    assert u8.shape == (5, 8, 8, 3) and u8.dtype == np.uint8
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(u8[0]))))
    assert np.array_equal(decoded, u8[0])
    g = grid(u8, pad=2)
    assert g.shape == (2 * 8 + 3 * 2, 3 * 8 + 4 * 2, 3)  # 5 images: 3 columns, 2 rows
    gray = Image.open(io.BytesIO(png_bytes(to_uint8(images[:1, :1])[0])))
    assert gray.mode == "L" and gray.size == (8, 8)
    assert to_uint8(np.full((1, 1, 2, 2), np.nan))[0].max() == 0  # NaN is black, not noise


def test_model_args():
    assert parse_model_arg("best=runs/a/model") == ("best", "runs/a/model")
    assert parse_model_arg("models:/toy/3") == (None, "models:/toy/3")
    assert parse_model_arg("/data/x=y/model") == (None, "/data/x=y/model")


def test_app_args_from_the_serve_run_command_line():
    # `serve run raygen.serving.app:build_app model=a imports=x.py,y serve=max_n=4,replicas=2` passes strings
    args = AppArgs.model_validate({"model": "a", "models": "b,c", "imports": "x.py,y",
                                   "serve": "max_n=4,replicas=2", "replica_cpus": "0.5"})
    assert args.models == ["a", "b", "c"] and args.imports == ["x.py", "y"]
    assert args.serve == {"max_n": 4, "replicas": 2} and args.replica_cpus == 0.5
    assert AppArgs(model="a").replica_cpus is None  # sized to the cluster
    with pytest.raises(ValueError, match="at least one model"):
        AppArgs.model_validate({})
    with pytest.raises(ValueError):
        AppArgs.model_validate({"model": "a", "modle": "b"})


def test_serve_spec_overrides():
    base = ServeSpec(max_n=4)
    spec = resolve_serve_spec(base, ["serve.max_batch_size=2", "replicas=3"])
    assert (spec.max_n, spec.max_batch_size, spec.replicas) == (4, 2, 3)
    assert resolve_serve_spec(None, {"request_timeout_s": 5}).request_timeout_s == 5.0
    with pytest.raises(SpecError, match="serve.max_n"):
        resolve_serve_spec(base, ["serve.max_n=0"])
    with pytest.raises(SpecError, match="unknown key 'max_m'"):
        resolve_serve_spec(base, ["serve.max_m=3"])
    with pytest.raises(SpecError, match="only serve"):
        resolve_serve_spec(base, ["train.steps=3"])


def test_scorer_availability_is_checked_before_deploying():
    assert _scorer_available("raygen.metrics:load_scorer") is None
    assert "no_such_loader" in _scorer_available("raygen.metrics:no_such_loader")
    assert "MODULE:FUNCTION" in _scorer_available("raygen.metrics")


def test_example_serve_config_is_valid():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.request_timeout_s
    app = config["applications"][0]
    assert app["import_path"] == "raygen.serving.app:build_app"
    args = AppArgs.model_validate(app["args"])
    resolve_serve_spec(None, args.serve)  # the overrides in the example are valid serve settings


def test_cli_registers_serve():
    from raygen.jobs.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "a", "--model", "b=c", "--set", "serve.max_n=3",
                                      "--port", "8123", "--scorer", "hf:/clip", "--import", "fam.py"])
    assert (args.model, args.set, args.port, args.scorer, args.imports) == \
        (["a", "b=c"], ["serve.max_n=3"], 8123, "hf:/clip", ["fam.py"])
    assert args.host is None  # falls back to serve.host, 127.0.0.1
    assert args.replica_cpus is None  # sized to the machine


def test_best_of_scores_the_condition_text_of_any_kind():
    """With no prompt, a caption is scored as itself and a label by its class name."""
    assert plan({"model": "text", "caption": "a red bird", "best_of": 3}).rerank_text == "a red bird"
    assert plan({"label": 2, "best_of": 3}).rerank_text == "Bird"


def test_scorer_batches_concurrent_reranks():
    """Concurrent reranks of two image sizes: one scorer call per size, each request ranked by its
    own text, best first, scores per image, ties in generation order."""
    from raygen.serving.deployments import BatchScorer, ContinuousBatcher

    scorer = BatchScorer(toy.BrightnessScorer())
    batcher = ContinuousBatcher(scorer.run, max_batch_size=16, batch_wait_timeout_s=0.05)
    small = np.stack([np.full((8, 8, 1), v, np.uint8) for v in (10, 200, 90, 200)])
    large = np.stack([np.full((16, 16, 3), v, np.uint8) for v in (50, 250, 0)])

    async def main():
        return await asyncio.gather(batcher.submit(("bright", small, 2)), batcher.submit(("dark", small, 3)),
                                    batcher.submit(("bright", large, 1)))

    bright, dark, big = asyncio.run(main())
    assert bright["order"] == [1, 3] and bright["scores"] == pytest.approx([200 / 255] * 2)
    assert dark["order"] == [0, 2, 1] and dark["scores"] == pytest.approx([-10 / 255, -90 / 255, -200 / 255])
    assert big["order"] == [1]
    assert (scorer.requests, scorer.calls) == (3, 2)


def test_config_file_is_read_with_its_deployment_settings(tmp_path):
    """`raygen serve --config`: a file `serve deploy` accepts; its deployment settings go over raygen's."""
    from raygen.serving.app import plan_app
    from raygen.serving.config import read_config

    toy.export_toy(tmp_path / "toy", name="toy", resolution=8, channels=1)
    config = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    app = config["applications"][0]
    app["args"]["models"] = [f"shapes={tmp_path / 'toy'}"]
    app["args"]["imports"] = [toy.FILE]
    app["deployments"][0]["name"] = "model-shapes"
    app["deployments"][0]["ray_actor_options"]["num_gpus"] = 0.25
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    read = read_config(path)
    assert (read.host, read.port, read.proxy_timeout_s) == ("127.0.0.1", 8000, 125)
    bound, plan = plan_app(read.args, resources=(2.0, 2.0, 1.0, "test"), deployments=read.deployments)
    deployment = bound._bound_deployment
    assert deployment.name == "model-shapes" and deployment.ray_actor_options["num_gpus"] == 0.25
    assert deployment.ray_actor_options["num_cpus"] == 1  # the file's, over raygen's share
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4
    assert deployment._deployment_config.max_queued_requests > 0  # raygen's own limit is kept
    # a deployment the app does not have, an app that is not raygen's, a file Serve would refuse
    with pytest.raises(ValueError, match="deployment 'model-nope'.*model-shapes"):
        plan_app(read.args, resources=(2.0, 2.0, 1.0, "test"), deployments={"model-nope": {"num_replicas": 2}})
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"applications": [{"name": "x", "import_path": "other:app"}]}))
    with pytest.raises(ValueError, match="exactly one application with import_path raygen.serving.app:build_app"):
        read_config(bad)
    bad.write_text(yaml.safe_dump({"applications": [{"import_path": "raygen.serving.app:build_app",
                                                     "args": {"model": "x", "colour": 1}}]}))
    with pytest.raises(ValueError, match="args.colour"):
        read_config(bad)
    bad.write_text("http_options: {port: nope}\napplications: []\n")
    with pytest.raises(ValueError, match="not a Ray Serve config: http_options.port"):
        read_config(bad)


def test_multiplexed_models_share_one_deployment(tmp_path):
    from raygen.serving.app import plan_app

    for i, name in enumerate(("base", "ft1", "ft2")):
        toy.export_toy(tmp_path / name, name=name, resolution=8, channels=1, seed=i)
    app, plan = plan_app({"model": str(tmp_path / "base"), "imports": [toy.FILE], "multiplex_per_replica": 1,
                          "multiplex": f"ft1={tmp_path / 'ft1'},ft2={tmp_path / 'ft2'}"},
                         resources=(2.0, 2.0, 0.0, "test"))
    assert [(m.name, m.multiplexed) for m in plan.models] == [("base", False), ("ft1", True), ("ft2", True)]
    ingress = app._bound_deployment
    assert ingress.name == "ingress"
    mux = ingress.init_kwargs["multiplexed"]
    assert mux["models"] == ["ft1", "ft2"] and mux["handle"]._bound_deployment.name == "multiplex"
    assert list(ingress.init_args[0]) == ["base"]  # one dedicated generator; the fine-tunes share "multiplex"
    # two replicas' worth of CPUs (base and the multiplex) plus the ingress fit the 2 CPUs
    assert plan.sizing.needed_cpus <= 2
