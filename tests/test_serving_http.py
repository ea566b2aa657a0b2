"""The serving app end to end over HTTP, in the session's Ray.

One app serves four models (a label-conditioned toy, an unconditional
grayscale toy, a caption-conditioned toy, and a tiny real seqimg model) with
a stand-in scorer, on a free port of 127.0.0.1. No replica CPUs are given:
the replicas are sized to fit the session's 2 CPUs.
"""
from __future__ import annotations

import base64
import io
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

import test_serving_family as toy

pytestmark = pytest.mark.slow

CLASSES = ["circle", "square", "triangle", "star"]
MAX_N = 8
TUNES = ["tune-a", "tune-b", "tune-c"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export_seqimg(path):
    import torch

    from raygen.exports import export_generator
    from raygen.models import DataInfo, build_model
    from raygen.spec import parse_spec

    options = {"backbone": "gpt2", "dim": 32, "depth": 1, "conditioning": "label"}
    spec = parse_spec({"name": "seq", "data": {"resolution": 8, "channels": 1},
                       "model": {"family": "seqimg", "options": options}})
    info = DataInfo(channels=1, resolution=8, num_classes=3, class_names=["a", "b", "c"])
    torch.manual_seed(0)
    model = build_model("seqimg", options, info)
    return export_generator(path, model.state_dict(), spec, info, meta={"run_id": "seq-run"})


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    from raygen.serving.app import APP_NAME, AppArgs, plan_app

    root = tmp_path_factory.mktemp("serving")
    toy.export_toy(root / "toy", name="toy", resolution=16, channels=3, num_classes=4, class_names=CLASSES,
                   conditioning="label", run_id="run-toy")
    toy.export_toy(root / "plain", name="plain", resolution=8, channels=1)
    toy.export_toy(root / "text", name="text", resolution=8, channels=3, conditioning="caption")
    export_seqimg(root / "seq")
    for tune in TUNES:  # fine-tunes of one model: same shape, other weights and runs
        toy.export_toy(root / tune, name=tune, resolution=8, channels=1, run_id=f"run-{tune}",
                       seed=TUNES.index(tune) + 1)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 65})
    app, plan = plan_app(AppArgs(
        models=[str(root / "toy"), f"plain={root / 'plain'}", f"text={root / 'text'}", f"seq={root / 'seq'}"],
        imports=[toy.FILE],
        serve={"max_n": MAX_N, "max_batch_size": 4, "max_queued_requests": 32, "request_timeout_s": 60},
        scorer="brightness", scorer_loader="tests.test_serving_family:load_brightness_scorer", ingress_cpus=0.1,
        multiplex=[f"{t}={root / t}" for t in TUNES], multiplex_per_replica=2))
    assert [m.name for m in plan.models] == ["toy", "plain", "text", "seq", *TUNES] and plan.reranking == "ready"
    # 4 generators and a scorer on the session's 2 CPUs: shares that fit, not 1 CPU each
    assert plan.sizing.needed_cpus <= 2 and plan.sizing.replica_cpus < 1
    serve.run(app, name=APP_NAME, route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client
    serve.shutdown()


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_generate_returns_valid_pngs(server):
    r = server.post("/v1/generate", json={"n": 3, "label": 1, "seed": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["run_id"], body["seed"]) == ("toy", "run-toy", 0)
    assert body["elapsed_ms"] > 0 and len(body["images"]) == 3
    assert [item["seed"] for item in body["images"]] == [0, 1, 2]  # image i has seed seed + i
    for item in body["images"]:
        image = decode(item["png_base64"])
        assert (image.format, image.mode, image.size, item["score"]) == ("PNG", "RGB", (16, 16), None)
    gray = server.post("/v1/generate", json={"model": "plain", "n": 2}).json()
    assert [decode(i["png_base64"]).mode for i in gray["images"]] == ["L", "L"]
    assert isinstance(gray["seed"], int) and gray["run_id"] is None  # a drawn seed is returned for replay


def test_same_seed_same_images(server):
    def images(body):
        r = server.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        return [i["png_base64"] for i in r.json()["images"]]

    first = images({"n": 4, "label": 2, "seed": 11})
    assert images({"n": 4, "label": 2, "seed": 11}) == first
    assert images({"n": 4, "label": "triangle", "seed": 11}) == first  # a class name is the same label
    assert images({"n": 4, "label": 2, "seed": 12}) != first
    assert images({"n": 4, "label": 2, "seed": 11, "temperature": 0.5}) != first
    assert images({"n": 4, "label": 2, "seed": 11, "style": "inverted"}) != first
    assert len(set(first)) == 4  # the images of one request differ from each other
    # image i of seed s is drawn again alone with seed s + i
    assert images({"n": 1, "label": 2, "seed": 13}) == first[2:3]


def test_png_format_single_and_grid(server):
    r = server.post("/v1/generate", json={"n": 1, "seed": 3, "format": "png", "label": 0})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-raygen-seed"] == "3" and r.headers["x-raygen-model"] == "toy"
    single = Image.open(io.BytesIO(r.content))
    assert single.size == (16, 16)
    same = server.post("/v1/generate", json={"n": 1, "seed": 3, "label": 0}).json()["images"][0]["png_base64"]
    assert np.array_equal(np.asarray(single), np.asarray(decode(same)))
    grid = Image.open(io.BytesIO(server.post("/v1/generate", json={"n": 4, "seed": 3, "format": "png"}).content))
    assert grid.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)


def test_caption_and_seqimg_models(server):
    a = server.post("/v1/generate", json={"model": "text", "caption": "a red circle", "seed": 1}).json()
    b = server.post("/v1/generate", json={"model": "text", "caption": "a blue star", "seed": 1}).json()
    assert a["images"][0]["png_base64"] != b["images"][0]["png_base64"]  # the caption conditions the image
    r = server.post("/v1/generate", json={"model": "seq", "n": 2, "label": "b", "seed": 5, "top_k": 4})
    assert r.status_code == 200, r.text
    assert [decode(i["png_base64"]).size for i in r.json()["images"]] == [(8, 8), (8, 8)]
    again = server.post("/v1/generate", json={"model": "seq", "n": 2, "label": 1, "seed": 5, "top_k": 4})
    assert again.json()["images"] == r.json()["images"]


def test_health_models_docs_and_playground(server):
    health = server.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "models": ["toy", "plain", "text", "seq", *TUNES], "reranking": "ready"}
    body = server.get("/v1/models").json()
    assert (body["default_model"], body["max_n"], body["reranking"]) == ("toy", MAX_N, "ready")
    models = {m["name"]: m for m in body["models"]}
    toy_info = models["toy"]
    data = toy_info["data"]
    assert (data["channels"], data["height"], data["width"], data["num_classes"], data["class_names"]) == \
        (3, 16, 16, 4, CLASSES)
    assert (toy_info["family"], toy_info["run_id"], toy_info["capabilities"]) == ("servetoy", "run-toy",
                                                                                 ["sample", "train"])
    assert toy_info["condition"]["kind"] == "label" and toy_info["condition"]["schema"]["anyOf"][1]["enum"] == CLASSES
    assert toy_info["source"].endswith("toy") and toy_info["parameters"] > 0
    assert (toy_info["device"], toy_info["replicas"]) == ("cpu", 1)
    temperature = toy_info["params"]["properties"]["temperature"]
    assert (temperature["type"], temperature["default"], temperature["exclusiveMinimum"], temperature["maximum"]) == \
        ("number", 1.0, 0.0, 10.0)
    assert (models["text"]["condition"]["kind"], models["plain"]["condition"]["kind"]) == ("caption", "none")
    assert (models["seq"]["family"], models["seq"]["condition"]["kind"]) == ("seqimg", "label")
    assert models["seq"]["params"]["properties"]["top_k"]["maximum"] == 256
    # the OpenAPI schema documents every model's own parameters, with their ranges
    doc = server.get("/openapi.json").json()
    body_schema = doc["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert len(body_schema["anyOf"]) == 4 + len(TUNES)
    seq = doc["components"]["schemas"]["GenerateRequest.seq"]["properties"]
    assert (seq["top_k"]["maximum"], seq["temperature"]["maximum"], seq["model"]["const"]) == (256, 10.0, "seq")
    assert doc["components"]["schemas"]["servetoy.Style"]["enum"] == ["plain", "inverted"]
    assert server.get("/docs").status_code == 200
    page = server.get("/")
    assert page.status_code == 200 and "raygen playground" in page.text and "/v1/generate" in page.text


BAD = [
    ("{not json", "body", 422),
    ("[1, 2]", "body", 422),
    ({}, None, 200),  # sanity: an empty object is a valid request (n=1, default model)
    ({"n": 0}, "n", 422),
    ({"n": MAX_N + 1}, "n", 422),
    ({"n": "4"}, "n", 422),
    ({"n": 2.5}, "n", 422),
    ({"seed": -1}, "seed", 422),
    ({"seed": "x"}, "seed", 422),
    ({"format": "gif"}, "format", 422),
    ({"colour": "red"}, "colour", 422),
    ({"temperature": "hot"}, "temperature", 422),
    ({"temperature": -1.0}, "temperature", 422),  # the family's range: > 0
    ({"style": "bold"}, "style", 422),
    ({"top_k": 3}, "top_k", 422),  # a parameter of another model
    ({"model": "seq", "top_k": 300}, "top_k", 422),
    ({"scene": {"objects": [{"x": 1.0}]}}, "scene", 422),
    ({"label": 4}, "label", 422),
    ({"label": -1}, "label", 422),
    ({"label": "hexagon"}, "label", 422),
    ({"label": True}, "label", 422),
    ({"model": "plain", "label": 0}, "label", 422),
    ({"caption": "a circle"}, "caption", 422),
    ({"model": "plain", "prompt": "a circle"}, "prompt", 422),
    ({"model": "nope"}, "model", 404),
    ({"k": 2}, "k", 422),
    ({"best_of": MAX_N + 1, "prompt": "x"}, "best_of", 422),
    ({"best_of": 2, "k": 3, "prompt": "x"}, "k", 422),
    ({"model": "plain", "best_of": 2}, "prompt", 422),
]


@pytest.mark.parametrize("body, field, status", BAD, ids=[str(b)[:40] for b, _, _ in BAD])
def test_bad_requests_get_json_4xx(server, body, field, status):
    if isinstance(body, str):
        r = server.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    else:
        r = server.post("/v1/generate", json=body)
    assert r.status_code == status, r.text
    if status != 200:
        err = r.json()
        assert err["field"] == field and err["error"], err
        assert "Traceback" not in r.text


def test_other_failures_are_json(server):
    form = server.post("/v1/generate", content="n=1", headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 422 and form.json()["field"] == "body"
    assert server.get("/v1/generate").json()["error"] and server.get("/v1/generate").status_code == 405
    assert server.get("/no/such/page").status_code == 404
    # a value the model itself rejects is the client's to fix: 422 with the model's reason
    r = server.post("/v1/generate", json={"reject": True})
    assert r.status_code == 422 and "rejects this request" in r.json()["error"]
    # an internal error: 500 with a one-line message, no traceback, and the server keeps serving
    r = server.post("/v1/generate", json={"explode": True})
    assert r.status_code == 500 and "boom" in r.json()["error"] and "Traceback" not in r.text
    assert server.post("/v1/generate", json={"seed": 1}).status_code == 200


def best_of_six(server) -> list[int]:
    """Indices of the two brightest of the six candidates of seed 7, label 0."""
    candidates = server.post("/v1/generate", json={"n": 6, "seed": 7, "label": 0}).json()["images"]
    brightness = [np.asarray(decode(c["png_base64"]), dtype=np.float32).mean() for c in candidates]
    return sorted(range(6), key=lambda i: -brightness[i])[:2]


def test_best_of_reranks_by_score(server):
    r = server.post("/v1/generate", json={"best_of": 6, "k": 2, "prompt": "bright", "seed": 7, "label": 0})
    assert r.status_code == 200, r.text
    kept = r.json()["images"]
    scores = [i["score"] for i in kept]
    assert len(kept) == 2 and scores[0] >= scores[1]
    assert [i["seed"] for i in kept] == [7 + i for i in best_of_six(server)]
    # the kept images are the two brightest of the six candidates the same seed gives
    candidates = server.post("/v1/generate", json={"n": 6, "seed": 7, "label": 0}).json()["images"]
    brightness = [np.asarray(decode(c["png_base64"]), dtype=np.float32).mean() / 255 for c in candidates]
    best = best_of_six(server)
    assert [i["png_base64"] for i in kept] == [candidates[i]["png_base64"] for i in best]
    assert scores == pytest.approx([brightness[i] for i in best], abs=1e-6)
    dark = server.post("/v1/generate", json={"best_of": 6, "prompt": "dark", "seed": 7, "label": 0}).json()
    assert dark["images"][0]["png_base64"] == candidates[min(range(6), key=lambda i: brightness[i])]["png_base64"]


def test_concurrent_requests_match_sequential_ones(server):
    def body(seed):
        if seed >= 4:  # the seqimg model: labelled and unlabelled images merged into one forward call
            return {"model": "seq", "n": 1 + seed % 2, "seed": seed, **({"label": seed % 3} if seed % 3 else {})}
        # two params keys (temperatures): a batch holds merged and separate forward calls
        return {"n": 1 + seed % 2, "seed": seed, "label": seed, "temperature": 1.0 if seed < 2 else 0.5}

    expected = {seed: server.post("/v1/generate", json=body(seed)).json()["images"] for seed in range(8)}
    seeds = [i % 8 for i in range(24)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda seed: server.post("/v1/generate", json=body(seed)), seeds))
    assert [r.status_code for r in responses] == [200] * len(seeds)
    # batched with whatever else arrived at the same time: still exactly the images of its own seed
    assert [r.json()["images"] for r in responses] == [expected[seed] for seed in seeds]


def test_latency_of_sequential_single_images(server, capsys):
    timings = []
    for i in range(20):
        start = time.perf_counter()
        r = server.post("/v1/generate", json={"n": 1, "seed": i, "label": 0})
        timings.append((time.perf_counter() - start) * 1e3)
        assert r.status_code == 200
    p50 = statistics.median(timings)
    with capsys.disabled():
        print(f"\n[serving] 20 sequential n=1 requests: p50 {p50:.1f} ms, max {max(timings):.1f} ms")
    assert p50 < 2000


def test_multiplexed_models_load_on_demand_with_lru_eviction(server):
    """Three fine-tunes share one deployment holding two at a time: each answers with its own weights
    and run, and naming a third evicts the least recently used (it is loaded again when named)."""
    from ray import serve

    from raygen.serving.app import APP_NAME

    def draw(name):
        r = server.post("/v1/generate", json={"model": name, "seed": 3})
        assert r.status_code == 200, r.text
        return r.json()

    drawn = [draw(t) for t in ("tune-a", "tune-b", "tune-c", "tune-a")]
    assert [d["run_id"] for d in drawn] == ["run-tune-a", "run-tune-b", "run-tune-c", "run-tune-a"]
    assert len({d["images"][0]["png_base64"] for d in drawn[:3]}) == 3  # other weights, other images
    assert drawn[3]["images"] == drawn[0]["images"]
    stats = serve.get_deployment_handle("multiplex", app_name=APP_NAME).stats.remote().result()
    assert stats["loads"] == 4  # a, b, c (a dropped), a again
    models = {m["name"]: m for m in server.get("/v1/models").json()["models"]}
    assert models["tune-b"]["multiplexed"] and not models["toy"]["multiplexed"]


def test_openai_route_and_limits_through_the_proxy(server):
    """The OpenAI route, its file links and the body limit behind Ray Serve's proxy (the front door
    runs in the ingress replica; tests/test_openai_images.py covers the rest in process)."""
    openai = pytest.importorskip("openai", reason="the openai client is in the test extras")
    client = openai.OpenAI(base_url=str(server.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0)
    result = client.images.generate(model="toy", prompt="square", n=2, response_format="url",
                                    extra_body={"seed": 4})
    assert [d.revised_prompt for d in result.data] == ["square", "square"]
    linked = server.get(result.data[1].url.replace(str(server.base_url).rstrip("/"), ""))
    assert linked.status_code == 200 and linked.headers["content-type"] == "image/png"
    ours = server.post("/v1/generate", json={"n": 2, "label": 1, "seed": 4}).json()["images"][1]["png_base64"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(linked.content))), np.asarray(decode(ours)))
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="nope", prompt="square")
    big = server.post("/v1/generate", content=b"{" + b" " * (5 << 20), headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["field"] == "body"
