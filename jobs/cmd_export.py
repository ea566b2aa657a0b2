"""`raygen export MODEL --format diffusers --out DIR`: a trained model in another ecosystem's layout.

Each format names, per family, the function that writes it (module:function,
imported only when used). `diffusers`: a folder `from_pretrained` loads
(UNet, scheduler config, VAE, text encoder and tokenizer where there are some).
"""
from __future__ import annotations

import importlib

#: format -> family -> "module:function(model, out, name) -> Path"
FORMATS: dict[str, dict[str, str]] = {
    "diffusers": {
        "diffusion": "raygen.models.diffusion.export:export_diffusers",
        "vae": "raygen.models.diffusion.vae:export_diffusers",
    },
}


def register(sub) -> None:
    p = sub.add_parser("export", help="write a trained model in another library's layout (diffusers)")
    p.add_argument("model", help="run folder, checkpoint folder, exported model folder or models:/NAME/VERSION")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="target layout")
    p.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    p.add_argument("--tracking-uri", help="MLflow store for models:/ URIs")
    p.set_defaults(func=run)


def exporter(fmt: str, family: str):
    from raygen.jobs.cli import UserError
    writers = FORMATS[fmt]
    if family not in writers:
        raise UserError(f"--format {fmt}: a {family} model has no {fmt} export; families that have one: "
                        f"{', '.join(sorted(writers))}")
    module, _, function = writers[family].partition(":")
    return getattr(importlib.import_module(module), function)


def run(args) -> int:
    from raygen.exports import load_generator

    loaded = load_generator(args.model, args.tracking_uri)
    write = exporter(args.format, loaded.model.family)
    path = write(loaded.model, args.out, name=loaded.spec.name)
    print(f"wrote {args.format} folder {path} (from {loaded.source}, step {loaded.meta.get('step', '?')})")
    return 0
