"""`raygen serve`: host generators over HTTP with Ray Serve until stopped."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve trained generators over HTTP (Ray Serve)",
        description="Start a Ray Serve app with one generator deployment per --model, print its URL and "
                    "serve until SIGINT/SIGTERM. API: POST /v1/generate, POST /v1/images/generations (OpenAI), "
                    "GET /v1/models, GET /healthz, "
                    "playground at /, OpenAPI docs at /docs.")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a Ray Serve config file (the one `serve deploy` takes, e.g. serving/config.yaml): its "
                        "raygen application's args, deployment settings and http_options; --host/--port win")
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]URI",
                   help="exported model folder, run or checkpoint folder, or models:/NAME/VERSION; "
                        "repeat to serve several (the first is the default)")
    p.add_argument("--multiplex", action="append", default=[], metavar="NAME=URI",
                   help="a model (e.g. a fine-tune) served from one shared deployment that loads models on demand "
                        "and drops the least recently used past --multiplex-per-replica (repeatable)")
    p.add_argument("--multiplex-per-replica", type=int, default=4, help="models a multiplex replica holds (4)")
    p.add_argument("--host", default=None, help="address to listen on (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default serve.port, 8000)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ and runs:/ URIs")
    p.add_argument("--set", action="append", default=[], metavar="serve.KEY=VALUE",
                   help="override the model's serve settings, e.g. --set serve.max_n=32 --set serve.replicas=2")
    p.add_argument("--scorer", default=None, metavar="CLIP_SPEC",
                   help="load a CLIP scorer (raygen.metrics.load_scorer) to enable best_of reranking")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local cluster)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import a module or .py file that registers an extra model family (repeatable)")
    p.add_argument("--replica-cpus", type=float, default=None,
                   help="CPUs per generator replica (default 1, or an equal share that fits the machine)")
    p.add_argument("--replica-gpus", type=float, default=0.0,
                   help="GPUs per generator replica; > 0 samples on CUDA (default 0)")
    p.add_argument("--token-file", default=None, metavar="PATH",
                   help="require 'Authorization: Bearer TOKEN' with the token on the file's first line "
                        "(default: the RAYGEN_API_TOKEN environment variable; neither: no token)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a --host beyond loopback (e.g. 0.0.0.0) without a token")
    p.add_argument("--in-process", action="store_true",
                   help="serve from this one process without Ray (same API; a few ms less per request, "
                        "no replicas, autoscaling or --address)")
    p.add_argument("--max-body-mb", type=float, default=None,
                   help="refuse larger request bodies with 413 before reading them (default 4)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pydantic import ValidationError

    from raygen.jobs.cli import UserError
    from raygen.models import CapabilityError
    from raygen.serving.app import AppArgs, DeployError, serve_forever

    config = None
    if args.config:
        from raygen.serving.config import read_config

        given = [f for f in ("model", "set", "scorer", "token_file", "max_body_mb", "tracking_uri", "imports",
                             "replica_cpus", "multiplex") if getattr(args, f)]
        if given:
            raise UserError(f"--config holds the models and settings: leave out --{given[0].replace('_', '-')} "
                            "(set it in the file's applications[].args)")
        try:
            config = read_config(args.config)
        except ValueError as err:
            raise UserError(str(err)) from None
        app_args = config.args
    elif not args.model:
        raise UserError("give --model PATH_OR_URI (repeatable) or --config FILE")
    else:
        try:
            app_args = AppArgs(models=args.model, tracking_uri=args.tracking_uri, serve=_overrides(args.set),
                               scorer=args.scorer, imports=args.imports, replica_cpus=args.replica_cpus,
                               replica_gpus=args.replica_gpus, token_file=args.token_file,
                               multiplex=args.multiplex, multiplex_per_replica=args.multiplex_per_replica,
                               **({"max_body_bytes": int(args.max_body_mb * 2**20)} if args.max_body_mb else {}))
        except ValidationError as err:
            first = err.errors()[0]
            raise UserError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    if args.port is not None and not 1 <= args.port <= 65535:
        raise UserError(f"--port must be 1..65535, got {args.port}")
    if args.in_process:
        if args.address:
            raise UserError("--in-process runs without Ray: leave out --address")
        from raygen.serving.local import serve_in_process
        try:
            return serve_in_process(app_args, host=args.host or (config and config.host),
                                    port=args.port or (config and config.port), insecure=args.insecure)
        except (OSError, ValueError, ImportError, CapabilityError) as err:
            raise UserError(str(err)) from None
    try:
        return serve_forever(app_args, host=args.host or (config and config.host),
                             port=args.port or (config and config.port), address=args.address,
                             insecure=args.insecure, deployments=config.deployments if config else None,
                             proxy_timeout_s=config.proxy_timeout_s if config else None)
    except DeployError as err:
        raise UserError(f"{err} (the replica logs under the Ray session folder have the traceback)") from None
    except (OSError, ValueError, ImportError, CapabilityError) as err:
        # a busy port, a missing --import file, two models with one name, CPUs that cannot hold the
        # replicas, a model that cannot sample: one line, no traceback
        from raygen.spec.errors import SpecError
        if isinstance(err, SpecError):
            raise
        raise UserError(str(err)) from None


def _overrides(items: list[str]) -> dict:
    from raygen.jobs.cli import UserError
    from raygen.spec.loader import parse_value

    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r} must look like serve.KEY=VALUE, e.g. serve.max_n=32")
        out[key.strip()] = parse_value(text)
    return out
