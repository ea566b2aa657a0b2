"""The cascade's claims, measured in one in-process run at tiny CPU scale (docs/models/cascade.md):

1. FID and quantized-map PSNR after each level: do the refiners sharpen the base output?
2. beam search vs temperature sampling, on log-likelihood and on FID;
3. pruning's effect on codebook usage and quality.

It trains the three stages in this process (no Ray: the numbers, not the platform, are measured here) on 16x16
Fashion-MNIST: the autoencoder, two codebook sets (the same fit, then counted and pruned or not), and the cascade
on the pruned codebooks. FID uses a domain feature net trained on the training images (docs/metrics.md), against
the validation images; every FID compares the same number of images.

    .venv/bin/python bench/cascade_claims.py                      # minutes on one idle core
    .venv/bin/python bench/cascade_claims.py --smoke              # seconds: digits, a few steps (CI)
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def load(dataset: str, root: Path, resolution: int, count: int, n_val: int):
    from raygen.data import load_split_images, prepare_dataset
    from raygen.spec.schema import DataSpec
    out = root / dataset
    prepare_dataset(dataset, out, resolution=resolution, channels=1, count=count, seed=0)
    spec = DataSpec(dataset=str(out), resolution=resolution, channels=1)
    train = load_split_images(out, "train", spec)
    val = load_split_images(out, "val", spec, limit=n_val)
    return train, val, spec


def batches(n: int, size: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(n, (size,), generator=g)


def train_gradient(model, data: dict, steps: int, lr: float, batch: int, log, name: str) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    loss = float("nan")
    for step, idx in enumerate(batches(len(next(iter(data.values()))), batch, steps, 1), 1):
        out = model.training_step({k: v[idx] for k, v in data.items()})
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss = float(out["loss"].detach())
        if step % max(1, steps // 4) == 0:
            log(f"  {name} step {step}/{steps}: loss {loss:.4f}")
    model.eval()
    return loss


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    from raygen.metrics import psnr_per_image
    return float(psnr_per_image(a, b).mean())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--work", help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    log = print
    from raygen.metrics import compute_fid, fit_domain_features
    from raygen.models import Conditions, DataInfo, build_model, make_generators, parse_params

    s = args.smoke
    size = {"dataset": "digits" if s else "fashion-mnist", "resolution": 8 if s else 16, "count": 400 if s else 4000,
            "n_val": 64 if s else 300, "ae_steps": 10 if s else 300, "som_steps": 8 if s else 120,
            "count_steps": 2 if s else 10, "cascade_steps": 6 if s else 500, "batch": 32 if s else 64,
            "domain_steps": 20 if s else 300, "n_gen": 16 if s else 300}
    work = Path(args.work or tempfile.mkdtemp(prefix="cascade-claims-"))
    started = time.perf_counter()
    train, val, _ = load(size["dataset"], work / "data", size["resolution"], size["count"], size["n_val"])
    x, y, xv, yv = train["image"], train["label"], val["image"], val["label"]
    res = size["resolution"]
    image = DataInfo(channels=1, resolution=res, num_classes=10, class_names=[str(i) for i in range(10)])
    log(f"data: {size['dataset']} {res}x{res}, train {len(x)}, val {len(xv)}")

    # stage 1: autoencoder
    ae = build_model("cascade_ae", {"min_channel": 16, "max_channel": 32, "num_layers": 1,
                                    "latent_channel": 4}, image)
    train_gradient(ae, {"image": x}, size["ae_steps"], 2e-3, size["batch"], log, "autoencoder")
    with torch.no_grad():
        z, zv = ae.encode(x), ae.encode(xv)
        recon_psnr = psnr(xv, ae.decode(zv))
    log(f"autoencoder: val PSNR {recon_psnr:.2f} dB, latents {list(z.shape[1:])}")

    # stage 3: codebooks, the same fit then pruned or not
    c, h, w = z.shape[1:]
    latent = DataInfo(channels=c, height=h, width=w, num_classes=10, class_names=image.class_names)
    levels = ([{"patch_H": 2, "patch_W": 2, "num_embeddings": 32}, {"patch_H": 1, "patch_W": 1, "num_embeddings": 32}]
              if s else [{"patch_H": 4, "patch_W": 4, "num_embeddings": 128},
                         {"patch_H": 2, "patch_W": 2, "num_embeddings": 128},
                         {"patch_H": 1, "patch_W": 1, "num_embeddings": 64}])
    for lv in levels:
        lv["neighbourhood_step"] = max(1, size["som_steps"] // 6)
    som_opts = {"levels": levels, "condition": {"num_embeddings": 16 if s else 32,
                                                "neighbourhood_step": max(1, size["som_steps"] // 6)},
                "lr_half_life": max(1, size["som_steps"] // 2), "count_from": size["som_steps"] + 1}
    books = {}
    for pruned in (False, True):
        opts = {**som_opts, "prune_threshold": 8 if pruned else 0}
        som = build_model("som", opts, latent, {"autoencoder": ae})
        total = size["som_steps"] + size["count_steps"]
        for step, idx in enumerate(batches(len(z), size["batch"], total, 2), 1):
            metrics = som.apply_fit(som.fit_statistics({"latent": z[idx]}), step)
        books[pruned] = som
    rows_pruning = []
    for pruned, som in books.items():
        with torch.no_grad():
            toks = som.tokens(zv)
            for i, m in enumerate(som.levels):
                counts = torch.bincount(toks[i].reshape(-1), minlength=m.vocab).double()
                p = counts / counts.sum()
                quant = ae.decode(som.decode_level(i, toks[i]))
                rows_pruning.append({"pruned": pruned, "level": i, "units": m.vocab, "of": m.k,
                                     "val_usage": float((counts > 0).double().mean()),
                                     "val_perplexity": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())),
                                     "quantized_psnr": psnr(xv, quant)})
    for r in rows_pruning:
        log(f"codebooks {'pruned  ' if r['pruned'] else 'unpruned'} level {r['level']}: {r['units']}/{r['of']} units, "
            f"val usage {r['val_usage']:.2f}, perplexity {r['val_perplexity']:.1f}, "
            f"quantized-map PSNR {r['quantized_psnr']:.2f} dB")

    # stage 4+: the cascade on the pruned codebooks, trained on latents
    t = ({"in_dim": 32, "hidden_dim": 64, "num_enc_layers": 1, "num_dec_layers": 1, "self_attn_heads": 2,
          "cross_attn_heads": 2} if s else
         {"in_dim": 64, "hidden_dim": 128, "num_enc_layers": 1, "num_dec_layers": 2, "self_attn_heads": 4,
          "cross_attn_heads": 4})
    cascade = build_model("cascade", {"conditioning": "label", "base": t, "refiner": t}, latent,
                          {"autoencoder": ae, "codebooks": books[True]})
    train_gradient(cascade, {"latent": z, "label": y}, size["cascade_steps"], 1e-3, size["batch"], log, "cascade")

    # FID: a domain feature net trained on the training images, the validation images as reference
    extractor = fit_domain_features(x, y, out=work / "domain", steps=size["domain_steps"])
    n = size["n_gen"]
    ref = xv[:n] if len(xv) >= n else xv

    def fid(images):
        return compute_fid(images, ref, extractor, kid_subset_size=min(len(images), len(ref), 1000))["fid"]

    with torch.no_grad():
        data_rows = [{"level": i, "what": "val latents quantized", "psnr": r["quantized_psnr"],
                      "fid": fid(ae.decode(books[True].decode_level(i, books[True].tokens(zv)[i]))[:n])}
                     for i, r in enumerate(r for r in rows_pruning if r["pruned"])]
    floor = fid(ae.decode(zv)[:n])
    log(f"FID of the autoencoder's own reconstructions {floor:.2f} (PSNR {recon_psnr:.2f} dB); "
        f"train images vs val: {fid(x[:n]):.2f}")
    for r in data_rows:
        log(f"level {r['level']} quantized val maps: PSNR {r['psnr']:.2f} dB, FID {r['fid']:.2f}")

    labels = yv[:n].tolist() if len(yv) >= n else [i % 10 for i in range(n)]
    conditions = Conditions.parse("label", labels, cascade.data_info)
    settings = {"sample T=1": {"temperature": 1.0}, "sample T=0.8": {"temperature": 0.8},
                "beam W=4 C=4 T=0": {"temperature": 0.0, "beam_width": 4, "num_beam": 4},
                "greedy (W=1 T=0)": {"temperature": 0.0},
                "beam W=4 C=4 T=1 (sampled)": {"temperature": 1.0, "beam_width": 4, "num_beam": 4}}
    gen_rows = []
    for name, values in settings.items():
        params = parse_params(cascade.sampling_params, values)
        out = cascade.sample_tokens(conditions, params, make_generators(range(n)))
        for i, toks in enumerate(out["tokens"]):
            images = cascade.decode_tokens(i, toks)
            gen_rows.append({"decoding": name, "level": i, "loglik_per_token": float(out["loglik"][i].mean()),
                             "fid": fid(images), "distinct_images": len({tuple(t.tolist()) for t in toks})})
    for r in gen_rows:
        log(f"{r['decoding']:>26} level {r['level']}: log-lik/token {r['loglik_per_token']:.3f}, FID {r['fid']:.2f}, "
            f"distinct token maps {r['distinct_images']}/{n}")
    result = {"size": size, "autoencoder_val_psnr": recon_psnr, "autoencoder_fid": floor, "pruning": rows_pruning,
              "quantized": data_rows, "generated": gen_rows, "seconds": time.perf_counter() - started}
    log(f"done in {result['seconds']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
