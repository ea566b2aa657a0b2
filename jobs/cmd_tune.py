"""`raygen tune SPEC`: a Ray Tune sweep over `tune.space`."""
from __future__ import annotations

import os

from raygen.jobs.cmd_train import add_run_options


def register(sub) -> None:
    p = sub.add_parser("tune", help="search hyperparameters over the spec's tune.space")
    add_run_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from raygen.jobs.cli import UserError
    from raygen.spec import load_spec
    from raygen.train.cluster import ClusterError
    from raygen.tune import run_tune

    spec = load_spec(args.spec, args.set)
    try:
        result = run_tune(spec, tracking_uri=args.tracking_uri, address=args.address,
                          progress=not os.environ.get("RAYGEN_NO_PROGRESS"), verbose=args.verbose)
    except ClusterError as err:
        raise UserError(str(err)) from None
    metric = spec.tune.metric
    keys = sorted({k for t in result.trials for k in t["overrides"]})
    print()
    print(f"{len(result.trials)} trial(s); {metric} per trial:")
    for t in sorted(result.trials, key=lambda t: t["metrics"].get(metric, float("inf"))):
        shown = ", ".join(f"{k}={t['overrides'].get(k)}" for k in keys)
        val = t["metrics"].get(metric)
        extra = f"  fid={t['metrics']['fid']:.2f}" if "fid" in t["metrics"] else ""
        print(f"  {metric}={val:.4f}{extra}  {shown}" if val is not None else f"  (no result: {t['error']})  {shown}")
    print(f"best: {metric}={result.best_metrics[metric]:.4f} with " +
          " ".join(f"--set {k}={v}" for k, v in result.best_overrides.items()))
    print(f"MLflow parent run {result.parent_run_id} in {result.tracking_uri}; results in {result.sweep_dir}/results.json")
    if result.model_uri:
        print(f"best model: {result.model_uri}; serve it: raygen serve --model {result.model_uri} --tracking-uri {result.tracking_uri}")
    return 0
