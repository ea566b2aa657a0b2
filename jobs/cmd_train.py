"""`raygen train SPEC`: one training run on Ray Train."""
from __future__ import annotations

import os
import shlex


def add_run_options(p) -> None:
    p.add_argument("spec", help="job spec YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, e.g. train.steps=200")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded cluster)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<run_dir>/mlflow.db)")


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model from a job spec")
    add_run_options(p)
    p.add_argument("--resume", action="store_true", help="continue the newest run of this name from its last checkpoint")
    p.add_argument("--stop-after", type=int, metavar="STEP", help="pause at this step (with a checkpoint); resume later")
    p.set_defaults(func=run)


def run(args) -> int:
    from raygen.jobs.cli import UserError
    from raygen.spec import load_spec
    from raygen.train.cluster import ClusterError
    from raygen.train.runner import TrainingFailed, run_training

    spec = load_spec(args.spec, args.set)
    try:
        result = run_training(spec, resume=args.resume, tracking_uri=args.tracking_uri, address=args.address,
                              stop_after=args.stop_after, progress=not os.environ.get("RAYGEN_NO_PROGRESS"))
    except (ClusterError, TrainingFailed) as err:
        raise UserError(str(err)) from None
    print()
    print(f"Run finished in {result.seconds:.0f}s: {result.run_dir}")
    if result.metrics:
        shown = {k: result.metrics[k] for k in ("loss", "val_loss", "fid", "kid") if k in result.metrics}
        print("  metrics:    " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    if result.grid:
        print(f"  samples:    {result.grid}")
    if result.checkpoint:
        print(f"  checkpoint: {result.checkpoint}")
    print(f"  MLflow:     run {result.run_id} in {result.tracking_uri}")
    print(f"              browse it with: raygen ui --tracking-uri {shlex.quote(result.tracking_uri)}")
    if result.model_uri:
        print(f"  model:      {result.model_uri}")
        print("  serve it:   raygen serve --model " + shlex.quote(result.model_uri) +
              " --tracking-uri " + shlex.quote(result.tracking_uri))
    elif result.checkpoint:
        print(f"  paused; continue with: raygen train {shlex.quote(args.spec)} --resume")
    return 0
