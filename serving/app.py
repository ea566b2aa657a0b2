"""Build the raygen Serve application.

Three ways in, one builder:

- `raygen serve --model PATH` (see `raygen.jobs.cmd_serve`, which calls `serve_forever`);
- `serve run raygen.serving.app:build_app model=PATH` (Serve's app-builder args);
- `serve run serving/config_example.yaml` (the same args under `applications[].args`).

Models are loaded once here, in the driver, before anything is deployed: a
wrong path or a family that is not registered fails in a second with a
one-line error instead of after a round of replica restarts. The replicas
then load their own copy (so `models:/` URIs work on every node).
"""
# No `from __future__ import annotations` here: Serve reads build_app's signature at run time.
import importlib
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raygen.serving.loading import check_model_name, default_name, import_modules, parse_model_arg

APP_NAME = "raygen"
DEFAULT_SCORER_LOADER = "raygen.metrics:load_scorer"


def _split(value: Any) -> Any:
    # `serve run module:build_app key=a,b` hands over strings; YAML hands over lists
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class AppArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of a Serve config, or `key=value` after `serve run`)."""
    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(default_factory=list, description="model URIs or NAME=URI; the first is the default")
    model: Optional[str] = Field(None, description="one model (same as models: [URI])")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI for models:/ and runs:/ URIs")
    serve: dict[str, Any] = Field(default_factory=dict,
                                  description="overrides of the serve section, e.g. {max_n: 32, replicas: 2}")
    scorer: Optional[str] = Field(None, description="CLIP scorer spec for best_of reranking (given to load_scorer)")
    scorer_loader: str = Field(DEFAULT_SCORER_LOADER, description="MODULE:FUNCTION that turns the scorer spec into a scorer")
    imports: list[str] = Field(default_factory=list, description="modules or .py files that register extra model families")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs per generator replica")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs per generator replica (>0 samples on CUDA)")
    ingress_cpus: float = Field(0.1, gt=0)
    scorer_cpus: float = Field(1.0, gt=0)
    scorer_gpus: float = Field(0.0, ge=0)

    _split_lists = field_validator("models", "imports", mode="before")(_split)

    @field_validator("serve", mode="before")
    @classmethod
    def _serve_from_string(cls, value: Any) -> Any:
        if isinstance(value, str):  # "max_n=32,replicas=2" from the command line
            from raygen.spec.loader import parse_value
            pairs = [p.partition("=") for p in _split(value)]
            bad = [k for k, sep, _ in pairs if not sep]
            if bad:
                raise ValueError(f"serve overrides look like key=value, got {bad[0]!r}")
            return {k.strip(): parse_value(v) for k, _, v in pairs}
        return value

    @model_validator(mode="after")
    def _one_or_more_models(self) -> "AppArgs":
        if self.model:
            self.models = [self.model, *self.models]
            self.model = None
        if not self.models:
            raise ValueError("give at least one model: model=PATH_OR_URI (or models: [...])")
        return self


def resolve_serve_spec(base, overrides: Union[dict, list, None]):
    """The model's own serve section with overrides applied (keys with or without `serve.`)."""
    from pydantic import ValidationError

    from raygen.spec.errors import SpecError, format_pydantic_errors
    from raygen.spec.loader import parse_value, apply_overrides
    from raygen.spec.schema import ServeSpec

    raw = {"serve": (base or ServeSpec()).model_dump(mode="json")}
    items: dict[str, Any] = {}
    for item in (overrides.items() if isinstance(overrides, dict) else (overrides or [])):
        if isinstance(item, str):
            if "=" not in item:
                raise SpecError([f"override '{item}' must look like serve.key=value, e.g. serve.max_n=32"])
            key, _, text = item.partition("=")
            item = (key, parse_value(text))
        key, value = item
        key = key.strip()
        key = key if key.startswith("serve.") else f"serve.{key}"
        if key.count(".") != 1:
            raise SpecError([f"{key}: only serve.* keys can be set when serving (fields: {', '.join(ServeSpec.model_fields)})"])
        items[key] = value
    raw = apply_overrides(raw, items)
    try:
        return ServeSpec.model_validate(raw["serve"])
    except ValidationError as err:
        raise SpecError(format_pydantic_errors(err, ("serve",))) from None


def _absolute_uri(uri: str) -> str:
    # replicas do not share the driver's working directory: send them absolute paths
    if uri.startswith(("models:/", "runs:/")) or "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


def _absolute_tracking_uri(uri: Optional[str]) -> Optional[str]:
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if uri and "://" not in uri:
        return str(Path(uri).resolve())
    return uri


def _absolute_import(entry: str) -> str:
    return str(Path(entry).expanduser().resolve()) if entry.endswith(".py") or "/" in entry else entry


@dataclass
class ModelEntry:
    name: str
    uri: str
    family: str
    run_id: Optional[str]
    summary: str


@dataclass
class AppPlan:
    """What `plan_app` decided, for the CLI to print."""
    models: list[ModelEntry]
    serve: Any  # raygen.spec.ServeSpec
    reranking: str  # ready | off | unavailable
    notes: list[str] = field(default_factory=list)


def _scorer_available(loader: str) -> Optional[str]:
    """None when `loader` can be imported, else why not."""
    module, sep, func = loader.partition(":")
    if not sep or not module or not func:
        return f"scorer_loader {loader!r} must look like MODULE:FUNCTION"
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        return f"cannot import {module} ({err})"
    if not callable(getattr(mod, func, None)):
        return f"{module} has no {func}()"
    # the scorer deployment reranks with raygen.metrics.BestOfN whatever the loader
    if not hasattr(importlib.import_module("raygen.metrics"), "BestOfN"):
        return "raygen.metrics has no BestOfN"
    return None


def plan_app(args: Union[AppArgs, dict]):
    """Validate args, check every model loads, and bind the deployments. Returns (Application, AppPlan)."""
    from raygen.models.io import load_generator
    from raygen.serving.deployments import GeneratorServer, ScorerServer
    from raygen.serving.ingress import Ingress

    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    imports = [_absolute_import(e) for e in args.imports]
    tracking_uri = _absolute_tracking_uri(args.tracking_uri)
    import_modules(imports)

    entries: list[ModelEntry] = []
    base_serve = None
    for arg in args.models:
        name, uri = parse_model_arg(arg)
        uri = _absolute_uri(uri)
        loaded = load_generator(uri, tracking_uri)
        name = check_model_name(name or default_name(loaded))
        if any(e.name == name for e in entries):
            raise ValueError(f"two models are named {name!r}; name them apart with NAME=URI")
        info = loaded.data_info
        conditioning = (f"{info.num_classes} classes" if info.num_classes else "unconditional") + \
            (", captions" if info.has_captions else "")
        family = loaded.meta.get("family") or loaded.spec.model.family
        run_id = loaded.meta.get("run_id")
        entries.append(ModelEntry(name=name, uri=uri, family=family, run_id=run_id,
                                  summary=f"{family}, {info.resolution}x{info.resolution}x{info.channels}, {conditioning}"
                                          + (f", run {run_id}" if run_id else "")))
        if base_serve is None:
            base_serve = loaded.spec.serve
        del loaded  # the replicas load their own copy
    spec = resolve_serve_spec(base_serve, args.serve)

    notes = []
    reranking = "off"
    if args.scorer:
        missing = _scorer_available(args.scorer_loader)
        if missing:
            # the server still starts: best_of answers 501 and everything else serves normally
            reranking = "unavailable"
            notes.append(f"--scorer given but reranking is unavailable: {missing}; best_of requests will get 501")
        else:
            reranking = "ready"

    generators = {}
    for entry in entries:
        generators[entry.name] = GeneratorServer.options(
            name=f"generator-{entry.name}",
            num_replicas=spec.replicas,
            # room for one batch running and the next one filling; the rest wait in the bounded caller queue
            max_ongoing_requests=2 * spec.max_batch_size,
            max_queued_requests=spec.max_queued_requests,
            ray_actor_options={"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus},
            max_constructor_retry_count=3,
        ).bind(entry.name, entry.uri, tracking_uri=tracking_uri, imports=imports,
               max_batch_size=spec.max_batch_size, batch_wait_timeout_s=spec.batch_wait_timeout_s,
               replicas=spec.replicas, use_gpu=args.replica_gpus > 0)
    scorer = None
    if reranking == "ready":
        scorer = ScorerServer.options(
            name="scorer",
            max_ongoing_requests=4,
            max_queued_requests=spec.max_queued_requests,
            ray_actor_options={"num_cpus": args.scorer_cpus, "num_gpus": args.scorer_gpus},
            max_constructor_retry_count=3,
        ).bind(args.scorer, args.scorer_loader, tracking_uri=tracking_uri, use_gpu=args.scorer_gpus > 0)
    # The ingress only awaits, so it admits more than all generators together can hold: overload is
    # then refused by a generator's bounded queue as the app's JSON 503, not by the proxy in plain text
    # (the proxy's own queue check races under bursts and refuses early when its bound is tiny).
    ingress_limit = max(32, 2 * len(entries) * (spec.max_queued_requests + 2 * spec.max_batch_size * spec.replicas))
    ingress = Ingress.options(
        name="ingress",
        max_ongoing_requests=ingress_limit,
        max_queued_requests=ingress_limit,
        ray_actor_options={"num_cpus": args.ingress_cpus},
    ).bind(generators, scorer, default_model=entries[0].name, max_n=spec.max_n,
           request_timeout_s=spec.request_timeout_s, reranking=reranking)
    return ingress, AppPlan(models=entries, serve=spec, reranking=reranking, notes=notes)


def build_app(args: dict):
    """Serve app builder: `serve run raygen.serving.app:build_app model=PATH [serve=max_n=32] ...`."""
    app, plan = plan_app(args)
    for note in plan.notes:
        print(f"raygen.serving: {note}", file=sys.stderr)
    return app


# ---------------------------------------------------------------- running it (the CLI)
class DeployError(RuntimeError):
    """A deployment failed to start (a replica constructor raised); the message is its cause."""


def _deploy_failure(err: Exception) -> str:
    """One line per failed deployment, from Serve's status, ending in the replica's own error."""
    from ray import serve

    lines = []
    try:
        app = serve.status().applications.get(APP_NAME)
        for name, dep in (app.deployments.items() if app else []):
            if str(getattr(dep.status, "value", dep.status)) in ("HEALTHY", "UPDATING", "UPSCALING", "DOWNSCALING"):
                continue
            # the message ends with the replica's traceback; its last "Name: text" line is the cause
            causes = [ln.strip() for ln in (dep.message or "").splitlines()
                      if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b.*", ln.strip())]
            lines.append(f"deployment {name!r} failed to start: {causes[-1] if causes else dep.message or dep.status}")
    except Exception:  # noqa: BLE001 - fall back to Serve's own message
        pass
    return "; ".join(lines) or str(err)


class _Stop(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM so a stop can interrupt start-up too."""


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise OSError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port") from None


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}"


def serve_forever(args: AppArgs, *, host: Optional[str] = None, port: Optional[int] = None,
                  address: Optional[str] = None, out=sys.stdout) -> int:
    """Start Ray (embedded unless an address is given), run the app, block until SIGINT/SIGTERM, shut down."""
    import ray
    from ray import serve

    app, plan = plan_app(args)
    spec = plan.serve
    host = host or spec.host
    port = port or spec.port
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        _check_port(host, port)  # on an own cluster a busy port is certain to fail later, and obscurely

    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in stop_signals}

    def _on_signal(signum, frame):
        for s in stop_signals:  # a second signal falls back to the default (forceful) behaviour
            signal.signal(s, previous[s] if callable(previous[s]) else signal.SIG_DFL)
        raise _Stop(signal.Signals(signum).name)

    for s in stop_signals:
        signal.signal(s, _on_signal)

    started_ray = started_serve = False
    try:
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=True)
            else:
                # replicas import `--import` modules by name relative to where the command was run
                pythonpath = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
                ray.init(address="local", include_dashboard=False, object_store_memory=256 * 1024**2,
                         runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
                started_ray = True
        # Ray's core worker installs its own SIGTERM handler (it dumps a stack and aborts): take it back
        for s in stop_signals:
            signal.signal(s, _on_signal)
        # the proxy's own timeout sits a little above the app's, so clients get the app's JSON 504 first
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": spec.request_timeout_s + 5},
                    proxy_location="HeadOnly")
        started_serve = True
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as err:
            raise DeployError(_deploy_failure(err)) from None
        url = _url(host, port)
        for note in plan.notes:
            print(f"raygen serve: note: {note}", file=sys.stderr)
        lines = [f"raygen serve: {len(plan.models)} model(s) at {url}  (playground {url}/, API docs {url}/docs)"]
        for i, entry in enumerate(plan.models):
            lines.append(f"  {entry.name}: {entry.summary}{'  [default]' if i == 0 else ''}")
        lines.append(f"  best_of reranking: {plan.reranking}; max_n {spec.max_n}, batch {spec.max_batch_size}, "
                     f"queue {spec.max_queued_requests}, timeout {spec.request_timeout_s:g} s, "
                     f"{spec.replicas} replica(s) per model")
        lines.append("Press Ctrl-C (or send SIGTERM) to stop.")
        print("\n".join(lines), file=out, flush=True)
        while True:  # sleeps until a signal raises _Stop
            time.sleep(3600)
    except _Stop as stop:
        print(f"raygen serve: {stop} received, shutting down", file=out, flush=True)
    finally:
        for s in stop_signals:
            signal.signal(s, signal.SIG_DFL)  # one more signal during clean-up ends the process at once
        try:
            if started_serve:
                if started_ray:
                    serve.shutdown()
                else:
                    serve.delete(APP_NAME)  # a shared cluster may host other Serve apps: remove only ours
        finally:
            if started_ray:
                ray.shutdown()
            for s in stop_signals:
                signal.signal(s, previous[s])
    return 0
