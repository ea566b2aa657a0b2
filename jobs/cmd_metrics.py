"""`raygen metrics fit-features|fid|clip-score`: evaluation outside training."""
from __future__ import annotations

import argparse
import json
import sys



class _Gone(argparse.Action):
    """An option that was replaced: fail naming the replacement instead of 'unrecognized arguments'."""

    def __init__(self, option_strings, dest, replacement: str, **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was replaced by {self.replacement}: the domain feature net is fit by a "
                     f"fixed step count (never a time budget), so every machine trains the same net")


def _gone(parser, option: str, replacement: str) -> None:
    parser.add_argument(option, action=_Gone, replacement=replacement, dest=f"_gone{option.replace('-', '_')}")


def register(sub) -> None:
    p = sub.add_parser("metrics", help="FID/KID feature nets and scores, CLIP scores")
    s = p.add_subparsers(dest="metrics_command", metavar="ACTION", required=True)

    f = s.add_parser("fit-features", help="train a domain feature net on a dataset (for FID without Inception weights)")
    f.add_argument("dataset_dir", metavar="DATASET_DIR", help="a prepared dataset folder (raygen data prepare)")
    f.add_argument("--out", required=True, metavar="PATH", help="folder to write (weights.safetensors + config.json)")
    f.add_argument("--split", default="train")
    f.add_argument("--count", type=int, default=None,
                   help="use the first N images (default: as many as training fits on, so with --split train "
                        "the net matches the one training uses)")
    f.add_argument("--steps", type=int, default=None, help="optimizer steps (default: track.fid.fit_steps's default)")
    f.add_argument("--no-labels", action="store_true", help="ignore labels: self-supervised (contrastive) objective")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads while training (default 1; part of the net's id, since it changes the bits)")
    _gone(f, "--max-seconds", "--steps")
    _gone(f, "--max-steps", "--steps")
    f.set_defaults(func=fit_features)

    d = s.add_parser("fid", help="FID and KID of a folder of generated images against a dataset")
    d.add_argument("--generated", required=True, metavar="DIR", help="folder of generated PNG files")
    d.add_argument("--reference", required=True, metavar="DATASET_DIR", help="a prepared dataset folder")
    d.add_argument("--extractor", default="domain",
                   help="domain (train or reuse this dataset's feature net), domain:PATH_OR_ID, or inception:PATH")
    d.add_argument("--split", default="train", help="dataset split used as reference (default train)")
    d.add_argument("--reference-count", type=int, default=None, help="use at most this many reference images")
    d.add_argument("--cache-dir", default="runs/metrics-cache", help="feature nets and reference statistics cache")
    d.add_argument("--fit-steps", type=int, default=None,
                   help="with --extractor domain: optimizer steps when the net is fit the first time (default: "
                        "track.fid.fit_steps's default; another value is another net, with another id)")
    _gone(d, "--fit-seconds", "--fit-steps")
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
    from raygen.metrics.domain import FIT_IMAGES, fit_domain_features
    from raygen.metrics.imageio import load_dataset_images

    images, labels, _ = load_dataset_images(args.dataset_dir, args.split, count=args.count or FIT_IMAGES)
    if args.no_labels:
        labels = None
    log = None if not sys.stderr.isatty() else (lambda m: print(m, file=sys.stderr))
    steps = {"steps": args.steps} if args.steps is not None else {}
    ext = fit_domain_features(images, labels, out=args.out, seed=args.seed, threads=args.threads, log=log, **steps)
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

    ref, _, _ = load_dataset_images(args.reference, args.split)
    gen = read_image_folder(args.generated, channels=ref.shape[1])
    # the domain net is fit on the dataset's own fit images (not on --split): the net training uses
    fit = {"steps": args.fit_steps} if args.extractor == "domain" and args.fit_steps is not None else {}
    ext = get_dataset_extractor(args.extractor, args.reference, cache_dir=args.cache_dir, device=args.device, **fit)
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
