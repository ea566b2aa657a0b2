"""Cascade decoding cost, in one run: tokens/s of KV-cached vs uncached decoding at each level, and what
beam search costs against its width.

    .venv/bin/python bench/cascade_decoding.py                     # an untrained bench-size cascade (timing only)
    .venv/bin/python bench/cascade_decoding.py runs/cascade-fashion/cascade --n 16
    .venv/bin/python bench/cascade_decoding.py --smoke             # seconds: the debug flavor (CI)

Per level it decodes the same N images greedily with and without the cache (the same per-image generators),
checks they chose the same tokens, and prints tokens/s and the ratio. Then it decodes whole cascades with beam
widths 1, 2, 4, ... (num_beam = width, temperature 0) and prints seconds per image, the cost relative to width 1,
and the mean log-likelihood per token of the decoded sequences (which a wider beam may only raise).
"""
from __future__ import annotations

import argparse
import time

import torch


def bench_model(smoke: bool):
    """An untrained cascade: 32x32 RGB -> 4x16x16 latents, levels of 16, 64 and 256 tokens (smoke: the debug
    flavor). Decoding cost does not depend on the weights being trained."""
    from raygen.models import DataInfo, build_model
    from raygen.models.cascade import FAMILY
    if smoke:
        config, info, comps = FAMILY.debug()["uncond"]
        torch.manual_seed(0)
        return build_model("cascade", config, info, comps).eval()
    torch.manual_seed(0)
    image = DataInfo(channels=3, resolution=32)
    ae = build_model("cascade_ae", {"num_layers": 1, "latent_channel": 4}, image)
    books = build_model("som", {"levels": [{"patch_H": 4, "patch_W": 4, "num_embeddings": 256},
                                           {"patch_H": 2, "patch_W": 2, "num_embeddings": 256},
                                           {"patch_H": 1, "patch_W": 1, "num_embeddings": 256}],
                                "condition": {"num_embeddings": 64}}, DataInfo(channels=4, resolution=16))
    t = {"in_dim": 128, "hidden_dim": 256, "num_enc_layers": 2, "num_dec_layers": 4, "self_attn_heads": 4,
         "cross_attn_heads": 4}
    return build_model("cascade", {"base": t, "refiner": t}, image, {"autoencoder": ae, "codebooks": books}).eval()


def load(model: str | None, smoke: bool):
    if model is None:
        return bench_model(smoke)
    from raygen.exports import load_generator
    return load_generator(model).model.eval()


@torch.no_grad()
def time_level(model, level: int, cond, prev, n: int, cached: bool, seed: int):
    """(seconds, tokens) of decoding `level` greedily for n images."""
    from raygen.models.cascade.beam import decode
    from raygen.models.cascade.config import LevelDecoding
    from raygen.models.cascade.transformer import BaseStepper, RefinerStepper
    from raygen.models.sampling import make_generators
    gens = make_generators(range(seed, seed + n))
    start = time.perf_counter()
    if level == 0:
        st = BaseStepper(model.base, torch.zeros(n, dtype=torch.long), cached=cached)
    else:
        st = RefinerStepper(model.refiners[level - 1], cond, prev, cached=cached)
    decode(st, gens, LevelDecoding(temperature=0.0))
    seconds = time.perf_counter() - start
    out = st.tokens()
    return seconds, (out[1] if level == 0 else out)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", help="an exported cascade (run folder, export folder, models:/ URI); "
                                             "default: an untrained bench-size one")
    ap.add_argument("--n", type=int, default=8, help="images per timing")
    ap.add_argument("--widths", default="1,2,4,8", help="beam widths to time")
    ap.add_argument("--repeats", type=int, default=2, help="timings per setting (the fastest is kept)")
    ap.add_argument("--smoke", action="store_true", help="tiny: the debug flavor, 2 images, widths 1,2")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.widths, args.repeats = 2, "1,2", 1
    torch.set_num_threads(1)  # one thread: ratios comparable across machines, no oversubscription
    model = load(args.model, args.smoke)
    from raygen.models import Conditions, make_generators
    from raygen.models.cascade.config import CascadeSampling
    conditions = Conditions(model.condition_kind, (None,) * args.n)
    rows: list[dict] = []
    print(f"cascade: {model.n_levels} levels, tokens per level "
          f"{[model.base.n_tokens] + [r.n_tokens for r in model.refiners]}, {args.n} images, 1 thread")
    ref = model.sample_tokens(conditions, CascadeSampling(temperature=0.0), make_generators(range(args.n)))
    for level in range(model.n_levels):
        prev = ref["tokens"][level - 1] if level else None
        timings = {}
        time_level(model, level, ref["cond"], prev, args.n, True, 0)  # warm-up: first calls allocate
        for cached in (True, False):
            best = None
            for _ in range(args.repeats):
                seconds, tokens = time_level(model, level, ref["cond"], prev, args.n, cached, 0)
                best = seconds if best is None else min(best, seconds)
            timings[cached] = (best, tokens)
        same = torch.equal(timings[True][1], timings[False][1])
        n_tok = timings[True][1].numel()
        row = {"level": level, "tokens": n_tok, "cached_tok_s": n_tok / timings[True][0],
               "uncached_tok_s": n_tok / timings[False][0], "same_tokens": same}
        row["ratio"] = row["cached_tok_s"] / row["uncached_tok_s"]
        rows.append(row)
        print(f"level {level}: cached {row['cached_tok_s']:.0f} tok/s, uncached {row['uncached_tok_s']:.0f} tok/s, "
              f"ratio cached/uncached {row['ratio']:.2f}x, same tokens: {same}")
    base_s = None
    model.sample_tokens(conditions, CascadeSampling(temperature=0.0), make_generators(range(args.n)))  # warm-up
    for width in (int(w) for w in args.widths.split(",")):
        params = CascadeSampling(temperature=0.0, beam_width=width, num_beam=width)
        best = None
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = model.sample_tokens(conditions, params, make_generators(range(args.n)))
            seconds = time.perf_counter() - start
            best = seconds if best is None else min(best, seconds)
        base_s = base_s or best
        ll = [float(x.mean()) for x in out["loglik"]]
        row = {"beam_width": width, "s_per_image": best / args.n, "cost_ratio": best / base_s, "loglik": ll}
        rows.append(row)
        print(f"beam width {width} (num_beam {width}): {best / args.n * 1000:.1f} ms/image, "
              f"ratio to width 1 {row['cost_ratio']:.2f}x, mean log-lik/token per level "
              f"{', '.join(f'{v:.3f}' for v in ll)}")
    return rows


if __name__ == "__main__":
    main()
