"""`raygen eval RUN_OR_CHECKPOINT`: the full metric set after the fact."""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("eval", help="compute FID/KID, val loss and bits/dim of a trained model")
    p.add_argument("model", help="run folder, checkpoint folder, exported model folder or models:/NAME/VERSION")
    p.add_argument("--samples", type=int, help="samples for FID/KID (default: the spec's track.fid.samples)")
    p.add_argument("--extractor", help="feature extractor: 'domain' or 'inception:PATH' (default: the spec's)")
    p.add_argument("--tracking-uri", help="MLflow store to read models:/ URIs from and log results to")
    p.add_argument("--no-log", action="store_true", help="do not log the results to the model's MLflow run")
    p.set_defaults(func=run)


def evaluate_model(loaded, *, samples: int | None = None, extractor: str | None = None) -> dict[str, float | str]:
    """Every metric the model's capabilities allow: FID/KID (sample), val loss and
    bits/dim (train), reconstruction error (reconstruct). A model with none of
    them gets the one-line capability error."""
    import torch

    from raygen.data import ensure_dataset, load_split_images
    from raygen.models import Capability, has, require
    from raygen.train.validation import validation_metrics, validation_sums
    from raygen.train.wrapup import compute_run_fid

    model = loaded.model
    if not any(has(model, c) for c in (Capability.SAMPLE, Capability.TRAIN, Capability.RECONSTRUCT)):
        require(model, Capability.SAMPLE)  # raises, naming the families that can be evaluated
    spec = loaded.spec
    if extractor:
        spec = spec.model_copy(update={"track": spec.track.model_copy(update={"fid": spec.track.fid.model_copy(update={"extractor": extractor})})})
    data_dir = ensure_dataset(spec.data)
    out: dict[str, float | str] = {}
    if has(model, Capability.SAMPLE):
        fid = compute_run_fid(spec, model, data_dir, samples or spec.track.fid.samples)
        out.update({"fid": fid["fid"], "kid": fid["kid"], "fid_samples": fid["n_generated"], "fid_extractor": fid["extractor"]})
        if "fid_floor" in fid:
            out["fid_floor"] = fid["fid_floor"]
        out.update({k: fid[k] for k in ("scene_psnr", "scene_ssim") if k in fid})  # scene models (renderer)
    val = load_split_images(data_dir, "val", spec.data, limit=512)
    if has(model, Capability.TRAIN):
        bs = spec.data.batch_size
        columns = [k for k, v in val.items() if k not in ("index", "corrupt_count")]
        batches = ({k: val[k][i:i + bs] for k in columns} for i in range(0, len(val["image"]), bs))
        out.update(validation_metrics(validation_sums(model, batches)))
    if has(model, Capability.RECONSTRUCT):
        from raygen.metrics import reconstruction_metrics
        with torch.no_grad():
            recon = model.reconstruct(val["image"][:256])
        out.update({f"recon_{k}": v for k, v in reconstruction_metrics(val["image"][:256], recon).items()})
    return out


def run(args) -> int:
    from raygen.jobs.cli import UserError
    from raygen.metrics.errors import MetricsError
    from raygen.models import CapabilityError
    from raygen.exports import load_generator

    if args.samples is not None and args.samples < 2:
        raise UserError(f"--samples {args.samples}: FID/KID need at least 2 samples")
    loaded = load_generator(args.model, args.tracking_uri)
    try:
        results = evaluate_model(loaded, samples=args.samples, extractor=args.extractor)
    except (MetricsError, CapabilityError) as err:  # e.g. missing Inception weights: the message says what to do
        raise UserError(str(err)) from None
    for k, v in results.items():
        print(f"{k:>20}: {v:.5g}" if isinstance(v, float) else f"{k:>20}: {v}")
    run_id = loaded.meta.get("run_id")
    tracking_uri = args.tracking_uri
    if not tracking_uri and loaded.meta.get("run_dir"):
        state = Path(loaded.meta["run_dir"]) / "run.json"
        if state.is_file():
            tracking_uri = json.loads(state.read_text())["tracking_uri"]
    if run_id and tracking_uri and not args.no_log:
        from raygen.tracking.store import TrackingRun
        run = TrackingRun(tracking_uri, run_id, "")
        run.log_metrics({f"eval_{k}": float(v) for k, v in results.items() if isinstance(v, (int, float))},
                        step=int(loaded.meta.get("step", 0)))
        if "fid_extractor" in results:
            run.set_tags({"eval.fid_extractor": results["fid_extractor"]})
        print(f"logged to MLflow run {run_id}")
    return 0
