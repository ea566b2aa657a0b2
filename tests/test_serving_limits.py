"""Limits of the front door: bearer token, body size, exposure, and a schemathesis run.

The app runs in this process without Ray (`raygen.serving.local`) on a free
port of 127.0.0.1: the checks live in the ASGI app itself (`guard.Guard`), the
same one every Serve replica runs. Busy (503 + Retry-After) and timeout (504)
answers are shown with the openai client in tests/test_openai_images.py.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

TOKEN = "limits-token-abcdef123456"


# ---------------------------------------------------------------- plain Python
def test_exposure_needs_a_token_or_insecure():
    from raygen.serving.app import check_exposure

    assert check_exposure("127.0.0.1", has_token=False, insecure=False) is None
    assert check_exposure("::1", has_token=False, insecure=False) is None
    assert check_exposure("0.0.0.0", has_token=True, insecure=False) is None
    with pytest.raises(ValueError, match="--token-file.*--insecure"):
        check_exposure("0.0.0.0", has_token=False, insecure=False)
    assert "WARNING" in check_exposure("0.0.0.0", has_token=False, insecure=True)


def test_token_comes_from_file_or_environment(tmp_path, monkeypatch):
    from raygen.serving.app import AppArgs, http_options
    from raygen.serving.guard import token_digest

    monkeypatch.delenv("RAYGEN_API_TOKEN", raising=False)
    assert http_options(AppArgs(model="x"))["token_sha256"] is None
    monkeypatch.setenv("RAYGEN_API_TOKEN", TOKEN)
    opts = http_options(AppArgs(model="x"))
    assert opts["token_sha256"] == token_digest(TOKEN) and TOKEN not in str(opts)  # only the digest travels
    (tmp_path / "t").write_text("file-token-1234\nignored\n")
    assert http_options(AppArgs(model="x", token_file=str(tmp_path / "t")))["token_sha256"] == \
        token_digest("file-token-1234")
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ValueError, match="at least 8"):
        http_options(AppArgs(model="x", token_file=str(tmp_path / "short")))


def test_file_store_expires(tmp_path):
    import os

    from raygen.serving.openai_images import FileStore

    store = FileStore(tmp_path / "f", ttl_s=60)
    name, expires = store.put(b"\x89PNG...", "png")
    assert store.get(name) == (b"\x89PNG...", "image/png") and expires > 0
    assert store.get("../../etc/passwd") is None and store.get("short.png") is None
    old = (tmp_path / "f" / name).stat().st_mtime - 120
    os.utime(tmp_path / "f" / name, (old, old))
    assert store.get(name) is None  # expired
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o700


# ---------------------------------------------------------------- over HTTP
def export_caption_seqimg(path):
    import torch

    from raygen.exports import export_generator
    from raygen.models import DataInfo, build_model
    from raygen.spec import parse_spec

    options = {"backbone": "gpt2", "dim": 32, "depth": 1, "conditioning": "caption"}
    spec = parse_spec({"name": "text", "data": {"resolution": 8, "channels": 1},
                       "model": {"family": "seqimg", "options": options}})
    info = DataInfo(channels=1, resolution=8, has_captions=True)
    torch.manual_seed(0)
    return export_generator(path, build_model("seqimg", options, info).state_dict(), spec, info)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from test_serving_http import export_seqimg

    from raygen.serving.local import LocalServer, build_local

    root = tmp_path_factory.mktemp("limits")
    export_seqimg(root / "seq")
    export_caption_seqimg(root / "text")
    (root / "token").write_text(TOKEN)
    # real families only: the toy's test hooks (explode) would be a 500 schemathesis rightly reports
    app = build_local({"models": [f"seq={root / 'seq'}", f"text={root / 'text'}"],
                       "serve": {"max_n": 4}, "token_file": str(root / "token"), "max_body_bytes": 64 * 1024,
                       "files_dir": str(root / "files")})
    with LocalServer(app.api) as server:
        yield server


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.slow
def test_token_is_required_except_on_open_routes(served):
    url = served.url
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}):
        r = httpx.post(f"{url}/v1/generate", json={"seed": 1}, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        assert r.json()["error"] and TOKEN not in r.text
        assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 401
    r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.post(f"{url}/v1/generate", json={"seed": 1}, headers=AUTH).status_code == 200
    # the playground page and liveness answer without a token
    assert httpx.get(f"{url}/").status_code == 200 and httpx.get(f"{url}/healthz").status_code == 200


@pytest.mark.slow
def test_large_bodies_get_413_unread(served):
    url = served.url
    # a Content-Length over the limit: refused at once (the 8 MB are never sent in full)
    r = httpx.post(f"{url}/v1/generate", content=b"{" + b" " * (8 << 20), headers=AUTH)
    assert r.status_code == 413 and r.json()["field"] == "body" and "limit" in r.json()["error"]
    # no Content-Length (chunked): counted as it arrives
    def chunks():
        for _ in range(64):
            yield b" " * 4096

    r = httpx.post(f"{url}/v1/images/generations", content=chunks(), headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # a chunked body under the limit is served
    r = httpx.post(f"{url}/v1/generate", content=iter([b'{"seed": ', b'3}']), headers=AUTH)
    assert r.status_code == 200, r.text
    # the token is checked first: no token, no reading
    assert httpx.post(f"{url}/v1/generate", content=b" " * (8 << 20)).status_code == 401


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(served, tmp_path):
    """Fuzz every operation of the OpenAPI schema (both models' request schemas, the OpenAI route,
    files, health) with the token; no answer may be a 5xx."""
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if cli is None:
        pytest.skip("schemathesis is not installed (it is in the test extras: pip install -e '.[test]')")
    run = subprocess.run(
        [cli, "run", f"{served.url}/openapi.json", "--checks", "not_a_server_error", "--max-examples", "25",
         "--seed", "1", "-H", f"Authorization: Bearer {TOKEN}", "--request-timeout", "30",
         "--generation-database", "none", "--phases", "examples,coverage,fuzzing"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)
    tail = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, tail
    assert "no issues found" in tail.lower() or "passed" in tail.lower(), tail
