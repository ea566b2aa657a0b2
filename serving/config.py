"""`raygen serve --config FILE`: a Ray Serve config file (the one `serve run` and `serve deploy` take)
read by raygen itself.

The file is checked with Ray Serve's own schema (`ServeDeploySchema`), so a
file `raygen serve` accepts is one `serve deploy` accepts on a cluster. From
it raygen takes its application (the one whose import path is
`raygen.serving.app:build_app`): the `args` (`AppArgs`), the per-deployment
settings (replicas, autoscaling, CPUs and GPU fractions, limits), which are
applied over raygen's own choices (`app.bind_app`), and the host, port and
proxy timeout of `http_options`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

IMPORT_PATH = "raygen.serving.app:build_app"


@dataclass
class ServeConfig:
    args: Any                       # app.AppArgs
    host: Optional[str] = None
    port: Optional[int] = None
    proxy_timeout_s: Optional[float] = None
    deployments: dict[str, dict] = field(default_factory=dict)


def read_config(path: str | Path) -> ServeConfig:
    """The raygen application of a Serve config file; one-line ValueErrors for what is wrong."""
    import yaml
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from raygen.serving.app import AppArgs

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"--config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path}: not YAML ({' '.join(str(err).split())})") from None
    try:
        ServeDeploySchema.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"--config {path}: not a Ray Serve config: {where}: {first['msg']}") from None
    apps = [a for a in raw.get("applications") or [] if a.get("import_path") == IMPORT_PATH]
    if len(apps) != 1:
        raise ValueError(f"--config {path}: needs exactly one application with import_path {IMPORT_PATH}, "
                         f"found {len(apps)}")
    app = apps[0]
    try:
        args = AppArgs.model_validate(app.get("args") or {})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "args"
        raise ValueError(f"--config {path}: applications[].args.{where}: {first['msg']}") from None
    deployments = {}
    for entry in app.get("deployments") or []:
        entry = dict(entry)
        deployments[entry.pop("name")] = entry
    http = raw.get("http_options") or {}
    return ServeConfig(args=args, host=http.get("host"), port=http.get("port"),
                       proxy_timeout_s=http.get("request_timeout_s"), deployments=deployments)
