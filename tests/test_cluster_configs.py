"""The cluster configs users deploy (issue 16, item 6): `cluster.yaml` passes
Ray's own cluster-launcher schema and holds what docs/cluster.md says; the
KubeRay RayJob runs a spec raygen accepts, on GPU workers, with token auth.
No cloud and no Kubernetes here: these check the files, not a deployment."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "cluster.md").read_text()


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((REPO / "deploy" / "kuberay" / "raygen-job.yaml").read_text())


def test_cluster_yaml_passes_rays_launcher_schema(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(dict(launcher)))  # what `ray up` checks first
    broken = yaml.safe_load((REPO / "cluster.yaml").read_text())
    broken["available_node_types"]["head"]["min_worker"] = 1  # a typo the schema must catch
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))


def test_cluster_yaml_holds_what_the_docs_say(launcher):
    types = launcher["available_node_types"]
    assert set(types) == {"head", "gpu_worker"} and launcher["head_node_type"] == "head"
    for name in types:
        assert f"`{name}`" in DOC
    gpu = types["gpu_worker"]
    assert gpu["node_config"]["InstanceType"] in DOC and gpu["max_workers"] == launcher["max_workers"]
    assert f"up to {gpu['max_workers']}" in DOC
    # setup: raygen installed from the synced project folder
    assert launcher["file_mounts"]["/home/ubuntu/raygen"] == "."
    (setup,) = launcher["setup_commands"]
    assert "pip install" in setup and "-e ." in setup and f"`{setup}`" in DOC
    # start commands: token auth on every node, dashboard for `raygen submit`, MLflow on the head
    head = [c for c in launcher["head_start_ray_commands"] if "ray start" in c]
    worker = [c for c in launcher["worker_start_ray_commands"] if "ray start" in c]
    assert len(head) == len(worker) == 1
    for command in head + worker:
        assert command.startswith("RAY_AUTH_MODE=token ray start") and f"`{command.split(' --autoscaling')[0]}" in DOC
    assert "--port=6379" in head[0] and "--dashboard-host=0.0.0.0" in head[0]
    assert "$RAY_HEAD_IP:6379" in worker[0]
    assert launcher["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    mlflow = next(c for c in launcher["head_start_ray_commands"] if "mlflow server" in c)
    assert "--port 5000" in mlflow and "http://HEAD:5000" in DOC and "http://HEAD:8265" in DOC


def _containers(rayjob: dict) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_the_rayjob_runs_a_spec_raygen_accepts_on_the_gpu_workers(rayjob):
    import ray

    from raygen.spec import load_spec
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    spec = rayjob["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__  # the image's Ray must be the one raygen is tested with
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["raygen", "train"] and (REPO / argv[2]).is_file()
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    job = load_spec(REPO / argv[2], overrides)  # the same checks `raygen train` makes on the cluster
    (gpus,) = cluster["workerGroupSpecs"]
    limits = gpus["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert job.scale.use_gpu and job.scale.workers == gpus["replicas"] * int(limits["nvidia.com/gpu"])
    assert gpus["minReplicas"] == gpus["replicas"] <= gpus["maxReplicas"]
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert spec["shutdownAfterJobFinishes"] is True


def test_every_rayjob_container_runs_the_raygen_image_with_token_auth(rayjob):
    containers = _containers(rayjob)
    assert len({c["image"] for c in containers}) == 1 and containers[0]["image"].endswith("/raygen:latest")
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "raygen-ray-token"  # never inline
        # every node reads s3:// with the same keys, from a secret too (docs/cluster.md: jobs never carry them)
        assert {"secretRef": {"name": "raygen-s3", "optional": True}} in c["envFrom"]
        assert not any(e["name"].startswith("AWS_") for e in c["env"])
    dockerfile = (REPO / "deploy" / "kuberay" / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+?)-py(\d)(\d+)-gpu$", dockerfile, re.M)
    assert base and base.group(1) == rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    for path in re.findall(r"^COPY --chown=\S+ (.+?) \S+$", dockerfile, re.M):
        for part in path.split():
            assert (REPO / part).exists(), part
    for words in ("deploy/kuberay/raygen-job.yaml", "kubectl apply", "raygen-ray-token", "nvidia.com/gpu"):
        assert words in DOC
