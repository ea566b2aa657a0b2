"""`raygen train SPEC`: one training run on Ray Train."""
from __future__ import annotations

import os
import shlex


def add_run_options(p) -> None:
    p.add_argument("spec", help="job spec YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, e.g. train.steps=200")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded cluster)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<run_dir>/mlflow.db)")
    p.add_argument("--token-file", dest="ray_token_file", metavar="FILE", help="file holding the cluster's Ray auth token (a cluster started with "
                   "RAY_AUTH_MODE=token); default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show library output (Ray, DeepSpeed, torch, MLflow) on the console; it is always in "
                        "the run's run.log")


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model from a job spec")
    add_run_options(p)
    p.add_argument("--resume", action="store_true", help="continue the newest run of this name from its last checkpoint")
    p.add_argument("--stop-after", type=int, metavar="STEP", help="pause at this step (with a checkpoint); resume later")
    p.add_argument("--dry-run", action="store_true",
                   help="print the parameter count and a per-worker memory estimate for the spec's strategy; train nothing")
    p.set_defaults(func=run)


def run(args) -> int:
    from raygen.jobs.cli import UserError
    from raygen.spec import load_spec
    from raygen.train.cluster import ClusterError
    from raygen.train.runner import TrainingFailed, run_training

    from raygen.spec.loader import read_spec_file
    from raygen.spec.pipeline import is_pipeline
    if is_pipeline(read_spec_file(args.spec)):
        if args.dry_run:
            raise UserError("--dry-run applies to one job spec; run it on a stage's spec")
        return run_pipeline_command(args)
    if args.dry_run:
        return dry_run_command(args)
    overrides = resume_overrides(args.spec, args.set) if args.resume else list(args.set)
    spec = load_spec(args.spec, overrides)
    try:
        result = run_training(spec, resume=args.resume, tracking_uri=args.tracking_uri, address=args.address,
                              stop_after=args.stop_after, progress=not os.environ.get("RAYGEN_NO_PROGRESS"),
                              overrides=overrides, verbose=args.verbose)
    except (ClusterError, TrainingFailed) as err:
        raise UserError(str(err)) from None
    print()
    print(f"Run finished in {result.seconds:.0f}s: {result.run_dir}")
    if result.metrics:
        shown = {k: result.metrics[k] for k in ("loss", "val_loss", "fid", "kid") if k in result.metrics}
        print("  metrics:    " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        from raygen.train.memory import peak_summary
        peaks = peak_summary(result.metrics)
        if peaks:
            print(f"  peak RSS:   {peaks} per worker")
    if result.placement:
        print(f"  workers on: {result.placement}")
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
        print(f"  paused; continue with: {resume_command(args, overrides)}")
    return 0


def dry_run_command(args) -> int:
    from raygen.spec import load_spec
    from raygen.train.dry_run import dry_run

    estimate = dry_run(load_spec(args.spec, list(args.set)), args.tracking_uri)
    print("\n".join(estimate.lines()))
    return 0


def _key(item: str) -> str:
    return item.partition("=")[0].strip()


def resume_overrides(spec_path: str, given: list[str]) -> list[str]:
    """The `--set` items the run was started with (run.json), then those given
    now: resuming continues the same spec, and a key given again wins."""
    import json

    from raygen.spec import load_spec
    from raygen.train.runner import pick_run_dir

    run_dir = pick_run_dir(load_spec(spec_path, given), resume=True)
    state = run_dir / "run.json"
    stored = json.loads(state.read_text()).get("overrides", []) if state.is_file() else []
    merged = {_key(item): item for item in [*stored, *given]}
    if stored:
        print(f"[raygen] resuming {run_dir} with its overrides: " + " ".join(f"--set {shlex.quote(s)}" for s in stored),
              flush=True)
    return list(merged.values())


def resume_command(args, overrides: list[str]) -> str:
    """The whole command that continues this run: same spec, every override, same cluster and store."""
    parts = ["raygen", "train", shlex.quote(args.spec), "--resume"]
    parts += [f"--set {shlex.quote(item)}" for item in overrides]
    if args.address:
        parts.append(f"--address {shlex.quote(args.address)}")
    if args.tracking_uri:
        parts.append(f"--tracking-uri {shlex.quote(args.tracking_uri)}")
    if getattr(args, "ray_token_file", None):  # the file's path, never the token
        parts.append(f"--token-file {shlex.quote(args.ray_token_file)}")
    return " ".join(parts)


def run_pipeline_command(args) -> int:
    """A spec with `stages:` runs them in order; a rerun skips finished stages and resumes the first unfinished."""
    from raygen.jobs.cli import UserError
    from raygen.spec.pipeline import load_pipeline
    from raygen.train.cluster import ClusterError
    from raygen.train.pipeline import run_pipeline
    from raygen.train.runner import TrainingFailed

    if args.stop_after is not None:
        raise UserError("--stop-after applies to one job spec; a pipeline resumes by running it again")
    pipeline, base = load_pipeline(args.spec, args.set)
    try:
        result = run_pipeline(pipeline, base, tracking_uri=args.tracking_uri, address=args.address,
                              progress=not os.environ.get("RAYGEN_NO_PROGRESS"))
    except (ClusterError, TrainingFailed, RuntimeError) as err:
        raise UserError(str(err)) from None
    print()
    print(f"Pipeline {pipeline.name} finished: {result.folder}")
    for name in pipeline.stages:
        how = "skipped, finished earlier" if name in result.skipped else "ran"
        output = result.models.get(name) or f"latents {result.data.get(name)}"
        print(f"  {name}: {output}  ({how})")
    print(f"  MLflow: parent run {result.parent_run_id} in {result.tracking_uri}")
    return 0
