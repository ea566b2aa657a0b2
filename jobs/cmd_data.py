"""`raygen data prepare|show|list|encode`: build, inspect, list and encode datasets."""
from __future__ import annotations

import argparse


def _size(text: str) -> int | list[int]:
    """"16" -> 16; "12x20" -> [12, 20] (height, width)."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give one number (a square) or HEIGHTxWIDTH, e.g. 12x20") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one number (a square) or HEIGHTxWIDTH, e.g. 12x20")
    return values[0] if len(values) == 1 or values[0] == values[1] else values


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare, inspect and list datasets")
    s = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    pr = s.add_parser("prepare", help="generate or import a dataset into parquet shards + manifest.json",
                      description="NAME is a built-in dataset (see `raygen data list`) or a path/glob to import "
                                  "(an image folder, parquet files, webdataset .tar files). For `folder`, "
                                  "`parquet` and `webdataset`, give the source as PATH.")
    pr.add_argument("name", metavar="NAME")
    pr.add_argument("path", metavar="PATH", nargs="?", help="source for folder/parquet/webdataset (same as --source)")
    pr.add_argument("--out", required=True, metavar="DIR", help="folder to write (empty, new, or an earlier dataset), "
                    "or s3://BUCKET/PATH (endpoint and keys from the AWS_* variables)")
    pr.add_argument("--resolution", type=_size, metavar="SIDE|HxW",
                    help="image side in pixels, or HEIGHTxWIDTH for non-square images (default: the dataset's own)")
    pr.add_argument("--channels", type=int, choices=(1, 3), help="1 (grey) or 3 (RGB); default: the dataset's own")
    pr.add_argument("--count", type=int, help="training images (default: all, or the generator's default)")
    pr.add_argument("--seed", type=int, default=0, help="generation and split seed (default 0)")
    pr.add_argument("--val-fraction", type=float, default=0.1, help="share of images held out for validation")
    pr.add_argument("--source", help="raw source path overriding the built-in default")
    pr.add_argument("--shard-mb", type=float, default=32.0, help="upper bound of one shard's size in MiB")
    pr.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                    help="dataset-specific option, e.g. --opt max_spheres=3 (repeatable)")
    pr.set_defaults(func=prepare)

    sh = s.add_parser("show", help="print a prepared dataset's counts, classes and captions; optionally a grid PNG")
    sh.add_argument("dir", metavar="DIR", nargs="+", help="prepared dataset folder(s), e.g. runs/data/fashion-mnist-*")
    sh.add_argument("--grid", metavar="PATH", help="write a PNG grid of training samples here "
                                                   "(with several DIRs: PATH's name plus each folder's name)")
    sh.add_argument("--samples", type=int, default=64, help="images in the grid (default 64)")
    sh.add_argument("--verify", action="store_true", help="check every shard's sha256 against the manifest")
    sh.set_defaults(func=show)

    ls = s.add_parser("list", help="list the built-in datasets")
    ls.set_defaults(func=list_datasets)

    en = s.add_parser("encode", help="encode a dataset with a frozen encoder into a latent dataset (parquet + manifest)",
                      description="MODEL (a run folder, an export folder or a models:/ URI) must have the 'encode' "
                                  "capability. DATA is a prepared dataset folder or a built-in name (prepared with "
                                  "the model's own data settings). Runs as a Ray Train job over --workers; an "
                                  "interrupted encode resumes when run again with the same MODEL, DATA and options.")
    en.add_argument("model", metavar="MODEL")
    en.add_argument("data", metavar="DATA")
    en.add_argument("--out", required=True, metavar="DIR", help="folder to write (empty, new, or an earlier encode)")
    en.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
    en.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default 64)")
    en.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="how latents are stored")
    en.add_argument("--shard-rows", type=int, help="rows per output shard (default: about 8 shards per split, "
                                                   "at most 32 MiB each)")
    en.add_argument("--threads", type=int, default=1,
                    help="CPU threads per encoder call, the same on every worker (default 1; part of the output: "
                         "another count may round differently)")
    en.add_argument("--data-root", metavar="DIR", help="where a built-in DATA is prepared (default: the model's)")
    en.add_argument("--count", type=int, help="training images of a built-in DATA (default: the model's)")
    en.add_argument("--gpu", action="store_true", help="encode on one GPU per worker")
    en.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or an embedded cluster)")
    en.add_argument("--tracking-uri", help="log an MLflow run of the encode there")
    en.add_argument("--stop-after-batches", type=int, metavar="N",
                    help="debug: each worker stops after N batches (run again to resume)")
    en.add_argument("--verbose", action="store_true", help="show Ray's and the libraries' messages")
    en.set_defaults(func=encode)


def _options(pairs: list[str]) -> dict:
    import yaml

    from raygen.data import DataError
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DataError(f"--opt {pair!r}: expected KEY=VALUE, e.g. --opt max_spheres=3")
        out[key.strip()] = yaml.safe_load(value)
    return out


def prepare(args: argparse.Namespace) -> int:
    from raygen.data import DataError, prepare_dataset
    from raygen.data.images import size_text
    if args.path and args.source:
        raise DataError("give the source either as PATH or as --source, not both")
    m = prepare_dataset(args.name, args.out, resolution=args.resolution, channels=args.channels, count=args.count,
                        seed=args.seed, val_fraction=args.val_fraction, source=args.path or args.source,
                        shard_bytes=int(args.shard_mb * 2**20), **_options(args.opt))
    shards = sum(len(s.shards) for s in m.splits.values())
    counts = ", ".join(f"{k} {v}" for k, v in m.counts.items())
    print(f"prepared {m.name}: {counts} images at {size_text(m.size)}x{m.channels} "
          f"in {shards} shard(s) -> {m.path or args.out}")
    return 0


def show(args: argparse.Namespace) -> int:
    from pathlib import Path

    from raygen.data.inspect import summarize, write_grid
    for i, folder in enumerate(args.dir):
        if len(args.dir) > 1:
            print(("\n" if i else "") + f"== {folder}")
        for line in summarize(folder, verify=args.verify):
            print(line)
        if args.grid:
            grid = Path(args.grid)
            if len(args.dir) > 1:  # a glob that matched several datasets: one grid each
                grid = grid.with_name(f"{grid.stem}-{Path(folder).name}{grid.suffix or '.png'}")
            n = write_grid(folder, grid, n=args.samples)
            print(f"grid: wrote {n} training images to {grid}")
    return 0


def encode(args: argparse.Namespace) -> int:
    import os

    from raygen.jobs.cli import UserError
    from raygen.models import CapabilityError
    from raygen.train.cluster import ClusterError
    from raygen.train.encode import run_encode
    from raygen.train.runner import TrainingFailed
    try:
        result = run_encode(args.model, args.data, args.out, workers=args.workers, batch_size=args.batch_size,
                            dtype=args.dtype, shard_rows=args.shard_rows, threads=args.threads,
                            data_root=args.data_root,
                            count=args.count, use_gpu=args.gpu, address=args.address,
                            tracking_uri=args.tracking_uri, stop_after_batches=args.stop_after_batches,
                            progress=not os.environ.get("RAYGEN_NO_PROGRESS"), verbose=args.verbose)
    except (CapabilityError, ClusterError, TrainingFailed) as err:
        raise UserError(str(err)) from None
    plan = result.plan
    if not result.finished:
        p = result.progress
        print(f"stopped: {p['shards_done']} of {p['shards']} shard(s), {p['batches_done']} of {p['batches']} "
              f"batch(es) done in {result.out}; run the same command again to resume")
        return 0
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    shards = sum(len(s.shards) for s in result.manifest.splits.values())
    how = "already encoded" if result.status == "complete" else result.status
    print(f"{how} {result.manifest.latents.source.get('name')} with {plan.encoder['family']}: {counts} latents of "
          f"shape {'x'.join(map(str, plan.shape))} {plan.dtype} in {shards} shard(s) -> {result.out}")
    return 0


def list_datasets(args: argparse.Namespace) -> int:
    from raygen.data.registry import builder_names, get_builder
    for name in builder_names():
        b = get_builder(name)
        size = f"{b.default_resolution}px" if b.default_resolution else "source size"
        print(f"{name:<14} {b.summary} (default {size})")
    return 0
