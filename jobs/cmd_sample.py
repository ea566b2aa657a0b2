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


def _convert_option(key: str, value, typ):
    """A --set value as the option's declared type; a value of another type is a user error."""
    from raygen.jobs.cli import UserError
    ok = isinstance(value, typ) and not (typ is not bool and isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise UserError(f"--set {key}: expects {typ.__name__}, got {value!r}")
    return value


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
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise UserError(f"--set {item}: expected OPTION=VALUE, e.g. temperature=0.8")
        if key not in model.sampling_options:
            raise UserError(f"--set {key}: unknown sampling option; this model takes {sorted(model.sampling_options) or 'none'}")
        options[key] = _convert_option(key, parse_value(text), model.sampling_options[key][0])
    if args.n < 1:
        raise UserError("-n must be at least 1")
    if args.best_of is not None and args.best_of < 1:
        raise UserError("--best-of must be at least 1")
    if args.label is not None and model.conditioning != "label":
        kind = "captions" if model.conditioning == "caption" else "nothing"
        raise UserError(f"--label: this model conditions on {kind}, not class labels; leave --label out"
                        + (" and use --caption" if model.conditioning == "caption" else ""))
    label = parse_label(args.label, info)
    m = args.best_of or 1
    if m > 1 and not (args.scorer and args.caption):
        raise UserError("--best-of needs --scorer (a CLIP model) and --caption (the prompt to score against)")
    reranker = None
    if m > 1:  # load the scorer before generating n * M images, so a bad --scorer fails fast
        from raygen.metrics import BestOfN, load_scorer
        from raygen.metrics.errors import MetricsError
        try:
            reranker = BestOfN(load_scorer(args.scorer))
        except MetricsError as err:  # e.g. no CLIP weights at the path
            raise UserError(f"--scorer: {err}") from None
    total = args.n * m
    labels = torch.full((total,), label, dtype=torch.long) if label is not None else None
    captions = [args.caption] * total if args.caption and model.conditioning == "caption" else None
    gen = torch.Generator().manual_seed(args.seed)
    try:
        images = model.sample(total, labels=labels, captions=captions, generator=gen, **options)
    except ValueError as err:  # an option value the model rejects (e.g. a negative temperature)
        if not options:
            raise
        raise UserError(f"--set: {err}") from None
    if m > 1:
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
