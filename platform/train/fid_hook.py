"""FID every N steps during training (rank 0), against cached val statistics.

The extractor is trained (or loaded) once by the driver before training, and
the reference statistics are computed once at start, so each evaluation costs
only sampling plus feature extraction of the generated images."""
from __future__ import annotations

import time
from pathlib import Path

from raygen.train.hooks import Hook


class FIDHook(Hook):
    def __init__(self, spec, sink, data_dir: str | Path):
        self.spec, self.sink, self.data_dir = spec, sink, Path(data_dir)
        self.every = spec.track.fid.every
        self.evaluator = None

    def on_train_start(self, trainer):
        if trainer.rank != 0:
            return
        from raygen.data import load_split_images
        from raygen.metrics import FIDEvaluator
        from raygen.train.wrapup import dataset_extractor

        extractor = dataset_extractor(self.spec, self.data_dir)
        ref = load_split_images(self.data_dir, "val", self.spec.data, limit=self.spec.track.fid.samples)
        self.evaluator = FIDEvaluator(extractor, ref["image"])
        if self.sink is not None:
            self.sink.set_tags({"fid.extractor": extractor.name, "fid.samples": str(self.spec.track.fid.samples)})

    def on_step_end(self, trainer, metrics):
        step = trainer.state.step
        if step % self.every:
            return
        trainer.eval_weights()  # a collective under ZeRO-3: every rank joins before rank 0 samples
        if trainer.rank != 0 or self.evaluator is None:
            return
        from raygen.train.wrapup import generate

        t0 = time.perf_counter()
        model = trainer.eval_model()
        fake = generate(model, self.spec.track.fid.samples, seed=self.spec.train.seed + 1)
        result = self.evaluator(fake)
        took = time.perf_counter() - t0
        values = {"fid": result["fid"], "kid": result["kid"], "fid_time_s": took}
        metrics.update(values)
        if self.sink is not None:
            self.sink.log_metrics(values, step)
        print(f"[raygen] step {step}: FID {result['fid']:.2f} (KID {result['kid']:.4f}, "
              f"{result['n_generated']} samples, {result['extractor']}, {took:.1f}s)", flush=True)
