"""`raygen metrics fit-features|fid|clip-score`: evaluation outside training."""
from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("metrics", help="FID/KID feature nets and scores, CLIP scores")
    s = p.add_subparsers(dest="metrics_command", metavar="ACTION", required=True)

    f = s.add_parser("fit-features", help="train a domain feature net on a dataset (for FID without Inception weights)")
    f.add_argument("dataset_dir", metavar="DATASET_DIR", help="a prepared dataset folder (raygen data prepare)")
    f.add_argument("--out", required=True, metavar="PATH", help="folder to write (weights.safetensors + config.json)")
    f.add_argument("--split", default="train")
    f.add_argument("--count", type=int, default=None, help="use at most this many images")
    f.add_argument("--max-seconds", type=float, default=30.0, help="training time bound (default 30)")
    f.add_argument("--max-steps", type=int, default=3000)
    f.add_argument("--no-labels", action="store_true", help="ignore labels: self-supervised (contrastive) objective")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=int, default=None, help="torch CPU threads while training (default: torch's)")
    f.set_defaults(func=fit_features)

    d = s.add_parser("fid", help="FID and KID of a folder of generated images against a dataset")
    d.add_argument("--generated", required=True, metavar="DIR", help="folder of generated PNG files")
    d.add_argument("--reference", required=True, metavar="DATASET_DIR", help="a prepared dataset folder")
    d.add_argument("--extractor", default="domain",
                   help="domain (train or reuse this dataset's feature net), domain:PATH_OR_ID, or inception:PATH")
    d.add_argument("--split", default="train", help="dataset split used as reference (default train)")
    d.add_argument("--reference-count", type=int, default=None, help="use at most this many reference images")
    d.add_argument("--cache-dir", default="runs/metrics-cache", help="feature nets and reference statistics cache")
    d.add_argument("--fit-seconds", type=float, default=30.0,
                   help="with --extractor domain: time bound for training the feature net the first time")
    d.add_argument("--device", default="cpu")
    d.add_argument("--kid-subsets", type=int, default=100)
    d.add_argument("--kid-subset-size", type=int, default=1000)
    d.set_defaults(func=fid)

    c = s.add_parser("clip-score", help="CLIPScore of a folder of images against one prompt")
    c.add_argument("--images", required=True, metavar="DIR")
    c.add_argument("--prompt", required=True)
    c.add_argument("--scorer", required=True, help="hf:PATH (local CLIP folder) or clip:PATH (model.family clip)")
    c.add_argument("--device", default="cpu")
    c.set_defaults(func=clip_score)


def _user_errors(fn):
    """MetricsError carries a message meant for the user: show it without a traceback."""
    def run(args):
        from raygen.jobs.cli import UserError
        from raygen.metrics.errors import MetricsError
        try:
            return fn(args)
        except MetricsError as err:
            raise UserError(str(err)) from None
    return run


@_user_errors
def fit_features(args) -> int:
    from raygen.metrics.domain import fit_domain_features
    from raygen.metrics.imageio import load_dataset_images
    from raygen.metrics.reference import dataset_checksum

    images, labels, _ = load_dataset_images(args.dataset_dir, args.split, count=args.count)
    if args.no_labels:
        labels = None
    log = None if not sys.stderr.isatty() else (lambda m: print(m, file=sys.stderr))
    ext = fit_domain_features(images, labels, out=args.out, max_seconds=args.max_seconds, max_steps=args.max_steps,
                              seed=args.seed, num_threads=args.threads,
                              dataset_checksum=dataset_checksum(images, labels), log=log)
    t = ext.training
    extra = f", train accuracy {t['train_accuracy']:.3f}" if "train_accuracy" in t else ""
    print(f"wrote {ext.path} ({ext.name}; {t['objective']}, {t['steps']} steps in {t['seconds']:.1f}s{extra})")
    print(f"use it with: track.fid.extractor: domain:{ext.path}")
    return 0


@_user_errors
def fid(args) -> int:
    from raygen.metrics.fid import compute_fid, get_dataset_extractor
    from raygen.metrics.imageio import load_dataset_images, read_image_folder
    from raygen.metrics.reference import dataset_checksum

    ref, labels, _ = load_dataset_images(args.reference, args.split)
    gen = read_image_folder(args.generated, channels=ref.shape[1])
    fit = {"max_seconds": args.fit_seconds} if args.extractor == "domain" else {}
    ext = get_dataset_extractor(args.extractor, args.reference, ref, labels, args.cache_dir, device=args.device, **fit)
    result = compute_fid(gen, ref, ext, reference_count=args.reference_count, cache_dir=args.cache_dir,
                         reference_checksum=dataset_checksum(ref), kid_subsets=args.kid_subsets,
                         kid_subset_size=args.kid_subset_size)
    print(json.dumps(result, indent=2))
    return 0


@_user_errors
def clip_score(args) -> int:
    from raygen.metrics.clip import load_scorer
    from raygen.metrics.imageio import read_image_folder

    images = read_image_folder(args.images)
    scores = load_scorer(args.scorer, device=args.device).score(images, args.prompt)
    print(json.dumps({"clip_score": float(scores.mean()), "n": int(scores.numel()),
                      "scores": [round(float(s), 4) for s in scores]}, indent=2))
    return 0
