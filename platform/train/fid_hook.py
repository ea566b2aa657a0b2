"""FID every N steps during training (rank 0), against cached val statistics.

The extractor is trained (or loaded) once by the driver before training, and
the reference statistics are computed once at start, so each evaluation costs
only sampling plus feature extraction of the generated images. The real-vs-real
floor (as many train images against the same val images) is computed once at the
start and logged and printed beside every FID, so a reader knows what a model
that reproduced the data would score."""
from __future__ import annotations

import time
from pathlib import Path

from raygen.train.console import say
from raygen.train.hooks import Hook


class FIDHook(Hook):
    def __init__(self, spec, sink, data_dir: str | Path):
        self.spec, self.sink, self.data_dir = spec, sink, Path(data_dir)
        self.every = spec.track.fid.every
        self.evaluator = None
        self.floor: float | None = None
        self.ref = None
        self.scorer = None

    def on_train_start(self, trainer):
        if trainer.rank != 0:
            return
        from raygen.data import load_split_images
        from raygen.metrics import FIDEvaluator, fid_floor
        from raygen.train.wrapup import dataset_extractor

        extractor = dataset_extractor(self.spec, self.data_dir)
        cache_dir = Path(self.spec.data.root) / "fid-cache"  # where the final FID keeps its statistics too
        ref = load_split_images(self.data_dir, "val", self.spec.data, limit=self.spec.track.fid.samples)
        # bootstrap: its standard error is logged beside every FID (raygen.metrics.fid.fid_standard_error)
        self.evaluator = FIDEvaluator(extractor, ref["image"], cache_dir=cache_dir, bootstrap=20)
        self.ref = ref  # samples are conditioned on these records: label for label, scene for scene
        from raygen.train.clip_score import load_run_scorer
        self.scorer = load_run_scorer(self.spec)  # CLIP score of the same samples, when a scorer is named
        train = load_split_images(self.data_dir, "train", self.spec.data, limit=self.evaluator.stats.n)
        self.floor = fid_floor(train["image"], self.evaluator.stats, extractor, cache_dir=cache_dir)
        if self.sink is not None:
            self.sink.set_tags({"fid.extractor": extractor.name, "fid.samples": str(self.spec.track.fid.samples)})
            self.sink.log_metrics({"fid_floor": self.floor}, trainer.state.step)
        say(f"FID real-vs-real floor {self.floor:.2f} ({self.evaluator.stats.n} train vs val images, "
            f"{extractor.name})")  # rank 0's console line (raygen.train.console)

    def on_step_end(self, trainer, metrics):
        step = trainer.state.step
        if step % self.every:
            return
        trainer.eval_weights()  # a collective under ZeRO-3: every rank joins before rank 0 samples
        if trainer.rank != 0 or self.evaluator is None:
            return
        from raygen.train.wrapup import generate, scene_fidelity

        t0 = time.perf_counter()
        model = trainer.eval_model()
        fake = generate(model, self.ref, seed=self.spec.train.seed + 1, params=self.spec.track.fid.sampling)
        result = self.evaluator(fake)
        took = time.perf_counter() - t0
        values = {"fid": result["fid"], "fid_stderr": result["fid_stderr"], "kid": result["kid"],
                  "fid_floor": self.floor, "fid_time_s": took,
                  "fid_samples": float(result["n_generated"]), "fid_reference": float(result["n_reference"]),
                  **scene_fidelity(model, self.ref, fake)}  # scene models: PSNR/SSIM against the true renders
        clip = ""
        if self.scorer is not None:
            from raygen.train.clip_score import condition_clip_score
            score = condition_clip_score(self.scorer, model, self.ref, fake)
            if score is not None:
                values["clip_score"] = score
                clip = f", CLIP score {score:.2f}"
        metrics.update(values)
        if self.sink is not None:
            self.sink.log_metrics(values, step)
        say(f"step {step}: FID {result['fid']:.2f} ± {result['fid_stderr']:.2f} (floor {self.floor:.2f}, KID {result['kid']:.4f}, "
            f"{result['n_generated']} samples, {result['extractor']}, {took:.1f}s){clip}")
