"""A feature network trained on the dataset itself, for FID without downloads.

Inception features suit natural photos at 299 px; for 16x16 grayscale data a
small CNN trained on the data is both faster (FID in seconds, seed 003 lost 7-14
minutes per evaluation) and more sensitive. Objective: classification when labels
exist, else SimCLR-style contrastive learning over pixel shifts, flips, noise and
brightness.

FID is only comparable under one extractor, so the fit is a pure function of the
data: a fixed number of steps (never a time budget: a loaded machine would
train a different net), seeded initialisation and batch order, and one CPU
thread (intra-op reductions then run in one order, so a rerun on one machine
gives the same bits). A dataset folder is always fit on the same images:
the first `FIT_IMAGES` of its train split (`fit_images`), whichever command asks.

Stored as a folder (no pickle):
    domain-<id>/weights.safetensors   network weights
    domain-<id>/config.json           architecture, preprocessing, fit recipe, training summary
The id hashes the recipe: the fit images and labels (content, not paths), the
preprocessing, the architecture and the fit settings. It is known before
training, so it is the cache key, and the same data gives the same id on any
machine. `config.json` also records the weights' sha256 (`weights_sha256`), which
is bitwise repeatable on one machine and may differ in the last bits across CPUs.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from raygen.locks import file_lock
from raygen.metrics.errors import MetricsError
from raygen.metrics.extractors import TorchExtractor
from raygen.metrics.preprocess import Preprocess
from raygen.metrics.reference import dataset_checksum

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
MAX_INPUT = 64  # larger datasets are shrunk to this side: keeps fitting within a minute on CPU
FIT_IMAGES = 8192  # a dataset's net is fit on its first 8192 train images: enough for 10 classes, cheap to hash
RECIPE_VERSION = 2  # bump when the training procedure changes: old ids then name the old procedure


@dataclass(frozen=True, kw_only=True)
class DomainFitConfig:
    """How a domain feature net is fit; every field is part of its id."""
    steps: int = 450        # quickstart (16 px, 8192 images): ~30 s of one core, 78% train accuracy
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 32
    feature_dim: int = 128
    seed: int = 0
    threads: int = 1        # torch CPU threads during the fit: part of the recipe, since it changes the bits

    def __post_init__(self):
        for name in ("steps", "batch_size", "width", "feature_dim", "threads"):
            if getattr(self, name) < 1:
                raise MetricsError(f"domain fit {name} must be at least 1 (got {getattr(self, name)})")
        if self.feature_dim % 8 or self.width % 8:
            raise MetricsError(f"domain fit width and feature_dim must be multiples of 8 for GroupNorm(8) "
                               f"(got width {self.width}, feature_dim {self.feature_dim})")

    @classmethod
    def from_options(cls, **options) -> "DomainFitConfig":
        """From keyword options, naming the replacement of the old time-budget options."""
        for old in ("max_seconds", "fit_seconds"):
            if old in options:
                raise MetricsError(f"domain features are fit by a fixed step count, not a time budget: replace "
                                   f"{old}={options[old]!r} with steps=N (default {cls().steps})")
        if "max_steps" in options:
            raise MetricsError(f"max_steps={options['max_steps']!r}: the option is now steps=N (default {cls().steps})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise MetricsError(f"unknown domain fit option(s) {', '.join(unknown)}; use {', '.join(sorted(known))}")
        return cls(**options)


@dataclass(kw_only=True)
class DomainNetConfig:
    channels: int
    input_size: int
    width: int = 32
    feature_dim: int = 128
    num_classes: int = 0        # > 0: classifier head; 0: contrastive projection head
    proj_dim: int = 64


class DomainNet(nn.Module):
    """Conv stages with stride-2 downsampling to ~4x4, global average pool -> features."""

    def __init__(self, cfg: DomainNetConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
        size, ch = cfg.input_size, w
        while size > 4:  # 16 px: 2 downsamplings, 64 px: 4
            nxt = min(ch * 2, cfg.feature_dim)
            layers += [nn.Conv2d(ch, nxt, 3, stride=2, padding=1), nn.GroupNorm(8, nxt), nn.SiLU(),
                       nn.Conv2d(nxt, nxt, 3, padding=1), nn.GroupNorm(8, nxt), nn.SiLU()]
            size, ch = (size + 1) // 2, nxt
        layers += [nn.Conv2d(ch, cfg.feature_dim, 1)]
        self.body = nn.Sequential(*layers)
        # set after training so the dataset's features have mean 0 and unit average
        # variance: FID then reads in units of the data's own spread, whatever the run
        self.register_buffer("feat_shift", torch.zeros(cfg.feature_dim))
        self.register_buffer("feat_scale", torch.ones(()))
        if cfg.num_classes > 0:
            self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)
        else:
            self.head = nn.Sequential(nn.SiLU(), nn.Linear(cfg.feature_dim, cfg.feature_dim), nn.SiLU(),
                                      nn.Linear(cfg.feature_dim, cfg.proj_dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, S, S] in [0, 1] -> [B, feature_dim]."""
        return (self.raw_features(x) - self.feat_shift) * self.feat_scale

    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(2.0 * x - 1.0).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _augment(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random pixel shift (zero padding), horizontal flip, brightness, noise."""
    b, c, h, w = x.shape
    if max_shift > 0:
        padded = F.pad(x, (max_shift,) * 4)
        rows = torch.randint(0, 2 * max_shift + 1, (b, 1), generator=gen) + torch.arange(h)
        cols = torch.randint(0, 2 * max_shift + 1, (b, 1), generator=gen) + torch.arange(w)
        x = padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1),
                   rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    x = x * (0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=gen))
    x = x + 0.03 * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def _nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def _weights_sha256(weights_path: Path) -> str:
    return hashlib.sha256(weights_path.read_bytes()).hexdigest()


def _content_id(weights_path: Path, arch: dict) -> str:
    """Id of a net saved without a recipe (save_domain_net called directly)."""
    h = hashlib.sha256(weights_path.read_bytes())
    h.update(json.dumps(arch, sort_keys=True).encode())
    return h.hexdigest()[:16]


@dataclass(kw_only=True)
class _FitPlan:
    data: torch.Tensor              # preprocessed images, float [N, C, S, S]
    labels: torch.Tensor | None     # None: contrastive objective
    arch: DomainNetConfig
    prep: Preprocess
    fit: DomainFitConfig
    recipe: dict                    # everything the id hashes

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps(self.recipe, sort_keys=True).encode()).hexdigest()[:16]


def _plan(images: torch.Tensor, labels, fit: DomainFitConfig) -> _FitPlan:
    if images.dim() != 4 or images.shape[0] < 8:
        raise MetricsError(f"need at least 8 images [N, C, H, W] to fit domain features (got shape {tuple(images.shape)})")
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise MetricsError(f"domain features take 1- or 3-channel images (got {c})")
    size = min(max(h, w), MAX_INPUT)
    prep = Preprocess(size=size, channels=c)
    data = torch.cat([prep(images[i:i + 4096]) for i in range(0, n, 4096)]).contiguous()

    num_classes = 0
    if labels is not None:
        labels = torch.as_tensor(labels).long().view(-1)
        if labels.numel() != n:
            raise MetricsError(f"labels has {labels.numel()} entries for {n} images")
        if (labels < 0).any():
            labels = None  # -1 is the dataset writer's "no label": the data is (partly) unlabeled
        else:
            num_classes = int(labels.max()) + 1
            if num_classes < 2:
                labels, num_classes = None, 0  # one class teaches nothing: fall back to contrastive
    arch = DomainNetConfig(channels=c, input_size=size, width=fit.width, feature_dim=fit.feature_dim,
                           num_classes=num_classes)
    # the data part hashes the 8-bit pixels the net sees (Preprocess quantizes) and the labels it uses
    recipe = {"version": RECIPE_VERSION, "data": dataset_checksum(images, labels), "images": n,
              "preprocess": prep.key(), "arch": asdict(arch), "fit": asdict(fit)}
    return _FitPlan(data=data, labels=labels, arch=arch, prep=prep, fit=fit, recipe=recipe)


def domain_id(images: torch.Tensor, labels: torch.Tensor | None = None, **fit_options) -> str:
    """The id `fit_domain_features` gives these images and labels, without training."""
    return _plan(images, labels, DomainFitConfig.from_options(**fit_options)).id


def fit_domain_features(images: torch.Tensor, labels: torch.Tensor | None = None, *,
                        out: str | Path | None = None, cache_dir: str | Path | None = None,
                        log=None, **fit_options) -> TorchExtractor:
    """Train a domain feature net on `images` ([N, C, H, W], float in [0, 1] or uint8)
    and save it. `labels` ([N] long, or None) pick the objective: classification when
    every image has a label >= 0, else contrastive. `fit_options` are the fields
    of `DomainFitConfig` (steps, batch_size, lr, width, feature_dim, seed, threads).

    Saved to `out` (always trained), or to `cache_dir/domain-<id>`: there a net
    with the same id is loaded instead of trained, and a file lock makes
    concurrent callers (parallel trials) share one fit. One of the two is required.
    Returns its extractor, named "domain:<id>", with `.path` set."""
    if out is None and cache_dir is None:
        raise MetricsError("fit_domain_features needs out=FOLDER or cache_dir=FOLDER to store the feature net")
    plan = _plan(images, labels, DomainFitConfig.from_options(**fit_options))
    if out is not None:
        return _fit_and_save(plan, out=out, log=log)
    final = Path(cache_dir) / f"domain-{plan.id}"
    if (final / CONFIG).is_file():  # written by an atomic rename: present means complete
        return load_domain_extractor(str(final))
    with file_lock(Path(cache_dir) / f".domain-{plan.id}.lock"):
        if (final / CONFIG).is_file():  # another process finished while this one waited
            return load_domain_extractor(str(final))
        return _fit_and_save(plan, cache_dir=cache_dir, log=log)


def _fit_and_save(plan: _FitPlan, *, out=None, cache_dir=None, log=None) -> TorchExtractor:
    threads_before = torch.get_num_threads()
    torch.set_num_threads(plan.fit.threads)
    try:
        net, summary = _train(plan.data, plan.labels, plan.arch, plan.fit, log=log)
    finally:
        torch.set_num_threads(threads_before)
    summary["dataset_checksum"] = plan.recipe["data"]
    return save_domain_net(net, plan.prep, summary, out=out, cache_dir=cache_dir, ident=plan.id, recipe=plan.recipe)


def _train(data, labels, cfg: DomainNetConfig, fit: DomainFitConfig, *, log=None):
    n, num_classes, size = data.shape[0], cfg.num_classes, cfg.input_size
    gen = torch.Generator().manual_seed(fit.seed)  # drives batch order and augmentation: fixed data order
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(fit.seed)
        net = DomainNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=fit.lr, weight_decay=1e-4)
    shift = max(1, size // 8)
    bs = min(fit.batch_size, n)
    net.train()
    start, loss_value = time.monotonic(), float("nan")
    for step in range(fit.steps):
        warm = min(1.0, (step + 1) / 50)
        for group in opt.param_groups:  # warmup, then cosine decay over the fixed step count
            group["lr"] = fit.lr * warm * 0.5 * (1 + math.cos(math.pi * step / fit.steps))
        idx = torch.randint(0, n, (bs,), generator=gen)
        x = data[idx]
        if num_classes:
            loss = F.cross_entropy(net.head(net.raw_features(_augment(x, gen, shift))), labels[idx])
        else:
            z1 = net.head(net.raw_features(_augment(x, gen, shift)))
            z2 = net.head(net.raw_features(_augment(x, gen, shift)))
            loss = _nt_xent(z1, z2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        if log and (step + 1) % 100 == 0:
            log(f"domain features: step {step + 1}/{fit.steps}, loss {loss_value:.4f}, "
                f"{time.monotonic() - start:.0f}s")
    seconds = time.monotonic() - start
    net.eval()
    sub = torch.randperm(n, generator=gen)[:4096]  # a random subset: datasets may be sorted by class
    with torch.no_grad():
        raw = torch.cat([net.raw_features(data[sub[i:i + 1024]]) for i in range(0, len(sub), 1024)])
        net.feat_shift.copy_(raw.mean(0))
        net.feat_scale.fill_(float(raw.var(0).mean().clamp(min=1e-12).rsqrt()))

    # "seconds" is for the reader only: nothing about the net depends on it
    summary = {"objective": "classify" if num_classes else "contrastive", "steps": fit.steps,
               "seconds": round(seconds, 2), "final_loss": loss_value, "images": n}
    if num_classes:
        with torch.no_grad():  # on at most 4096 training images: a sanity number, not an evaluation
            pred = net.head(raw).argmax(1)
        summary["train_accuracy"] = float((pred == labels[sub]).float().mean())
    return net, summary


def save_domain_net(net: DomainNet, prep: Preprocess, summary: dict, *, out: str | Path | None = None,
                    cache_dir: str | Path | None = None, ident: str | None = None,
                    recipe: dict | None = None) -> TorchExtractor:
    """Write weights + config atomically (temp folder, then rename); return the extractor.
    `ident` defaults to a hash of the weights and architecture (a net with no recipe)."""
    parent = Path(out).parent if out is not None else Path(cache_dir)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".domain-tmp-", dir=parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        arch = asdict(net.cfg)
        ident = ident or _content_id(tmp / WEIGHTS, arch)
        config = {"format": "raygen-domain-features/1", "id": ident, "name": f"domain:{ident}",
                  "arch": arch, "preprocess": prep.key(), "recipe": recipe,
                  "weights_sha256": _weights_sha256(tmp / WEIGHTS), "training": summary}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        final = Path(out) if out is not None else Path(cache_dir) / f"domain-{ident}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_domain_extractor(str(final))


def fit_images(dataset_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images and labels a prepared dataset's domain net is fit on: its first
    `FIT_IMAGES` train images in file order, at the stored resolution and channels.
    Every path (training, `raygen eval`, `raygen metrics fid`) uses this one rule,
    whatever split it scores against, so one dataset has one net."""
    from raygen.metrics.imageio import load_dataset_images
    images, labels, _ = load_dataset_images(dataset_dir, "train", count=FIT_IMAGES)
    return images, labels


def _resolve(ref: str, cache_dir: str | Path | None) -> Path:
    path = Path(ref).expanduser()
    if (path / CONFIG).is_file():
        return path
    if cache_dir is not None and (Path(cache_dir) / f"domain-{ref}" / CONFIG).is_file():
        return Path(cache_dir) / f"domain-{ref}"
    where = f" or under {cache_dir} as domain-{ref}/" if cache_dir is not None else " (pass cache_dir to look ids up)"
    raise MetricsError(f"no domain feature net at '{ref}'{where}; create one with "
                       "`raygen metrics fit-features DATASET_DIR --out PATH` or use track.fid.extractor: domain")


def load_domain_extractor(ref: str, *, cache_dir: str | Path | None = None, device: str | torch.device = "cpu",
                          batch_size: int = 256) -> TorchExtractor:
    """Load a domain feature net by folder path or by id under `cache_dir`."""
    folder = _resolve(ref, cache_dir)
    config = json.loads((folder / CONFIG).read_text())
    if config.get("format") != "raygen-domain-features/1":
        raise MetricsError(f"{folder / CONFIG} is not a raygen domain feature net config")
    net = DomainNet(DomainNetConfig(**config["arch"]))
    net.load_state_dict(load_file(str(folder / WEIGHTS)))
    pre = config["preprocess"]
    prep = Preprocess(size=pre["size"], channels=pre["channels"], value_range=tuple(pre["value_range"]),
                      quantize=pre["quantize"], antialias=pre["antialias"])
    ext = TorchExtractor(config["name"], net, net.cfg.feature_dim, prep, batch_size=batch_size, device=device)
    ext.path = folder
    ext.id = config["id"]
    ext.training = config.get("training", {})
    return ext
