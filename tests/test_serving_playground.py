"""The playground at `/` in a real headless Chromium (Debian's `chromium`, driven by playwright).

The app runs in this process without Ray (`raygen.serving.local`) on a free
port of 127.0.0.1, with a token so the page's token field is exercised too:
the page loads, asks for the token, builds its form from the selected model's
parameter schema, submits with best_of, and images appear with their scores; a model
whose sampling loop reports progress shows streamed previews before its final images.
Skipped, saying why, where playwright or chromium is missing. With
RAYGEN_UPDATE_SCREENSHOTS=1 it refreshes docs/img/playground.png.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import test_serving_family as toy
import test_serving_stream as stream

pytestmark = pytest.mark.slow  # starts a server and a browser

CHROMIUM = os.environ.get("RAYGEN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "playground-token-42"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "playground.png"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install playwright; no browser download "
                                          "needed: the test drives the system chromium)")
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (`make browser`, i.e. Debian: apt-get install chromium; or set RAYGEN_CHROMIUM)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from raygen.serving.local import LocalServer, build_local

    root = tmp_path_factory.mktemp("playground")
    toy.export_toy(root / "toy", name="shapes", resolution=16, channels=3, num_classes=4,
                   class_names=["circle", "square", "triangle", "star"], conditioning="label", run_id="run-shapes")
    toy.export_toy(root / "text", name="text", resolution=8, channels=3, conditioning="caption")
    stream.export(stream.tiny_seqimg(), root / "seq", "seq")  # its sampling loop sends previews
    (root / "token").write_text(TOKEN)
    app = build_local({"models": [str(root / "toy"), f"text={root / 'text'}", f"seq={root / 'seq'}"],
                       "imports": [toy.FILE],
                       "serve": {"max_n": 8}, "token_file": str(root / "token"),
                       "scorer": "brightness", "scorer_loader": "test_serving_family:load_brightness_scorer"})
    with LocalServer(app.api) as running:
        yield running


def test_playground_generates_in_chromium(browser, server, tmp_path):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(f"{server.url}/")
    # the server needs a token: the page says so and asks for it
    page.wait_for_selector("#token", state="visible", timeout=15000)
    page.fill("#token", TOKEN)
    page.dispatch_event("#token", "change")
    # the form is built from the default model's schemas: its label and its sampling parameters
    page.wait_for_selector("#param-temperature", timeout=15000)
    assert page.locator("#cond-label option").count() == 5  # (any) and the four classes
    assert page.locator("#param-style option").all_inner_texts() == ["plain", "inverted"]
    assert page.get_attribute("#param-temperature", "max") == "10"
    page.select_option("#cond-label", "2")
    page.fill("#n", "3")
    page.fill("#seed", "7")
    page.fill("#best_of", "6")
    page.fill("#prompt", "bright")
    page.click("#go")
    page.wait_for_selector("#images figure img", timeout=30000)
    captions = page.locator("#images figcaption").all_inner_texts()
    assert len(captions) == 3 and all("score" in c for c in captions), captions
    loaded = page.evaluate("Array.from(document.querySelectorAll('#images img')).every(i => i.complete && "
                           "i.naturalWidth === 16)")
    assert loaded
    assert "3 image(s) from shapes with seed 7" in page.inner_text("#status")
    # a model whose sampling loop reports its rows: the page shows streamed previews before the final images
    page.select_option("#model", "seq")
    page.wait_for_selector("#cond-label option[value='1']", state="attached")
    page.select_option("#cond-label", "1")
    page.fill("#n", "2")
    page.fill("#best_of", "")
    page.click("#go")
    page.wait_for_function("document.querySelector('#status').textContent.includes('from seq')", timeout=30000)
    assert page.get_attribute("#previews", "data-count") == "2"  # partial_images=2, each drawn as it came
    assert "step 5 of 8" in page.inner_text("#previews")
    assert page.locator("#images figure").count() == 2 and page.locator("#images figure.preview").count() == 0
    # another model rebuilds the form: a caption model has a caption field and no label
    page.select_option("#model", "text")
    page.wait_for_selector("#cond-caption")
    assert page.locator("#cond-label").count() == 0
    page.select_option("#model", "shapes")
    page.wait_for_selector("#images figure img")
    page.set_viewport_size({"width": 1000, "height": 820})
    # the docs' screenshot is refreshed only when asked: tests do not write into the tree
    shot = SCREENSHOT if os.environ.get("RAYGEN_UPDATE_SCREENSHOTS") else tmp_path / "playground.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 1000
    assert errors == []
    page.close()
