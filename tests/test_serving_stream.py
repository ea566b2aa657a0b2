"""Streamed previews (`stream: true`, `partial_images`), from the sampling loops' hook to the real `openai` client.

The first tests run the models and the replica's streaming code in plain
Python; the others serve a tiny diffusion model and a tiny seqimg model in
this process without Ray (`raygen.serving.local`) on a free port of
127.0.0.1 and read the server-sent events with the `openai` client and httpx.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from raygen.models import Conditions, DataInfo, build_model, make_generators, parse_params
from raygen.models.sampling import SamplingCancelled, previewing
from raygen.serving.streaming import preview_steps

LABELS = ["on", "off"]
INFO = DataInfo(channels=1, resolution=8, num_classes=2, class_names=LABELS)


@functools.lru_cache(maxsize=None)
def tiny_diffusion():
    from raygen.models.diffusion import DiffusionConfig

    torch.manual_seed(0)
    # 1000 training steps so a request may ask for hundreds of sampling steps (the cancel test)
    return build_model("diffusion", DiffusionConfig.debug(noise={"train_timesteps": 1000},
                                                            conditioning="label"), INFO).eval()


def tiny_seqimg():
    torch.manual_seed(0)
    # rowwise with 1 row per token: 8 tokens, one image row each
    return build_model("seqimg", {"backbone": "gpt2", "dim": 32, "depth": 1, "conditioning": "label"}, INFO).eval()


def export(model, path, name: str):
    from raygen.exports import export_generator
    from raygen.spec import parse_spec

    spec = parse_spec({"name": name, "data": {"resolution": 8, "channels": 1},
                       "model": {"family": model.family, "options": model.config.model_dump(mode="json")}})
    return export_generator(path, model.state_dict(), spec, INFO, meta={"run_id": f"run-{name}"})


def record(calls):
    def callback(step, total, images):
        calls.append((step, total, None if images is None else images().clone()))
    return callback


# ---------------------------------------------------------------- the sampling loops' hook
def test_preview_steps_are_evenly_spaced_and_never_the_last():
    assert preview_steps(100, 3) == [25, 50, 75]
    assert preview_steps(10, 2) == [3, 7]
    assert preview_steps(2, 3) == [1] and preview_steps(1, 3) == [] and preview_steps(50, 0) == []


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++"])
def test_diffusion_previews_are_its_x0_estimates(sampler):
    model = tiny_diffusion()
    params = parse_params(model.sampling_params, {"sampler": sampler, "num_inference_steps": 6})
    conditions = Conditions.repeat("label", 1, 2)
    plain = model.sample(conditions, params, make_generators([3, 4]))
    calls = []
    with previewing(record(calls)):
        heard = model.sample(conditions, params, make_generators([3, 4]))
    assert torch.equal(plain, heard)  # listening changes nothing
    assert [(s, t) for s, t, _ in calls] == [(i, 6) for i in range(1, 7)]
    assert all(im.shape == (2, 1, 8, 8) and 0 <= im.min() and im.max() <= 1 for _, _, im in calls)
    # the last step's x0 estimate is the result (DDIM ends at alpha 1; DPM-Solver++'s x0 is estimated from
    # the prediction, as its step does not return one); earlier ones are the estimates of their steps
    assert torch.allclose(calls[-1][2], plain, atol=1e-4)


def test_seqimg_previews_hold_the_rows_decoded_so_far():
    model = tiny_seqimg()
    params = parse_params(model.sampling_params, {"temperature": 1.0})
    conditions = Conditions.repeat("label", 0, 2)
    calls = []
    with previewing(record(calls)):
        final = model.sample(conditions, params, make_generators([5, 6]))
    assert len(calls) == model.seq_len == 8
    step, total, half = calls[3]               # the top 4 rows decoded
    assert (step, total) == (4, 8)
    assert torch.allclose(half[:, :, :4], final[:, :, :4]) and torch.all(half[:, :, 4:] == 0.5)
    assert torch.allclose(calls[-1][2], final)


def test_cascade_previews_each_decoded_level():
    from raygen.models.cascade import FAMILY

    config, info, comps = FAMILY.debug()["label-window-ckpt"]
    torch.manual_seed(0)
    model = build_model("cascade", config, info, comps).eval()
    params = parse_params(model.sampling_params, {})
    calls = []
    with previewing(record(calls)):
        final = model.sample(Conditions.repeat("label", 0, 1), params, make_generators([1]))
    levels = model.n_levels
    shown = [(s, t, im) for s, t, im in calls if im is not None]
    assert [(s, t) for s, t, _ in shown] == [(i, levels) for i in range(1, levels + 1)]
    assert torch.allclose(shown[-1][2], final) and shown[0][2].shape == final.shape
    ticks = [(s, t) for s, t, im in calls if im is None]  # each decoded token ticks, so a stream can stop there
    assert len(ticks) > levels and ticks[0] == (1, ticks[0][1])


def test_a_callback_that_raises_stops_the_loop():
    model = tiny_diffusion()
    params = parse_params(model.sampling_params, {"num_inference_steps": 50})
    steps = []

    def stop_at_three(step, total, images):
        steps.append(step)
        if step == 3:
            raise SamplingCancelled("gone")

    with previewing(stop_at_three), pytest.raises(SamplingCancelled):
        model.sample(Conditions.repeat("label", 0, 1), params, make_generators([0]))
    assert steps == [1, 2, 3]


def test_a_stream_runs_alone_and_draws_the_same_images():
    """Through the replica's own code (batcher, sampler, stream_job): k previews, then the result, equal to
    a plain request's; a streamed request never shares a forward call with another."""
    from raygen.serving.deployments import BatchSampler, ContinuousBatcher
    from raygen.serving.requests import SampleJob
    from raygen.serving.streaming import stream_job

    sampler = BatchSampler(tiny_diffusion(), name="diff", merge=True)
    batcher = ContinuousBatcher(sampler.run, max_batch_size=8, batch_wait_timeout_s=0.05)
    job = SampleJob(n=2, seed=9, kind="label", condition=1, params={"num_inference_steps": 8})

    async def scenario():
        plain = asyncio.ensure_future(batcher.submit(job))
        other = asyncio.ensure_future(batcher.submit(job))
        events = [e async for e in stream_job(batcher.submit, job, 3, model="diff", family="diffusion")]
        return events, await plain, await other

    events, plain, other = asyncio.run(scenario())
    partial = [e for e in events if e["type"] == "partial"]
    assert [(e["index"], e["step"], e["total"]) for e in partial] == [(0, 2, 8), (1, 4, 8), (2, 6, 8)]
    assert all(e["images"].shape == (2, 8, 8, 1) and e["images"].dtype == np.uint8 for e in partial)
    assert events[-1]["type"] == "result" and np.array_equal(events[-1]["images"], plain["images"])
    assert plain["batch_images"] == other["batch_images"] == 4  # the two plain requests merged
    assert sampler.forward_calls == 2                           # ...and the stream ran in a call of its own


# ---------------------------------------------------------------- over HTTP, in one process
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from raygen.serving.local import LocalServer, build_local

    root = tmp_path_factory.mktemp("stream")
    export(tiny_diffusion(), root / "diff", "diff")
    export(tiny_seqimg(), root / "seq", "seq")
    app = build_local({"models": [f"diff={root / 'diff'}", f"seq={root / 'seq'}"],
                       "serve": {"max_n": 4, "request_timeout_s": 60}})
    with LocalServer(app.api) as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    openai = pytest.importorskip("openai", reason="the openai client is in the test extras")
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="any-key", max_retries=0, timeout=60)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.mark.slow
@pytest.mark.parametrize("model, prompt, extra, steps", [
    ("diff", "off", {"num_inference_steps": 9}, 9),
    ("seq", "on", {}, 8),
])
def test_openai_client_streams_partial_images(client, model, prompt, extra, steps):
    from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent

    stream = client.images.generate(model=model, prompt=prompt, stream=True, partial_images=2,
                                    extra_body={"seed": 3, **extra})
    events = list(stream)
    kinds = [type(e) for e in events]
    assert kinds == [ImageGenPartialImageEvent] * 2 + [ImageGenCompletedEvent], kinds
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert [e.model_extra["step"] for e in events[:2]] == preview_steps(steps, 2)
    done = events[-1]
    assert (done.type, done.size, done.output_format, done.model_extra["seed"]) == \
        ("image_generation.completed", "8x8", "png", 3)
    assert all(pixels(e.b64_json).shape == (8, 8) for e in events)
    # the streamed image is the one a plain request draws
    plain = client.images.generate(model=model, prompt=prompt, extra_body={"seed": 3, **extra})
    assert np.array_equal(pixels(done.b64_json), pixels(plain.data[0].b64_json))
    if model == "seq":  # the rows not decoded yet are mid-grey
        assert (pixels(events[0].b64_json)[-1] == 128).all() and not (pixels(done.b64_json)[-1] == 128).all()


@pytest.mark.slow
def test_openai_stream_without_previews_and_with_n(client):
    events = list(client.images.generate(model="diff", prompt="on", n=2, stream=True, partial_images=0,
                                         extra_body={"seed": 1, "num_inference_steps": 4}))
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert [e.model_extra["image_index"] for e in events] == [0, 1]
    assert [e.model_extra["seed"] for e in events] == [1, 2]


@pytest.mark.slow
def test_generate_route_streams_its_own_events(served):
    body = {"model": "seq", "label": "off", "seed": 4, "stream": True, "partial_images": 3}
    with httpx.stream("POST", f"{served.url}/v1/generate", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = [(block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1][len("data: "):]))
              for block in text.strip().split("\n\n")]
    assert [name for name, _ in events] == ["preview"] * 3 + ["result"]
    assert [e["step"] for _, e in events[:3]] == [2, 4, 6] and events[0][1]["images"][0]["seed"] == 4
    plain = httpx.post(f"{served.url}/v1/generate", json={"model": "seq", "label": "off", "seed": 4}).json()
    assert events[-1][1]["images"][0]["png_base64"] == plain["images"][0]["png_base64"]


@pytest.mark.slow
@pytest.mark.parametrize("route, body, field", [
    ("/v1/generate", {"model": "seq", "partial_images": 2}, "partial_images"),
    ("/v1/generate", {"model": "seq", "stream": True, "partial_images": 4}, "partial_images"),
    ("/v1/generate", {"model": "seq", "stream": True, "format": "png"}, "format"),
    ("/v1/images/generations", {"model": "seq", "prompt": "on", "partial_images": 1}, "partial_images"),
    ("/v1/images/generations", {"model": "seq", "prompt": "on", "stream": True, "partial_images": 9},
     "partial_images"),
    ("/v1/images/generations", {"model": "seq", "prompt": "on", "stream": True, "response_format": "url"},
     "response_format"),
])
def test_bad_stream_requests_name_the_field(served, route, body, field):
    r = httpx.post(served.url + route, json=body)
    assert 400 <= r.status_code < 500 and "event-stream" not in r.headers["content-type"]
    error = r.json()["error"]
    assert (error["param"] if isinstance(error, dict) else r.json()["field"]) == field


def metric(url: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def stream_and_leave(url: str, route: str, body: dict, token: str) -> None:
    """Read a stream until its first preview, then close the connection."""
    with httpx.stream("POST", url + route, json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event:") and token in line:
                break
        else:
            pytest.fail("the stream ended before its first preview")


def wait_cancelled(url: str, model: str, before: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(url, "raygen_sampling_cancelled_total", model=model) <= before:
        assert time.monotonic() < deadline, "the sampling was not cancelled after the client left"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("route, token", [("/v1/images/generations", "partial_image"), ("/v1/generate", "preview")])
def test_a_client_that_leaves_cancels_the_sampling(served, route, token):
    requested = 400
    steps0 = metric(served.url, "raygen_sampling_steps_total", model="diff")
    cancelled0 = metric(served.url, "raygen_sampling_cancelled_total", model="diff")
    body = {"model": "diff", "stream": True, "partial_images": 3, "seed": 0, "num_inference_steps": requested,
            **({"prompt": "on"} if route.startswith("/v1/images") else {"label": "on"})}
    stream_and_leave(served.url, route, body, token)
    wait_cancelled(served.url, "diff", cancelled0)
    ran = metric(served.url, "raygen_sampling_steps_total", model="diff") - steps0
    # the first preview comes after step 100; the loop stopped soon after, far from the 400 asked for
    assert 100 <= ran < requested, ran
    time.sleep(0.5)
    assert metric(served.url, "raygen_sampling_steps_total", model="diff") - steps0 == ran  # and stays stopped
    # the server still serves
    after = httpx.post(f"{served.url}/v1/generate", json={"model": "diff", "label": 0, "num_inference_steps": 2})
    assert after.status_code == 200, after.text


@pytest.mark.slow
def test_models_report_their_serving_memory(served):
    """Issue 17: every model's serving memory, measured at load with a sample at serve.max_batch_size."""
    models = {m["name"]: m for m in httpx.get(f"{served.url}/v1/models").json()["models"]}
    for name, model in (("diff", tiny_diffusion()), ("seq", tiny_seqimg())):
        memory = models[name]["serving_memory"]
        assert memory["batch"] == 8 and memory["weights_bytes"] == models[name]["memory_bytes"]
        assert memory["weights_bytes"] == sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])
        assert memory["activation_bytes"] > 0 and memory["resident_bytes"] is not None
        assert memory["ratio"] == pytest.approx(
            memory["resident_bytes"] / (memory["weights_bytes"] + memory["activation_bytes"]), abs=1e-3)
