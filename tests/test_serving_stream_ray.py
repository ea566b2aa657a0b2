"""Streamed previews through Ray Serve: two models, so the ingress streams from separate generator
replicas (`handle.options(stream=True)`), read with the real `openai` client; a client that leaves
cancels the replica's sampling. The session's Ray, on a free port of 127.0.0.1."""
from __future__ import annotations

import socket
import time

import httpx
import pytest

from test_serving_stream import export, pixels, preview_steps, stream_and_leave, tiny_diffusion, tiny_seqimg

openai = pytest.importorskip("openai", reason="the openai client is in the test extras")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from ray import serve

    from raygen.serving.app import APP_NAME, AppArgs, plan_app

    root = tmp_path_factory.mktemp("stream-ray")
    export(tiny_diffusion(), root / "diff", "diff")
    export(tiny_seqimg(), root / "seq", "seq")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 65})
    app, _ = plan_app(AppArgs(models=[f"diff={root / 'diff'}", f"seq={root / 'seq'}"],
                              serve={"max_n": 4, "request_timeout_s": 60}, ingress_cpus=0.1))
    serve.run(app, name=APP_NAME, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def stats(name: str) -> dict:
    from ray import serve

    from raygen.serving.app import APP_NAME

    return serve.get_deployment_handle(f"generator-{name}", app_name=APP_NAME).stats.remote().result()


def test_openai_stream_through_generator_replicas(served):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="any", max_retries=0, timeout=60)
    for model, prompt, extra, steps in (("diff", "on", {"num_inference_steps": 6}, 6), ("seq", "off", {}, 8)):
        events = list(client.images.generate(model=model, prompt=prompt, stream=True, partial_images=2,
                                             extra_body={"seed": 2, **extra}))
        assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
        assert [e.model_extra["step"] for e in events[:2]] == preview_steps(steps, 2)
        plain = client.images.generate(model=model, prompt=prompt, extra_body={"seed": 2, **extra})
        assert (pixels(events[-1].b64_json) == pixels(plain.data[0].b64_json)).all()


def test_a_client_that_leaves_cancels_the_replica_sampling(served):
    before = stats("diff")
    stream_and_leave(served, "/v1/images/generations",
                     {"model": "diff", "prompt": "on", "stream": True, "partial_images": 3, "seed": 0,
                      "num_inference_steps": 400}, "partial_image")
    deadline = time.monotonic() + 60
    while stats("diff")["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, "the replica's sampling was not cancelled after the client left"
        time.sleep(0.2)
    ran = stats("diff")["stream_steps"] - before["stream_steps"]
    assert 100 <= ran < 400, ran
    assert httpx.get(f"{served}/healthz").status_code == 200
