"""Does best-of-n reranking raise CLIP score? Paired, at one trained model, in one run.

For each of the first N validation records' conditions (a class name or a
caption), draw M candidates (image j of condition i uses seed SEED + i*M + j)
and keep the one the *selector* CLIP scores highest. The baseline is
candidate 0 of each condition (best-of-1, the same images the reranked set
chose from). Prints the mean CLIPScore of both sets under the selector and
under a *judge*: a second, independently trained scorer, so the gain is not
only the selector agreeing with itself. Also the FID of both sets against the
same validation images (does choosing cost diversity?).

    .venv/bin/python bench/best_of_n.py runs/diffusion-fashion --selector clip:runs/clip-fashion \\
        --judge clip:runs/clip-fashion-judge --n 200 --m 4
    .venv/bin/python bench/best_of_n.py --smoke      # seconds: tiny untrained models (CI)

MODEL is anything `raygen sample` takes, label- or caption-conditioned, of any family.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch


def smoke_setup(work: Path) -> tuple[str, object, object]:
    """The diffusion benchmark's tiny trained digits model, and two untrained clip scorers."""
    spec = importlib.util.spec_from_file_location("diffusion_sampling", Path(__file__).with_name("diffusion_sampling.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = bench.smoke_model(work)

    import raygen.models.clip  # noqa: F401  (registers the family)
    from raygen.exports import load_generator
    from raygen.metrics import TrainedClipScorer
    from raygen.models import build_model
    from raygen.models.clip import ClipConfig
    info = load_generator(model).data_info
    scorers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        scorers.append(TrainedClipScorer(build_model("clip", ClipConfig.debug(), info), name=f"clip-debug-{seed}"))
    return model, scorers[0], scorers[1]


@torch.no_grad()
def candidates(model, conditions, params, m: int, seed: int, batch: int) -> torch.Tensor:
    """[n, m, C, H, W]: m images per condition, image j of condition i from seed + i*m + j."""
    from raygen.models import Conditions
    from raygen.models.sampling import image_seeds, make_generators
    repeated = Conditions(conditions.kind, tuple(v for v in conditions.values for _ in range(m)))
    seeds = image_seeds(seed, repeated.n)
    device = next(model.parameters()).device
    out = [model.sample(repeated[lo:lo + batch], params, make_generators(seeds[lo:lo + batch], device)).cpu()
           for lo in range(0, repeated.n, batch)]
    images = torch.cat(out)
    return images.view(conditions.n, m, *images.shape[1:])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="a trained label- or caption-conditioned model")
    ap.add_argument("--selector", help="scorer that picks the best candidate: hf:PATH or clip:PATH")
    ap.add_argument("--judge", help="an independent scorer that grades both sets (default: the selector)")
    ap.add_argument("--n", type=int, default=200, help="conditions (validation records)")
    ap.add_argument("--m", type=int, default=4, help="candidates per condition")
    ap.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE", help="sampling parameter")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tracking-uri", help="MLflow store for models:/ URIs")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--smoke", action="store_true", help="tiny untrained models, 8 conditions x 3: that it runs")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="rg-bench-", dir=os.environ.get("RAY_TMPDIR") or None))

    from raygen.data import ensure_dataset, load_split_images
    from raygen.exports import load_generator
    from raygen.metrics import FIDEvaluator, load_scorer
    from raygen.train.sampling import conditions_from_records
    from raygen.train.wrapup import dataset_extractor

    if args.smoke:
        args.model, selector, judge = smoke_setup(work)
        args.n, args.m = 8, 3
    else:
        if not (args.model and args.selector):
            ap.error("give MODEL and --selector (or --smoke)")
        selector = load_scorer(args.selector, tracking_uri=args.tracking_uri)
        judge = load_scorer(args.judge, tracking_uri=args.tracking_uri) if args.judge else selector
    if args.m < 2:
        ap.error("--m must be at least 2: best-of-1 is the baseline")

    loaded = load_generator(args.model, args.tracking_uri)
    model, spec = loaded.model.eval(), loaded.spec
    data_dir = ensure_dataset(spec.data)
    ref = load_split_images(data_dir, "val", spec.data, limit=args.n)
    conditions = conditions_from_records(model, ref, args.n)
    texts = conditions.texts(model.data_info)
    if texts is None:
        ap.error(f"{args.model} conditions on {model.condition_kind}; best-of-n needs labels or captions")
    from raygen.jobs.cmd_sample import parse_sampling_sets
    params = parse_sampling_sets(args.set, model.sampling_params)
    images = candidates(model, conditions, params, args.m, args.seed, args.batch)
    n, m = images.shape[:2]
    flat = images.flatten(0, 1)
    per_candidate = [t for t in texts for _ in range(m)]
    chosen = selector.similarity(flat, per_candidate).view(n, m).argmax(dim=1)
    sets = {"best-of-1": images[:, 0], f"best-of-{m}": images[torch.arange(n), chosen]}

    extractor = dataset_extractor(spec, data_dir)
    evaluator = FIDEvaluator(extractor, ref["image"], cache_dir=Path(spec.data.root) / "fid-cache")
    print(f"best-of-n, {args.model}: {n} conditions x {m} candidates, selector {selector.name}, judge {judge.name}, "
          f"extractor {extractor.name}")
    print(f"{'set':<11} {'selector CLIPScore':>18} {'judge CLIPScore':>16} {'FID':>8}")
    rows = {}
    for name, chosen_images in sets.items():
        rows[name] = {"selector": float(selector.score(chosen_images, texts).mean()),
                      "judge": float(judge.score(chosen_images, texts).mean()),
                      "fid": float(evaluator(chosen_images)["fid"])}
        r = rows[name]
        print(f"{name:<11} {r['selector']:>18.2f} {r['judge']:>16.2f} {r['fid']:>8.2f}")
    base, best = rows["best-of-1"], rows[f"best-of-{m}"]
    print(f"best-of-{m} vs best-of-1: selector CLIPScore {best['selector'] - base['selector']:+.2f}, "
          f"judge CLIPScore {best['judge'] - base['judge']:+.2f} (ratio {best['judge'] / max(base['judge'], 1e-9):.3f}), "
          f"FID {best['fid']:.2f} vs {base['fid']:.2f}")
    if args.smoke:
        shutil.rmtree(work, ignore_errors=True)
    result = {"model": args.model, "n": n, "m": m, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
