"""`raygen sample MODEL`: images from a trained generator, optionally best-of-n reranked."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample images from a trained model into a PNG grid")
    p.add_argument("model", help="run folder, checkpoint folder, exported model folder or models:/NAME/VERSION")
    p.add_argument("-n", type=int, default=16, help="images to return (default 16)")
    p.add_argument("--label", help="class index or name (class-conditional models)")
    p.add_argument("--caption", help="prompt (caption-conditional models, and for --best-of scoring)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--best-of", type=int, metavar="M", help="generate M candidates per image and keep the best by CLIP score")
    p.add_argument("--scorer", help="CLIP scorer for --best-of: hf:PATH (local CLIP weights) or a trained clip model folder")
    p.add_argument("--out", default="samples.png", help="output grid PNG (default samples.png)")
    p.add_argument("--tracking-uri", help="MLflow store for models:/ URIs")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", help="sampling option, e.g. temperature=0.8")
    p.set_defaults(func=run)


def parse_label(value: str | None, info) -> int | None:
    from raygen.jobs.cli import UserError
    if value is None:
        return None
    if value.lstrip("-").isdigit():
        label = int(value)
    elif value in info.class_names:
        label = info.class_names.index(value)
    else:
        raise UserError(f"--label: '{value}' is neither a class index nor one of {info.class_names}")
    if not 0 <= label < info.num_classes:
        raise UserError(f"--label: {label} is outside 0..{info.num_classes - 1}")
    return label


def run(args) -> int:
    import torch

    from raygen.jobs.cli import UserError
    from raygen.models.io import load_generator
    from raygen.spec.loader import parse_value
    from raygen.train.images import save_grid

    loaded = load_generator(args.model, args.tracking_uri)
    model, info = loaded.model, loaded.data_info
    options = {}
    for item in args.set:
        key, _, text = item.partition("=")
        if key not in model.sampling_options:
            raise UserError(f"--set {key}: unknown sampling option; this model takes {sorted(model.sampling_options) or 'none'}")
        options[key] = model.sampling_options[key][0](parse_value(text))
    if args.n < 1:
        raise UserError("-n must be at least 1")
    label = parse_label(args.label, info)
    m = args.best_of or 1
    if m > 1 and not (args.scorer and args.caption):
        raise UserError("--best-of needs --scorer (a CLIP model) and --caption (the prompt to score against)")
    total = args.n * m
    labels = torch.full((total,), label, dtype=torch.long) if label is not None else None
    captions = [args.caption] * total if args.caption and model.conditioning == "caption" else None
    gen = torch.Generator().manual_seed(args.seed)
    images = model.sample(total, labels=labels, captions=captions, generator=gen, **options)
    if m > 1:
        from raygen.metrics import BestOfN, load_scorer
        reranker = BestOfN(load_scorer(args.scorer))
        kept, scores = [], []
        for i in range(args.n):
            top, s, _ = reranker.rerank(args.caption, images[i * m:(i + 1) * m], 1)
            kept.append(top)
            scores.append(float(s[0]))
        images = torch.cat(kept)
        print("CLIP scores of kept images: " + ", ".join(f"{s:.2f}" for s in scores))
    path = save_grid(images, Path(args.out), upscale=max(1, 128 // info.resolution))
    print(f"wrote {len(images)} image(s) to {path}")
    return 0
