"""`raygen sample MODEL`: images from a trained generator, optionally best-of-n reranked.

The condition flags and `--set` are checked by the same typed code the HTTP
API uses: the model's condition kind (`raygen.models.conditions`) and its
family's sampling parameters (`raygen.models.sampling.parse_params`).
"""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample images from a trained model into a PNG grid")
    p.add_argument("model", help="run folder, checkpoint folder, exported model folder or models:/NAME/VERSION")
    p.add_argument("-n", type=int, default=16, help="images to return (default 16)")
    p.add_argument("--label", help="class index or name, any case (class-conditional models)")
    p.add_argument("--caption", "--prompt", dest="caption",
                   help="prompt (caption-conditional models, and for --best-of scoring); --prompt is the same flag")
    p.add_argument("--scene", metavar="JSON|@FILE", help="scene for scene-conditional models: "
                   '{"objects": [{field: number, ...}], "globals": {...}}, inline, FILE.json or @FILE.json')
    p.add_argument("--image", metavar="PATH", help="input image (PNG/JPEG) for image-conditional models")
    p.add_argument("--size", metavar="HxW", help="render at this size (models with the render capability, e.g. "
                   "inr): 64 or 64x96; with --image, the input's reconstruction at that size")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i (default 0)")
    p.add_argument("--best-of", type=int, metavar="M", help="generate M candidates per image and keep the best by CLIP score")
    p.add_argument("--scorer", help="CLIP scorer for --best-of: hf:PATH (local CLIP weights) or a trained clip model folder")
    p.add_argument("--out", default="samples.png", help="output grid PNG (default samples.png)")
    p.add_argument("--tracking-uri", help="MLflow store for models:/ URIs")
    p.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE",
                   help="sampling parameter, e.g. temperature=0.8 (see the model's parameters with --set help)")
    p.add_argument("--sweep", metavar="PARAM=V1,V2,...",
                   help="one grid row per value of a sampling parameter, the same seeds in every row, e.g. "
                        "levels=0,1,2 (a cascade's base, refiner 1, refiner 2) or num_inference_steps=5,25,100")
    p.set_defaults(func=run)


def _condition_value(args, kind: str):
    """The one condition flag that matches the model's kind; any other is a user error."""
    from raygen.jobs.cli import UserError
    given = {flag: value for flag, value in (("label", args.label), ("caption", args.caption),
                                             ("scene", args.scene), ("image", args.image)) if value is not None}
    extra = [f for f in given if f != kind and not (f == "caption" and args.best_of)]
    if extra:
        what = "is unconditional" if kind == "none" else f"conditions on {kind}s, not {extra[0]}s"
        fix = f"leave --{extra[0]} out" + (f" and use --{kind}" if kind != "none" else "")
        raise UserError(f"--{extra[0]}: this model {what}; {fix}")
    value = given.get(kind)
    if value is None:
        return None
    if kind == "scene":
        # inline JSON, @file.json, or a plain path to a file
        path = Path(value[1:]) if value.startswith("@") else None if value.lstrip().startswith("{") else Path(value)
        if path is not None and not path.is_file():
            raise UserError(f"--scene: no such file {path} (give inline JSON, a .json file or @file.json)")
        text = path.read_text() if path is not None else value
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"--scene: not valid JSON ({err})") from None
    if kind == "image":
        path = Path(value)
        if not path.is_file():
            raise UserError(f"--image: no such file {value}")
        return path.read_bytes()
    return value


def _render_size(model, text: str | None) -> tuple[int, int] | None:
    """--size "64" or "64x96" -> (height, width); only for models that can render at a size."""
    from raygen.jobs.cli import UserError
    from raygen.models import Capability, CapabilityError, require
    if text is None:
        return None
    try:
        require(model, Capability.RENDER)
    except CapabilityError as err:
        raise UserError(f"--size: {err}") from None
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(p.strip().isdigit() and 1 <= int(p) <= 4096 for p in parts):
        raise UserError(f"--size: expected SIDE or HEIGHTxWIDTH with sides 1..4096, e.g. 64 or 64x96, got {text!r}")
    return int(parts[0]), int(parts[-1])


def parse_sampling_sets(items: list[str], cls):
    from raygen.jobs.cli import UserError
    from raygen.models import SamplingParamsError, parse_params
    from raygen.spec.loader import parse_value
    if "help" in items:
        lines = [f"  {name}: {f.description or ''} (default {f.default!r})" for name, f in cls.model_fields.items()]
        raise UserError("sampling parameters of this model:\n" + ("\n".join(lines) or "  none"))
    values = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise UserError(f"--set {item}: expected OPTION=VALUE, e.g. temperature=0.8")
        values[key.strip()] = parse_value(text)
    try:
        return parse_params(cls, values, strict=False)
    except SamplingParamsError as err:
        raise UserError(f"--set {err.message}") from None


def sweep_params(sweep: str, items: list[str], cls) -> list:
    """`--sweep KEY=V1,V2,...`: the sampling params of each row (the `--set` values, KEY varied)."""
    from raygen.jobs.cli import UserError
    key, eq, text = sweep.partition("=")
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not eq or not key.strip() or not values:
        raise UserError(f"--sweep {sweep}: expected PARAM=V1,V2,..., e.g. levels=0,1,2")
    if key.strip() not in cls.model_fields:
        raise UserError(f"--sweep {sweep}: {key.strip()!r} is not a sampling parameter of this model "
                        f"({', '.join(cls.model_fields) or 'it has none'})")
    rest = [item for item in items if item.partition("=")[0].strip() != key.strip()]
    return [parse_sampling_sets(rest + [f"{key.strip()}={v}"], cls) for v in values]


def run(args) -> int:
    import torch

    from raygen.jobs.cli import UserError
    from raygen.models import Capability, CapabilityError, ConditionError, Conditions, require
    from raygen.exports import load_generator
    from raygen.models.sampling import image_seeds, make_generators
    from raygen.images import save_grid

    loaded = load_generator(args.model, args.tracking_uri)
    model, info = loaded.model, loaded.data_info
    try:
        require(model, Capability.SAMPLE)
    except CapabilityError as err:
        raise UserError(str(err)) from None
    if args.n < 1:
        raise UserError("-n must be at least 1")
    if args.best_of is not None and args.best_of < 1:
        raise UserError("--best-of must be at least 1")
    params = parse_sampling_sets(args.set, model.sampling_params)
    rows = sweep_params(args.sweep, args.set, model.sampling_params) if args.sweep else [params]
    if len(rows) > 1 and args.best_of:
        raise UserError("--sweep draws the same seeds under each value; leave --best-of out")
    kind = model.condition_kind
    try:
        value = _condition_value(args, kind)
        one = Conditions.parse(kind, [value], info)
    except ConditionError as err:
        raise UserError(f"--{err.field}: {err.message}") from None
    m = args.best_of or 1
    texts = one.texts(info)  # a label is scored by its class name
    rerank_text = args.caption or (texts[0] if texts else None)
    if m > 1 and not (args.scorer and rerank_text):
        raise UserError("--best-of needs --scorer (a CLIP model) and --caption (the prompt to score against; "
                        "a class-conditional model with class names uses its --label's name)")
    reranker = None
    if m > 1:  # load the scorer before generating n * M images, so a bad --scorer fails fast
        from raygen.metrics import BestOfN, load_scorer
        from raygen.metrics.errors import MetricsError
        try:
            reranker = BestOfN(load_scorer(args.scorer))
        except MetricsError as err:  # e.g. no CLIP weights at the path
            raise UserError(f"--scorer: {err}") from None
    total = args.n * m
    conditions = Conditions(kind, one.values * total)
    try:
        seeds = image_seeds(args.seed, total)
    except ValueError as err:
        raise UserError(f"--seed: {err}") from None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    size = _render_size(model, args.size)
    drawn = []
    for row in rows:  # fresh generators per row: every row starts from the same random numbers
        if size is None:
            drawn.append(model.sample(conditions, row, make_generators(seeds, device)))
        else:
            drawn.append(model.render(conditions, row, make_generators(seeds, device), *size))
    images = torch.cat(drawn)
    if m > 1:
        kept, scores = [], []
        for i in range(args.n):
            top, s, _ = reranker.rerank(rerank_text, images[i * m:(i + 1) * m], 1)
            kept.append(top)
            scores.append(float(s[0]))
        images = torch.cat(kept)
        print("CLIP scores of kept images: " + ", ".join(f"{s:.2f}" for s in scores))
    nrow = args.n if len(rows) > 1 else None  # a sweep: one row per value
    path = save_grid(images, Path(args.out), upscale=max(1, 128 // max(images.shape[-2:])), nrow=nrow)
    print(f"wrote {len(images)} image(s) to {path}")
    return 0
