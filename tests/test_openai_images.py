"""`POST /v1/images/generations` driven by the real `openai` Python client.

The app runs in this process without Ray (`raygen.serving.local`: the same
FastAPI app, routes and batcher as a Serve replica) on a free port of
127.0.0.1. Models: a label-conditioned toy with class names, a
caption-conditioned toy, and the stand-in brightness scorer for best_of.
"""
from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

import test_serving_family as toy

openai = pytest.importorskip("openai", reason="the openai client is in the test extras: pip install -e '.[test]'")

pytestmark = pytest.mark.slow  # starts a server (on 127.0.0.1)

CLASSES = ["circle", "square", "triangle", "star"]
TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from raygen.serving.local import LocalServer, build_local

    root = tmp_path_factory.mktemp("openai")
    toy.export_toy(root / "toy", name="toy", resolution=16, channels=3, num_classes=4, class_names=CLASSES,
                   conditioning="label", run_id="run-toy")
    toy.export_toy(root / "text", name="text", resolution=8, channels=3, conditioning="caption")
    app = build_local({"models": [str(root / "toy"), f"text={root / 'text'}"], "imports": [toy.FILE],
                       "serve": {"max_n": 8, "max_batch_size": 1, "max_queued_requests": 1,
                                 "request_timeout_s": 6},
                       "scorer": "brightness", "scorer_loader": "test_serving_family:load_brightness_scorer",
                       "files_dir": str(root / "files"), "files_ttl_s": 60})
    with LocalServer(app.api) as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    # max_retries=0: a 503 is seen as it is, not retried behind the test's back
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="any-key", max_retries=0, timeout=30)


def pixels(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image)


def test_b64_images_match_generate(client, served):
    result = client.images.generate(model="toy", prompt="Triangle", n=3, size="16x16",
                                    extra_body={"seed": 5})
    assert len(result.data) == 3 and result.size == "16x16" and result.output_format == "png"
    assert [d.revised_prompt for d in result.data] == ["triangle"] * 3  # the label the prompt named
    assert result.created > time.time() - 60
    extra = result.model_extra
    assert (extra["model"], extra["run_id"], extra["seed"]) == ("toy", "run-toy", 5)
    assert [d.model_extra["seed"] for d in result.data] == [5, 6, 7]
    # the same images as raygen's own API gives for label 2 and seed 5
    ours = httpx.post(f"{served.url}/v1/generate", json={"n": 3, "label": 2, "seed": 5}).json()["images"]
    assert [d.b64_json for d in result.data] == [i["png_base64"] for i in ours]
    assert pixels(base64.b64decode(result.data[0].b64_json)).shape == (16, 16, 3)


def test_family_params_through_extra_body(client):
    def first(**extra):
        return client.images.generate(model="toy", prompt="star", extra_body={"seed": 1, **extra}).data[0].b64_json

    plain = first()
    assert first() == plain
    assert first(temperature=0.5) != plain
    inverted = pixels(base64.b64decode(first(style="inverted")))
    assert np.abs(inverted.astype(int) - (255 - pixels(base64.b64decode(plain)).astype(int))).max() <= 1
    # the label may come through extra_body too; the prompt is then not a class name
    assert client.images.generate(model="toy", prompt="anything", extra_body={"seed": 1, "label": "star"}) \
        .data[0].b64_json == plain


def test_caption_model_and_url_format(client):
    a = client.images.generate(model="text", prompt="a red circle", extra_body={"seed": 2})
    b = client.images.generate(model="text", prompt="a blue star", extra_body={"seed": 2})
    assert a.data[0].b64_json != b.data[0].b64_json and a.data[0].revised_prompt == "a red circle"
    for fmt, media in (("jpeg", "image/jpeg"), ("webp", "image/webp"), ("png", "image/png")):
        linked = client.images.generate(model="text", prompt="a red circle", response_format="url",
                                        output_format=fmt, n=2, extra_body={"seed": 2})
        assert linked.output_format == fmt and all(d.b64_json is None for d in linked.data)
        for item in linked.data:
            assert item.url.startswith("http://127.0.0.1:") and "/v1/files/" in item.url
            assert item.model_extra["expires_at"] > time.time()
            got = httpx.get(item.url)
            assert got.status_code == 200 and got.headers["content-type"] == media
            assert pixels(got.content).shape == (8, 8, 3)
    png = base64.b64decode(a.data[0].b64_json)
    assert np.array_equal(pixels(httpx.get(linked.data[0].url).content), pixels(png))


def test_best_of_scores_every_image(client):
    result = client.images.generate(model="toy", prompt="circle", n=2, extra_body={"best_of": 6, "seed": 7})
    scores = [d.model_extra["score"] for d in result.data]
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores) and scores[0] >= scores[1]
    # "circle" is not "bright": the stand-in scorer prefers the darkest of the six candidates
    candidates = client.images.generate(model="toy", prompt="circle", n=6, extra_body={"seed": 7}).data
    mean = [pixels(base64.b64decode(c.b64_json)).mean() for c in candidates]
    darkest = sorted(range(6), key=lambda i: mean[i])[:2]
    assert [d.model_extra["seed"] for d in result.data] == [7 + i for i in darkest]


@pytest.mark.parametrize("kwargs, exc, status, param", [
    (dict(model="toy", prompt="circle", size="1024x1024"), "BadRequestError", 400, "size"),
    (dict(model="toy", prompt="hexagon"), "BadRequestError", 400, "prompt"),
    (dict(model="toy", prompt="circle", n=9), "BadRequestError", 400, "n"),
    (dict(model="toy", prompt="circle", extra_body={"colour": "red"}), "BadRequestError", 400, "colour"),
    (dict(model="toy", prompt="circle", extra_body={"temperature": -1}), "BadRequestError", 400, "temperature"),
    (dict(model="toy", prompt="circle", output_format="gif"), "BadRequestError", 400, "output_format"),
    (dict(model="dall-e-3", prompt="circle"), "NotFoundError", 404, "model"),
    (dict(model="toy", prompt="circle", extra_body={"reject": True}), "UnprocessableEntityError", 422, None),
])
def test_errors_map_to_client_exceptions(client, kwargs, exc, status, param):
    with pytest.raises(getattr(openai, exc)) as info:
        client.images.generate(**kwargs)
    err = info.value
    assert err.status_code == status
    body = err.body  # the client hands over the "error" object of {"error": {...}}
    assert body["message"] and body["type"] == "invalid_request_error" and body["param"] == param
    assert "Traceback" not in body["message"]


def test_busy_and_timeout_map_to_client_exceptions(client):
    # one request runs, one queues (max_batch_size 1, max_queued_requests 1 -> 3 in flight at most)
    def call(delay):
        try:
            client.images.generate(model="toy", prompt="circle", extra_body={"delay_s": delay})
            return 200, None
        except openai.APIStatusError as err:
            return err.status_code, err

    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(call, [1.5] * 6))  # 3 admitted finish by 4.5 s, inside the 6 s timeout
    codes = sorted(code for code, _ in outcomes)
    assert 503 in codes and 200 in codes, codes
    busy = next(err for code, err in outcomes if code == 503)
    assert isinstance(busy, openai.InternalServerError) and busy.response.headers["retry-after"] == "1"
    assert busy.body["type"] == "server_error" and busy.body["code"] == "server_busy"
    with pytest.raises(openai.APIStatusError) as info:  # every call above has returned: the queue is empty
        client.images.generate(model="toy", prompt="circle", extra_body={"delay_s": 8})
    assert info.value.status_code == 504 and info.value.body["code"] == "timeout"


def test_token_and_body_limit(tmp_path_factory):
    """A server with a token: 401 to the wrong key (AuthenticationError), images to the right one;
    a body over the limit gets 413 before it is read."""
    from raygen.serving.local import LocalServer, build_local

    root = tmp_path_factory.mktemp("openai-token")
    toy.export_toy(root / "plain", name="plain", resolution=8, channels=1)
    (root / "token").write_text(TOKEN + "\n")
    app = build_local({"model": str(root / "plain"), "imports": [toy.FILE], "token_file": str(root / "token"),
                       "max_body_bytes": 4096})
    with LocalServer(app.api) as server:
        wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-the-token", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            wrong.images.generate(prompt="anything")
        assert info.value.body["code"] == "invalid_api_key" and TOKEN not in str(info.value.body)
        right = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0)
        assert len(right.images.generate(prompt="anything", n=2).data) == 2
        with pytest.raises(openai.APIStatusError) as info:
            right.images.generate(prompt="x" * 5000)
        assert info.value.status_code == 413 and info.value.body["param"] == "body"


def test_prometheus_metrics(served, client):
    """raygen's own metrics: images per family, sampling seconds, answers by status, queue rejections
    (the busy test above was refused at least once)."""
    client.images.generate(model="toy", prompt="star", n=2)
    text = httpx.get(f"{served.url}/metrics").text

    from prometheus_client.parser import text_string_to_metric_families

    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]

    def value(name: str, **labels) -> float:
        found = [s.value for s in samples if s.name == name and s.labels == labels]
        assert found, f"{name} {labels} not in /metrics:\n{text[:2000]}"
        return found[0]

    assert value("raygen_images_generated_total", family="servetoy", model="toy") >= 2
    assert value("raygen_sampling_seconds_count", family="servetoy", model="toy") >= 1
    assert value("raygen_requests_total", model="toy", route="images", status="200") >= 1
    assert value("raygen_requests_total", model="toy", route="images", status="503") >= 1
    assert value("raygen_queue_rejections_total", model="toy") >= 1
