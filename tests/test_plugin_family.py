"""A third-party family from its own package (issue 10 item 6).

tests/plugin_family/ is a separate, tiny Python package (`raygen-plugin-demo`)
holding a conditional convolutional VAE written against the public protocol
(`raygen.models`: Family, Generator, SamplingParams, Conditions, DataInfo). It
declares itself in its own `[project.entry-points."raygen.families"]`; nothing
in raygen names it. The slow test pip-installs it into a temp folder and, with
that folder on PYTHONPATH only, lists, validates, trains (Ray, 2 workers),
samples and serves it through the `raygen` command, each in a fresh process
(the registry reads entry points once per process).
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "tests" / "plugin_family"
FAMILY = "democvae"


def raygen(env: dict, cwd: Path, *argv, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raygen.jobs.cli", *map(str, argv)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder, env for subprocesses): the plugin pip-installed from a copy
    of its source (building writes build/ and *.egg-info next to the source)."""
    root = tmp_path_factory.mktemp("plugin")
    source = root / "src"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = root / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                           "--no-index", "--disable-pip-version-check", "--target", str(site), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    sys.path.insert(0, str(site))
    yield site, env
    sys.path.remove(str(site))


# ------------------------------------------------------------------ the family itself, in plain torch
def test_plugin_model_learns_and_samples_per_image(tmp_path):
    """The plugin is a real model: its ELBO falls on digits, and each image's
    randomness comes from its own generator (a batch equals one-by-one)."""
    from raygen.data import load_split_images, prepare_dataset
    from raygen.models import Conditions, make_generators
    from raygen.spec import DataSpec

    sys.path.insert(0, str(PLUGIN))
    try:
        from raygen_plugin_demo import FAMILY as fam
        from raygen_plugin_demo.model import CVAEConfig, CVAESampling
    finally:
        sys.path.remove(str(PLUGIN))
    manifest = prepare_dataset("digits", tmp_path / "digits", resolution=8, count=400)
    spec = DataSpec(dataset=str(tmp_path / "digits"), resolution=8, channels=1)
    data = load_split_images(tmp_path / "digits", "train", spec)
    info = manifest.data_info(spec)
    torch.manual_seed(0)
    model = fam.build(CVAEConfig.debug(), info, {})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        pick = torch.randint(len(data["image"]), (32,), generator=g)
        loss = model.training_step({"image": data["image"][pick], "label": data["label"][pick]})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-10:]) / 10 < 0.85 * sum(losses[:10]) / 10, losses

    conds = Conditions.parse("label", [3, None, "7"], info)
    params = CVAESampling(temperature=0.8)
    batch = model.sample(conds, params, make_generators([5, 6, 7]))
    alone = torch.cat([model.sample(conds[i:i + 1], params, make_generators([5 + i])) for i in range(3)])
    assert batch.shape == (3, 1, 8, 8) and 0 <= float(batch.min()) and float(batch.max()) <= 1
    assert torch.allclose(batch, alone, atol=1e-6)
    cold = model.sample(Conditions.parse("label", [3, 3], info), CVAESampling(temperature=0), make_generators([1, 2]))
    assert torch.equal(cold[0], cold[1])  # temperature 0: the latent is the prior's mean whatever the seed


# ------------------------------------------------------------------ installed, then used through raygen only
@pytest.mark.slow
@pytest.mark.e2e  # several minutes on 2 cores: `make test-e2e`
@pytest.mark.timeout(900)  # five processes, two of which start Ray: several minutes when the 2 cores are shared
def test_installed_plugin_is_listed_trained_sampled_and_served(installed, tmp_path):
    import httpx
    from PIL import Image

    site, env = installed
    # the package carries its own entry point, visible to anything with the folder on its path
    ep = {e.name: e.value for e in entry_points(group="raygen.families")}
    assert ep.get(FAMILY) == "raygen_plugin_demo:FAMILY"
    listed = subprocess.run([sys.executable, "-c", "import json; from raygen.models import family_names, get_family; "
                             f"fam = get_family('{FAMILY}'); print(json.dumps([family_names(), "
                             "sorted(c.value for c in fam.capabilities), list(fam.conditions)]))"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    names, caps, conditions = json.loads(listed.stdout.strip().splitlines()[-1])
    assert {FAMILY, "seqimg"} <= set(names) and caps == ["sample", "train"] and conditions == ["none", "label"]

    spec = tmp_path / "plugin.yaml"
    spec.write_text(f"""
name: plugin
run_dir: {tmp_path / 'runs'}
data: {{dataset: digits, root: {tmp_path / 'data'}, resolution: 8, channels: 1, count: 300, batch_size: 16}}
model: {{family: {FAMILY}, options: {{conditioning: label, latent: 4, width: 8}}}}
train: {{steps: 4, eval_every: 2, checkpoint_every: 4, val_batches: 1, grid_samples: 4, log_every: 1,
         optimizer: {{lr: 3.0e-3}}, ema: {{enabled: false}}}}
scale: {{workers: 2, strategy: ddp}}
track: {{experiment: plugin, fid: {{enabled: false}}}}
""")
    ok = raygen(env, tmp_path, "spec", "validate", spec)
    assert ok.returncode == 0 and f"({FAMILY} model, 2 worker(s)" in ok.stdout, ok.stdout + ok.stderr

    trained = raygen(env, tmp_path, "train", spec)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    run = tmp_path / "runs" / "plugin"
    assert "Run finished" in trained.stdout and (run / "samples" / "final.png").is_file()
    model_line = next(line for line in trained.stdout.splitlines() if line.strip().startswith("metrics:"))
    assert "val_loss=" in model_line

    sampled = raygen(env, tmp_path, "sample", run, "-n", 4, "--label", 3, "--seed", 11,
                     "--set", "temperature=0.5", "--out", tmp_path / "grid.png")
    assert sampled.returncode == 0, sampled.stderr
    assert f"wrote 4 image(s) to {tmp_path / 'grid.png'}" in sampled.stdout
    assert Image.open(tmp_path / "grid.png").size[0] >= 16

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "raygen.jobs.cli", "serve", "--model", str(run),
                                 "--port", str(port), "--replica-cpus", "0.2"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while "Press Ctrl-C" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "raygen serve did not come up:\n" + log.read_text()[-4000:]
            time.sleep(0.5)
        models = httpx.get(url + "/v1/models", timeout=30).json()["models"]
        assert models[0]["family"] == FAMILY and "temperature" in models[0]["params"]["properties"]
        body = {"n": 2, "label": 3, "seed": 0, "temperature": 0.5}
        first = httpx.post(url + "/v1/generate", json=body, timeout=60)
        assert first.status_code == 200, first.text
        images = [Image.open(io.BytesIO(base64.b64decode(i["png_base64"]))) for i in first.json()["images"]]
        assert [im.size for im in images] == [(8, 8), (8, 8)]
        again = httpx.post(url + "/v1/generate", json=body, timeout=60).json()["images"]
        assert [i["png_base64"] for i in again] == [i["png_base64"] for i in first.json()["images"]]
        wrong = httpx.post(url + "/v1/generate", json={**body, "temperature": -1}, timeout=60)
        assert wrong.status_code in (400, 422) and "temperature" in wrong.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.slow
def test_installed_plugin_passes_the_conformance_suite(installed):
    """tests/families checks every registered family's debug flavors; with the
    plugin installed, that includes the plugin's."""
    _, env = installed
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "tests/families",
                           "-k", FAMILY], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = [line for line in done.stdout.splitlines() if " passed" in line]
    assert summary and int(summary[-1].split(" passed")[0].split()[-1]) >= 10, done.stdout[-2000:]  # 2 flavors
