"""Build the raygen Serve application.

Three ways in, one builder:

- `raygen serve --model PATH` (see `raygen.jobs.cmd_serve`, which calls `serve_forever`);
- `serve run raygen.serving.app:build_app model=PATH` (Serve's app-builder args);
- `serve run serving/config.yaml` (the same args under `applications[].args`).

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
    replica_cpus: Optional[float] = Field(None, gt=0, description="CPUs per generator replica; default: 1, or an "
                                          "equal share that fits the cluster when 1 each does not")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs per generator replica (>0 samples on CUDA)")
    ingress_cpus: float = Field(0.1, gt=0)
    scorer_cpus: Optional[float] = Field(None, gt=0, description="CPUs of the scorer; default like replica_cpus")
    scorer_gpus: float = Field(0.0, ge=0)
    token_file: Optional[str] = Field(None, description="file whose first line is the bearer token every request "
                                      "must send (default: the RAYGEN_API_TOKEN environment variable; neither: no token)")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger request bodies get 413 unread")
    files_dir: Optional[str] = Field(None, description="where response_format=url images are kept (default: a "
                                     "folder in the system temp dir)")
    files_ttl_s: float = Field(3600.0, gt=0, description="how long a response_format=url link answers")
    multiplex: list[str] = Field(default_factory=list, description="NAME=URI models (e.g. fine-tunes) that share "
                                 "one deployment: a replica loads one when a request names it and drops the least "
                                 "recently used past multiplex_per_replica")
    multiplex_per_replica: int = Field(4, ge=1, description="models a multiplex replica holds at once")
    alias_poll_s: float = Field(30.0, ge=0, description="for models:/NAME@ALIAS: how often replicas ask the "
                                "registry where the alias points, and swap in a new version (0: never)")
    check_resources: bool = Field(True, description="refuse at once what the cluster's CPUs/GPUs cannot hold "
                                                    "(turn off on an autoscaling cluster that grows on demand)")

    _split_lists = field_validator("models", "imports", "multiplex", mode="before")(_split)

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
    card: dict = field(default_factory=dict)
    multiplexed: bool = False


@dataclass
class Sizing:
    """Resources per replica, decided by `size_replicas`."""
    replica_cpus: float
    scorer_cpus: float      # 0 without a scorer
    needed_cpus: float
    total_cpus: float
    free_cpus: float
    note: Optional[str] = None


@dataclass
class AppPlan:
    """What `plan_app` decided, for the CLI to print."""
    models: list[ModelEntry]
    serve: Any  # raygen.spec.ServeSpec
    reranking: str  # ready | off | unavailable
    notes: list[str] = field(default_factory=list)
    args: Optional[AppArgs] = None
    imports: list[str] = field(default_factory=list)
    tracking_uri: Optional[str] = None
    sizing: Optional[Sizing] = None
    http: dict = field(default_factory=dict)  # ingress.HttpOptions: what the front door checks

    @property
    def has_token(self) -> bool:
        return bool(self.http.get("token_sha256"))


class ResourceError(ValueError):
    """The cluster cannot hold the app's replicas: Serve would wait for them forever."""


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
    return None


def load_plan(args: Union[AppArgs, dict]) -> AppPlan:
    """Validate args and load every model once (no Ray needed): a wrong path, an
    unknown family or a model that cannot sample fails here, in one line."""
    from raygen.exports import load_generator
    from raygen.serving.loading import model_card, summary

    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    imports = [_absolute_import(e) for e in args.imports]
    tracking_uri = _absolute_tracking_uri(args.tracking_uri)
    import_modules(imports)

    entries: list[ModelEntry] = []
    base_serve = None
    for arg, multiplexed in [(a, False) for a in args.models] + [(a, True) for a in args.multiplex]:
        name, uri = parse_model_arg(arg)
        uri = _absolute_uri(uri)
        loaded = load_generator(uri, tracking_uri)
        name = check_model_name(name or default_name(loaded))
        if any(e.name == name for e in entries):
            raise ValueError(f"two models are named {name!r}; name them apart with NAME=URI")
        card = model_card(loaded, name=name)
        entries.append(ModelEntry(name=name, uri=uri, family=card["family"], run_id=card["run_id"],
                                  summary=summary(card) + (", multiplexed" if multiplexed else ""), card=card,
                                  multiplexed=multiplexed))
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
    return AppPlan(models=entries, serve=spec, reranking=reranking, notes=notes, args=args, imports=imports,
                   tracking_uri=tracking_uri, http=http_options(args))


TOKEN_ENV = "RAYGEN_API_TOKEN"


def http_options(args: AppArgs) -> dict:
    """The front door's settings; the token (from token_file or RAYGEN_API_TOKEN) only as its SHA-256."""
    from raygen.serving.guard import read_token, token_digest

    token = read_token(args.token_file) if args.token_file else os.environ.get(TOKEN_ENV, "").strip()
    if token and len(token) < 8:
        raise ValueError(f"{TOKEN_ENV} must hold at least 8 characters")
    return {"max_body_bytes": args.max_body_bytes, "token_sha256": token_digest(token) if token else None,
            "files_dir": str(Path(args.files_dir).expanduser().resolve()) if args.files_dir else None,
            "files_ttl_s": args.files_ttl_s}


def cluster_resources() -> tuple[float, float, float, str]:
    """(total CPUs, free CPUs, total GPUs, where): the connected Ray cluster's, or this
    machine's when Ray is not started yet (`serve run module:build_app` builds the
    app before it starts or joins a cluster)."""
    import ray

    if ray.is_initialized():
        total, free = ray.cluster_resources(), ray.available_resources()
        return float(total.get("CPU", 0)), float(free.get("CPU", 0)), float(total.get("GPU", 0)), "the Ray cluster"
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cpus = float(os.cpu_count() or 1)
    import torch  # loaded already: the models were just loaded with it

    gpus = float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
    return cpus, cpus, gpus, "this machine"


def _floor(x: float, step: float = 0.01) -> float:
    return round(int(x / step + 1e-9) * step, 4)


def size_replicas(args: AppArgs, *, generator_replicas: int, scorer: bool, total_cpus: float, free_cpus: float,
                  total_gpus: float = 0.0, where: str = "the Ray cluster", ingress: bool = True) -> Sizing:
    """CPUs per generator replica and for the scorer, so that every replica can be placed.

    A replica asks for 1 CPU unless told otherwise; when the free CPUs cannot hold
    1 each (two models on a 2-core laptop), replicas whose CPUs were not given
    share what is free equally (fractions of a CPU: sampling threads are set
    from it, not capped by it). Given values that cannot fit, or shares too
    small to be useful, are refused at once with the CPUs needed and available,
    instead of replicas that wait forever to be scheduled. ingress=False: no
    separate ingress replica (one model: its replicas hold the front door)."""
    ingress = args.ingress_cpus if ingress else 0.0
    fixed, units = ingress, 0
    if args.replica_cpus is None:
        units += generator_replicas
    else:
        fixed += args.replica_cpus * generator_replicas
    if scorer:
        if args.scorer_cpus is None:
            units += 1
        else:
            fixed += args.scorer_cpus
    share = 1.0
    budget = free_cpus if args.check_resources else max(free_cpus, fixed + units)
    if units:
        share = min(1.0, _floor((budget - fixed) / units))
    replica = args.replica_cpus if args.replica_cpus is not None else share
    scorer_cpus = (args.scorer_cpus if args.scorer_cpus is not None else share) if scorer else 0.0
    needed = round(ingress + replica * generator_replicas + scorer_cpus, 4)
    parts = [f"{generator_replicas} generator replica(s) x {replica:g}"]
    if scorer:
        parts.append(f"scorer {scorer_cpus:g}")
    if ingress:
        parts.append(f"ingress {ingress:g}")
    have = f"{where} has {total_cpus:g} CPUs ({free_cpus:g} free)"
    if args.check_resources:
        if units and share < 0.05:
            raise ResourceError(f"serving needs CPUs for {generator_replicas} generator replica(s)"
                                f"{' and a scorer' if scorer else ''} but {have}: less than 0.05 CPU each would be "
                                f"left; serve fewer models or replicas (serve.replicas), or use a bigger cluster")
        if needed > total_cpus + 1e-6:
            raise ResourceError(f"serving needs {needed:g} CPUs ({' + '.join(parts)}) but {have}, so replicas "
                                "would never be scheduled; lower --replica-cpus (replica_cpus) or leave it unset to "
                                "size replicas to fit, or serve fewer models or replicas")
        gpus = args.replica_gpus * generator_replicas + (args.scorer_gpus if scorer else 0.0)
        if gpus > total_gpus + 1e-6:
            raise ResourceError(f"serving needs {gpus:g} GPUs ({generator_replicas} generator replica(s) x "
                                f"{args.replica_gpus:g}{f' + scorer {args.scorer_gpus:g}' if scorer else ''}) but "
                                f"{where} has {total_gpus:g}; lower --replica-gpus or serve fewer replicas")
    note = None
    if needed > free_cpus + 1e-6:
        note = (f"replicas need {needed:g} CPUs but {free_cpus:g} of {total_cpus:g} are free now; they start once "
                "other work frees CPUs")
    return Sizing(replica_cpus=replica, scorer_cpus=scorer_cpus, needed_cpus=needed, total_cpus=total_cpus,
                  free_cpus=free_cpus, note=note)


def _override(deployment, settings: Optional[dict]):
    """A deployment with a config file's settings for it on top of raygen's (`ray_actor_options` merged)."""
    if not settings:
        return deployment
    settings = dict(settings)
    if "ray_actor_options" in settings:
        settings["ray_actor_options"] = {**(deployment.ray_actor_options or {}), **settings["ray_actor_options"]}
    if "autoscaling_config" in settings and "num_replicas" not in settings:
        settings["num_replicas"] = "auto"  # autoscaling replaces serve.replicas
    return deployment.options(**settings)


def bind_app(plan: AppPlan, *, resources: Optional[tuple] = None, merge: bool = True,
             deployments: Optional[dict] = None):
    """Size the replicas to the cluster and bind the deployments. Returns the Serve Application.

    resources: (total CPUs, free CPUs, total GPUs, where); default `cluster_resources()`.
    deployments: a config file's per-deployment settings, by deployment name (`config.read_config`)."""
    from raygen.serving.deployments import GeneratorServer, ModelServer, ScorerServer
    from raygen.serving.ingress import Ingress

    args, spec, entries = plan.args, plan.serve, plan.models
    total, free, gpus, where = resources or cluster_resources()
    muxed = [e for e in entries if e.multiplexed]
    dedicated = [e for e in entries if not e.multiplexed]
    sizing = size_replicas(args, generator_replicas=(len(dedicated) + bool(muxed)) * spec.replicas,
                           scorer=plan.reranking == "ready", total_cpus=total, free_cpus=free, total_gpus=gpus,
                           where=where, ingress=len(entries) > 1)
    plan.sizing = sizing
    if sizing.note and sizing.note not in plan.notes:
        plan.notes.append(sizing.note)

    scorer = None
    deployments = dict(deployments or {})
    names = (["scorer"] if plan.reranking == "ready" else []) + (
        [f"model-{entries[0].name}"] if len(entries) == 1 and not muxed else
        ["ingress"] + [f"generator-{e.name}" for e in dedicated] + (["multiplex"] if muxed else []))
    unknown = sorted(set(deployments) - set(names))
    if unknown:
        raise ValueError(f"the config names deployment {unknown[0]!r}, which this app does not have; its "
                         f"deployments are {', '.join(names)}")
    if plan.reranking == "ready":
        scorer = ScorerServer.options(
            name="scorer",
            max_ongoing_requests=4,
            max_queued_requests=spec.max_queued_requests,
            ray_actor_options={"num_cpus": sizing.scorer_cpus, "num_gpus": args.scorer_gpus},
            max_constructor_retry_count=3,
        )
        scorer = _override(scorer, deployments.get("scorer")).bind(
            args.scorer, args.scorer_loader, tracking_uri=plan.tracking_uri, imports=plan.imports,
            use_gpu=args.scorer_gpus > 0)
    # The front door only awaits, so it admits more than the models together can hold: overload is
    # then refused by a model's bounded queue as the app's JSON 503, not by the proxy in plain text
    # (the proxy's own queue check races under bursts and refuses early when its bound is tiny).
    ingress_limit = max(32, 2 * len(entries) * (spec.max_queued_requests + 2 * spec.max_batch_size * spec.replicas))
    if len(entries) == 1 and not muxed:
        # one model: the front door and the model share each replica (one Ray hop less per request)
        entry = entries[0]
        return _override(ModelServer.options(
            name=f"model-{entry.name}",
            num_replicas=spec.replicas,
            max_ongoing_requests=ingress_limit,
            max_queued_requests=ingress_limit,
            ray_actor_options={"num_cpus": sizing.replica_cpus, "num_gpus": args.replica_gpus},
            max_constructor_retry_count=3,
        ), deployments.get(f"model-{entry.name}")).bind(
               entry.name, entry.uri, scorer, card=entry.card, tracking_uri=plan.tracking_uri, imports=plan.imports,
               max_batch_size=spec.max_batch_size, batch_wait_timeout_s=spec.batch_wait_timeout_s,
               max_queued_requests=spec.max_queued_requests, replicas=spec.replicas,
               use_gpu=args.replica_gpus > 0, max_n=spec.max_n, request_timeout_s=spec.request_timeout_s,
               reranking=plan.reranking, merge=merge, http=plan.http, alias_poll_s=args.alias_poll_s)

    generators = {}
    for entry in dedicated:
        generators[entry.name] = _override(GeneratorServer.options(
            name=f"generator-{entry.name}",
            num_replicas=spec.replicas,
            # room for one batch running and the next one filling; the rest wait in the bounded caller queue
            max_ongoing_requests=2 * spec.max_batch_size,
            max_queued_requests=spec.max_queued_requests,
            ray_actor_options={"num_cpus": sizing.replica_cpus, "num_gpus": args.replica_gpus},
            max_constructor_retry_count=3,
        ), deployments.get(f"generator-{entry.name}")).bind(
               entry.name, entry.uri, tracking_uri=plan.tracking_uri, imports=plan.imports,
               max_batch_size=spec.max_batch_size, batch_wait_timeout_s=spec.batch_wait_timeout_s,
               replicas=spec.replicas, use_gpu=args.replica_gpus > 0, merge=merge, alias_poll_s=args.alias_poll_s)
    multiplexed = None
    if muxed:
        from raygen.serving.deployments import multiplex_deployment

        mux = _override(multiplex_deployment(args.multiplex_per_replica).options(
            name="multiplex",
            num_replicas=spec.replicas,
            max_ongoing_requests=2 * spec.max_batch_size * args.multiplex_per_replica,
            max_queued_requests=spec.max_queued_requests,
            ray_actor_options={"num_cpus": sizing.replica_cpus, "num_gpus": args.replica_gpus},
            max_constructor_retry_count=3,
        ), deployments.get("multiplex")).bind(
            {e.name: e.uri for e in muxed}, {e.name: e.card for e in muxed}, tracking_uri=plan.tracking_uri,
            imports=plan.imports, max_batch_size=spec.max_batch_size, batch_wait_timeout_s=spec.batch_wait_timeout_s,
            use_gpu=args.replica_gpus > 0, merge=merge)
        multiplexed = {"handle": mux, "models": [e.name for e in muxed]}
    return _override(Ingress.options(
        name="ingress",
        max_ongoing_requests=ingress_limit,
        max_queued_requests=ingress_limit,
        ray_actor_options={"num_cpus": args.ingress_cpus},
    ), deployments.get("ingress")).bind(
           generators, scorer, cards=[e.card for e in entries], imports=plan.imports,
           default_model=entries[0].name, max_n=spec.max_n, request_timeout_s=spec.request_timeout_s,
           reranking=plan.reranking, http=plan.http, multiplexed=multiplexed)


def plan_app(args: Union[AppArgs, dict], *, resources: Optional[tuple] = None, merge: bool = True,
             deployments: Optional[dict] = None):
    """Validate args, check every model loads, size the replicas and bind the deployments.
    Returns (Application, AppPlan)."""
    plan = load_plan(args)
    return bind_app(plan, resources=resources, merge=merge, deployments=deployments), plan


#: what a bad model or bad arguments raise: one line each, no traceback
def _load_errors() -> tuple:
    from raygen.models import CapabilityError
    from raygen.models.errors import ModelLoadError
    from raygen.spec.errors import SpecError
    return (ModelLoadError, CapabilityError, SpecError, ValueError, ImportError, OSError, KeyError)


class AppBuildError(RuntimeError):
    """build_app could not build the app; the message is the one-line cause."""


def build_app(args: dict):
    """Serve app builder: `serve run raygen.serving.app:build_app model=PATH [serve=max_n=32] ...`.

    A bad model or argument ends `serve run` with one line instead of a
    traceback (import path) or a hang (config file: Serve builds the app in a
    task and `serve run` would wait forever for an app that cannot build)."""
    try:
        app, plan = plan_app(args)
    except _load_errors() as err:
        message = _one_line(err)
        if _in_ray_task():
            print(f"raygen.serving: error: {message}", file=sys.stderr, flush=True)
            _stop_waiting_serve_run(args)
            raise AppBuildError(message) from None
        raise SystemExit(f"raygen.serving: error: {message}") from None
    for note in plan.notes:
        print(f"raygen.serving: {note}", file=sys.stderr)
    return app


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]  # KeyError's str() quotes its message
    return " ".join(text.split()) or type(err).__name__


def _in_ray_task() -> bool:
    """True inside a Ray worker (where Serve builds a config file's app), not in a driver."""
    try:
        import ray
        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001 - not knowable: treat as a driver
        return False


def _stop_waiting_serve_run(args: Any, grace_s: float = 2.0) -> Optional[int]:
    """Stop the `serve run CONFIG` process waiting for this build, if it runs on this node.

    `serve run` with a config file submits the config and then sleeps forever,
    whatever becomes of the build: nothing in Ray tells it the build failed.
    The build task belongs to the job of the driver that started Serve. That
    driver is stopped only when it is a `serve run` on this machine whose
    config file holds this very app (raygen's builder with these models); any
    other driver (`raygen serve`, a notebook, a `serve run` of other apps) is
    left alone. It gets SIGHUP (it ends at once, quietly, status 129; its
    embedded cluster goes with it), or SIGTERM when it ignores SIGHUP, after
    `grace_s` for the error line to reach its terminal. Returns the pid
    signalled, or None."""
    try:
        import ray
        import yaml
        from ray._private import state

        job_id = ray.get_runtime_context().get_job_id()
        node_ip = ray.util.get_node_ip_address()
        driver = next((j for j in state.jobs() if j["JobID"] == job_id and not j["IsDead"]), None)
        if driver is None or driver["DriverIPAddress"] not in (node_ip, "127.0.0.1", "localhost"):
            return None
        pid = int(driver["DriverPid"])
        argv = [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
        at = next((i for i, a in enumerate(argv[:-1]) if os.path.basename(a) == "serve" and argv[i + 1] == "run"),
                  None)
        if at is None:
            return None
        config = next((a for a in argv[at + 2:] if not a.startswith("-")), None)
        path = Path(os.readlink(f"/proc/{pid}/cwd")) / config if config else None
        if path is None or not path.is_file():
            return None
        apps = (yaml.safe_load(path.read_text()) or {}).get("applications") or []
        mine = [a for a in apps if a.get("import_path") == f"{__name__}:build_app"
                and {k: (a.get("args") or {}).get(k) for k in ("model", "models")} ==
                {k: (args or {}).get(k) for k in ("model", "models")}]
        if not mine:
            return None
        ignored = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                ignored = int(line.split()[1], 16)
        sig = signal.SIGTERM if ignored & (1 << (signal.SIGHUP - 1)) else signal.SIGHUP
        time.sleep(grace_s)
        os.kill(pid, sig)
        return pid
    except Exception:  # noqa: BLE001 - best effort: the error is raised to Serve either way
        return None


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


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(host: str, has_token: bool, insecure: bool) -> Optional[str]:
    """None, or the warning to print: listening beyond loopback without a token needs `insecure`."""
    if is_loopback(host) or has_token:
        return None
    if not insecure:
        raise ValueError(f"--host {host} listens beyond this machine but no token is set: give --token-file (or "
                         f"{TOKEN_ENV}), or pass --insecure to serve anyone who can reach the port")
    return (f"WARNING: listening on {host} without a token (--insecure): anyone who can reach the port can "
            "generate images")


def serve_forever(args: AppArgs, *, host: Optional[str] = None, port: Optional[int] = None,
                  address: Optional[str] = None, out=sys.stdout, insecure: bool = False,
                  deployments: Optional[dict] = None, proxy_timeout_s: Optional[float] = None) -> int:
    """Start Ray (embedded unless an address is given), run the app, block until SIGINT/SIGTERM, shut down."""
    import ray
    from ray import serve

    plan = load_plan(args)  # a bad model fails here, before Ray starts
    spec = plan.serve
    host = host or spec.host
    port = port or spec.port
    warning = check_exposure(host, plan.has_token, insecure)
    if warning:
        print(f"raygen serve: {warning}", file=sys.stderr, flush=True)
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
        app = bind_app(plan, deployments=deployments)  # sized to the cluster's CPUs, or refused at once when they cannot hold it
        # the proxy's own timeout sits a little above the app's, so clients get the app's JSON 504 first
        serve.start(http_options={"host": host, "port": port,
                                  "request_timeout_s": proxy_timeout_s or spec.request_timeout_s + 5},
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
        lines.append(f"  OpenAI images API: {url}/v1/images/generations; token: "
                     f"{'required' if plan.has_token else 'none (--token-file to require one)'}")
        lines.append(f"  best_of reranking: {plan.reranking}; max_n {spec.max_n}, batch {spec.max_batch_size}, "
                     f"queue {spec.max_queued_requests}, timeout {spec.request_timeout_s:g} s, "
                     f"{spec.replicas} replica(s) per model at {plan.sizing.replica_cpus:g} CPU")
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
