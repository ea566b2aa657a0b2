"""`raygen tune SPEC [--resume]`: a Ray Tune sweep over `tune.space`;
`raygen tune best RUN`: the best trial's full spec (YAML on stdout)."""
from __future__ import annotations

import argparse
import os
import sys

from raygen.jobs.cmd_train import add_run_options


def register(sub) -> None:
    p = sub.add_parser("tune", help="search hyperparameters over the spec's tune.space (or: tune best RUN)",
                       description="raygen tune SPEC runs a sweep; raygen tune SPEC --resume continues the newest "
                                   "interrupted sweep of that spec; raygen tune best RUN > best.yaml writes the best "
                                   "trial's full spec (RUN: the sweep folder or its MLflow parent run id).")
    add_run_options(p)
    p.add_argument("run", nargs="?", help=argparse.SUPPRESS)  # raygen tune best RUN
    p.add_argument("--resume", action="store_true",
                   help="continue the newest sweep of this spec: finished trials are kept, unfinished ones continue "
                        "from their checkpoints")
    p.set_defaults(func=run)


def run(args) -> int:
    from raygen.jobs.cli import UserError

    if args.spec == "best":
        return best(args)
    if args.run:
        raise UserError(f"unexpected argument {args.run!r}: raygen tune SPEC, or raygen tune best RUN")
    from raygen.spec import load_spec
    from raygen.train.cluster import ClusterError
    from raygen.tune import run_tune

    spec = load_spec(args.spec, args.set)
    try:
        result = run_tune(spec, tracking_uri=args.tracking_uri, address=args.address, resume=args.resume,
                          progress=not os.environ.get("RAYGEN_NO_PROGRESS"), verbose=args.verbose)
    except ClusterError as err:
        raise UserError(str(err)) from None
    print()
    print(f"{len(result.trials)} trial(s):")
    print(result.table)
    print("best: " + ", ".join(f"{k}={result.best_metrics[k]:.4g}" for k in _objectives(spec)) + " with " +
          " ".join(f"--set {k}={v}" for k, v in result.best_overrides.items()))
    print(f"MLflow parent run {result.parent_run_id} in {result.tracking_uri}; results in {result.sweep_dir}/results/")
    print(f"best spec: raygen tune best {result.sweep_dir} > best.yaml")
    if result.model_uri:
        print(f"best model: {result.model_uri} ({result.promotion}); serve it: "
              f"raygen serve --model {result.model_uri} --tracking-uri {result.tracking_uri}")
    return 0


def _objectives(spec) -> list[str]:
    from raygen.tune.objective import shown_metrics
    return shown_metrics(spec.tune)


def best(args) -> int:
    import yaml

    from raygen.jobs.cli import UserError
    from raygen.tune.results import best_spec, load_sweep

    if not args.run:
        raise UserError("raygen tune best RUN: give the sweep folder (runs/NAME-tune) or its MLflow parent run id")
    try:
        base, results = load_sweep(args.run, args.tracking_uri)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    sys.stdout.write(yaml.safe_dump(best_spec(base, results["best"]["overrides"]), sort_keys=False))
    return 0
