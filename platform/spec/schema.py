"""Typed sections of the job spec.

Every section forbids unknown keys so a typo fails before anything starts.
The model section names a family; its `options` are validated by the config
class that family registered (see raygen.models.registry).
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from raygen.models.registry import family_names, get_family
from raygen.spec.errors import SpecError, format_pydantic_errors


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- data
def _size_schema(lo: int, hi: int | None) -> dict[str, Any]:
    """JSON schema of an image size for editors: one side (square) or [height, width]."""
    side = {"type": "integer", "minimum": lo, **({"maximum": hi} if hi is not None else {})}
    return {"anyOf": [side, {"type": "array", "items": side, "minItems": 2, "maxItems": 2}]}


def _image_size(value: Any, lo: int, hi: int | None) -> Any:
    """One whole number (square) or [height, width], each in [lo, hi]; a
    square pair becomes one number. Checked here, before pydantic's union,
    so a bad value gets one clear message instead of one per union member."""
    if value is None:
        return value
    is_pair = isinstance(value, (list, tuple))
    items = list(value) if is_pair else [value]
    if (is_pair and len(items) != 2) or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise ValueError("must be one whole number (a square) or [height, width]")
    bad = [v for v in items if v < lo or (hi is not None and v > hi)]
    if bad:
        raise ValueError(f"{bad[0]} is out of range; each side must be "
                         + (f"between {lo} and {hi}" if hi is not None else f"at least {lo}"))
    return items[0] if len(items) == 1 or items[0] == items[1] else items


class AugmentSpec(Section):
    hflip: bool = False
    vflip: bool = False
    shift: int = Field(0, ge=0, description="random pixel shift with zero padding (seed 001: 4)")
    crop: int | list[int] | None = Field(None, description="random crop to this size (train only): one number "
                                                           "(square) or [height, width]",
                                         json_schema_extra={"anyOf": [*_size_schema(1, None)["anyOf"], {"type": "null"}]})

    @field_validator("crop", mode="before")
    @classmethod
    def _crop_size(cls, v: Any) -> Any:
        return _image_size(v, 1, None)


class DataSpec(Section):
    dataset: str = Field("fashion-mnist", description="built-in name (fashion-mnist, digits, spheres, kali, shapes) or a path to prepared shards")
    root: str = Field("runs/data", description="folder where built-in datasets are prepared")
    source: str | None = Field(None, description="raw source path overriding the built-in default")
    resolution: int | list[int] = Field(16, description="image size in pixels: one number (square) or [height, width]",
                                        json_schema_extra=_size_schema(4, 1024))
    channels: Literal[1, 3] = 1
    count: int | None = Field(None, gt=0, description="use at most this many training images")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    seed: int = 0
    batch_size: int = Field(64, ge=1, description="per worker, per micro-step")
    shuffle_buffer: int = Field(1024, ge=0)
    prefetch_batches: int = Field(2, ge=0)
    bad_size_policy: Literal["resize", "reject"] = "resize"
    augment: AugmentSpec = Field(default_factory=AugmentSpec)

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution_size(cls, v: Any) -> Any:
        return _image_size(v, 4, 1024)


# ---------------------------------------------------------------- model
class ModelSpec(Section):
    family: str = Field("seqimg", description="registered model family", validate_default=True)
    options: dict[str, Any] = Field(default_factory=dict, description="family options, validated by the family's config")
    components: dict[str, str] = Field(
        default_factory=dict,
        description="frozen models trained by earlier runs, by the name the family gives them: "
                    "{vae: models:/fashion-vae@champion} (a run folder, an export folder or an MLflow model URI)")
    _config: Any = PrivateAttr(default=None)

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        names = family_names()
        if v not in names:
            raise ValueError(f"unknown model family '{v}'; choose one of: {', '.join(names)}")
        return v

    @model_validator(mode="after")
    def _validate_options(self) -> "ModelSpec":
        family = get_family(self.family)
        try:
            self._config = family.config_cls.model_validate(self.options)
        except ValidationError as err:
            raise SpecError(format_pydantic_errors(err, ("options",))) from None
        unknown = sorted(set(self.components) - set(family.components))
        if unknown:
            accepted = f"it takes: {', '.join(sorted(family.components))}" if family.components else "it takes none"
            raise ValueError(f"components: family '{self.family}' has no component '{unknown[0]}'; {accepted}")
        return self

    @property
    def config(self):
        """The family's typed config object."""
        return self._config


# ---------------------------------------------------------------- train
class OptimizerSpec(Section):
    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.99)
    momentum: float = Field(0.9, ge=0, description="SGD only")
    scale_lr_with_batch: Literal["none", "linear", "sqrt"] = Field(
        "none", description="scale lr by global_batch / base_batch")
    base_batch: int = Field(64, ge=1)


class ScheduleSpec(Section):
    name: Literal["constant", "warmup_cosine", "cosine", "onecycle", "step"] = "warmup_cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    step_size: int = Field(1000, ge=1, description="step decay: steps between decays")
    gamma: float = Field(0.5, gt=0, le=1, description="step decay factor")
    pct_start: float = Field(0.3, gt=0, lt=1, description="one-cycle warm-up fraction")


class ClipSpec(Section):
    norm: float | None = Field(1.0, gt=0, description="clip gradients to this global L2 norm")
    value: float | None = Field(None, gt=0, description="clamp each gradient element to ±value")


class EMASpec(Section):
    enabled: bool = True
    decay: float = Field(0.999, gt=0, lt=1)
    start_step: int = Field(0, ge=0)


class NanGuardSpec(Section):
    max_consecutive: int = Field(5, ge=1, description="stop after this many non-finite steps in a row")


class TrainSpec(Section):
    steps: int = Field(500, ge=1, description="optimizer steps")
    grad_accum: int = Field(1, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    loss_scale_floor: float = Field(128.0, gt=0, description="fp16 only: minimum dynamic loss scale (seed 002)")
    initial_loss_scale: float = Field(2.0**16, gt=0)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    clip: ClipSpec = Field(default_factory=ClipSpec)
    ema: EMASpec = Field(default_factory=EMASpec)
    nan_guard: NanGuardSpec = Field(default_factory=NanGuardSpec)
    seed: int = 0
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=1)
    val_batches: int = Field(4, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    best_metric: str | None = Field("val_loss", description="keep the best checkpoint by this metric")
    best_mode: Literal["min", "max"] = "min"
    grid_samples: int = Field(16, ge=1, le=256)


# ---------------------------------------------------------------- scale
class ScaleSpec(Section):
    workers: int = Field(2, ge=1)
    strategy: Literal["ddp", "deepspeed"] = "deepspeed"
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    deepspeed_config: str | None = Field(None, description="JSON file merged over the generated DeepSpeed config")
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(None, gt=0, description="default: fits workers plus data tasks on the cluster")
    max_failures: int = Field(0, ge=-1, description="worker failures to recover from (-1: unlimited)")
    placement: Literal["pack", "spread", "strict_spread", "strict_pack"] = Field(
        "pack", description="how workers go onto nodes (Ray placement strategy): pack fills a node first, "
                            "spread spreads them where it can, strict_spread puts each on its own node")
    address: str | None = Field(None, description="Ray cluster address; default RAY_ADDRESS or an embedded cluster")
    storage: str | None = Field(None, description="s3://BUCKET/PATH every node can reach: Ray Train's storage path "
                                "(checkpoints, resume) and a copy of the run folder; endpoint and keys from the "
                                "AWS_* variables. Default: the local run folder")

    @field_validator("storage")
    @classmethod
    def _storage_is_uri(cls, v: str | None) -> str | None:
        if v is not None:
            from raygen.storage import StorageError, split_uri
            try:
                split_uri(v)
            except StorageError as err:
                raise ValueError(str(err).split(": ", 1)[1]) from None
        return v

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "ScaleSpec":
        if self.strategy == "deepspeed":
            if self.offload_params and self.zero_stage != 3:
                raise ValueError("offload_params needs zero_stage 3")
            if self.offload_optimizer and self.zero_stage == 0:
                raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


# ---------------------------------------------------------------- track
class FIDSpec(Section):
    every: int = Field(0, ge=0, description="compute FID every N steps (0: only at the end)")
    samples: int = Field(256, ge=16)
    extractor: str = Field("domain", description="'domain' (a feature net trained on the dataset), 'domain:PATH' (one from `raygen metrics fit-features`) or 'inception:PATH'")
    # a step count, never a time budget: a loaded machine must train the same net (same DomainFitConfig.steps)
    fit_steps: int = Field(450, ge=1, description="optimizer steps to fit the domain feature net (once per dataset; "
                                                  "part of its id, so FID is comparable only at one value)")
    sampling: dict[str, Any] = Field(default_factory=dict, description="sampling parameters for FID's samples (the "
                                     "family's `raygen sample --set` keys), e.g. {num_inference_steps: 10}: a few-step "
                                     "sampler keeps FID cheap at the eval cadence; default: the model's own")
    enabled: bool = True

    @model_validator(mode="before")
    @classmethod
    def _fit_seconds_is_gone(cls, data: Any) -> Any:
        if isinstance(data, dict) and "fit_seconds" in data:
            raise ValueError(f"fit_seconds ({data['fit_seconds']!r}) was replaced by fit_steps: the domain feature "
                             "net is fit by a fixed step count so every machine trains the same net; "
                             "remove fit_seconds and set fit_steps (default 450) if needed")
        return data


class ClipScoreSpec(Section):
    scorer: str | None = Field(None, description="CLIP scorer for the CLIP score of label- or caption-conditioned "
                               "samples, computed with FID on the same samples: hf:PATH (local CLIP weights) or "
                               "clip:PATH (a model trained with model.family: clip); none: no CLIP score")


class TrackSpec(Section):
    tracking_uri: str | None = Field(None, description="default: sqlite:///<run_dir>/mlflow.db")
    experiment: str = "raygen"
    register_model: bool = True
    system_metrics_every_s: float = Field(10.0, ge=0, description="seconds between MLflow system metrics (CPU, "
                                          "memory, disk, network; GPU with nvidia-ml-py) logged by rank 0 of each "
                                          "node; 0: none")
    fid: FIDSpec = Field(default_factory=FIDSpec)
    clip_score: ClipScoreSpec = Field(default_factory=ClipScoreSpec)

    @model_validator(mode="after")
    def _clip_score_needs_fid(self) -> "TrackSpec":
        if self.clip_score.scorer and not self.fid.enabled:
            raise ValueError("track.clip_score.scorer scores FID's samples: set track.fid.enabled: true, or remove "
                             "track.clip_score.scorer")
        return self


# ---------------------------------------------------------------- tune
class TuneSchedulerSpec(Section):
    name: Literal["asha", "hyperband", "median", "pbt", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="reports before a trial may be stopped")
    reduction_factor: float = Field(2.0, gt=1)
    perturbation_interval: int = Field(2, ge=1, description="PBT only: reports between exploit/explore decisions")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="PBT only: the bottom fraction of trials that "
                                     "clone (weights, optimizer, EMA, data position) one of the top fraction")


class TuneObjectiveSpec(Section):
    metric: str = Field(description="a reported metric: val_loss, fid, kid, clip_score, images_per_s, ...")
    mode: Literal["min", "max"] = "min"


class TuneResourcesSpec(Section):
    cpus_per_trial: float | None = Field(None, gt=0, description="CPUs of one trial's workers together (default: "
                                         "the cluster's CPUs, less one for data loading, shared by max_concurrent trials)")
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs of one trial's workers together; a fraction shares "
                                  "a GPU between trials (0.5: two trials per GPU)")


_DIST = {"choice", "grid", "uniform", "loguniform", "randint", "quniform"}


class TuneSpec(Section):
    space: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="dotted spec key -> {choice: [...]} | {grid: [...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} | {randint: [lo, hi]} | {quniform: [lo, hi, q]}")
    filter: str | None = Field(None, description="expression over ${key} of grid axes that a grid point must satisfy, e.g. '${model.options.dim} % ${model.options.heads} == 0'")
    num_samples: int = Field(4, ge=1)
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    scheduler: TuneSchedulerSpec = Field(default_factory=TuneSchedulerSpec)
    max_concurrent: int = Field(1, ge=1, description="trials at a time; each holds scale.workers workers (trials report at every train.eval_every)")
    search: Literal["random", "grid", "optuna"] = Field(
        "random", description="random: sample the distributions (grid axes crossed); grid: every combination of "
        "grid/choice axes; optuna: Optuna TPE (model-based), choice axes only, no grid axes")
    seed: int | None = Field(None, description="seed of the Optuna sampler (search: optuna)")
    objective: dict[str, float] = Field(
        default_factory=dict, description="a weighted sum to optimize instead of tune.metric, e.g. {fid: 1.0, "
        "val_loss: 0.1}; reported as the metric 'objective' (tune.mode applies to it)")
    objectives: list[TuneObjectiveSpec] = Field(
        default_factory=list, description="two or more metrics optimized together (Optuna multi-objective, "
        "search: optuna, scheduler: fifo), e.g. [{metric: fid, mode: min}, {metric: images_per_s, mode: max}]")
    resources: TuneResourcesSpec = Field(default_factory=TuneResourcesSpec)

    @field_validator("space")
    @classmethod
    def _check_space(cls, space: dict) -> dict:
        for key, dist in space.items():
            if not re.fullmatch(r"[A-Za-z_][\w\-]*(\.[A-Za-z_][\w\-]*)+", key):
                raise ValueError(f"space key '{key}' must be a dotted spec path such as 'train.optimizer.lr'")
            if len(dist) != 1 or next(iter(dist)) not in _DIST:
                raise ValueError(f"space.{key} must be one of {sorted(_DIST)} with its arguments, e.g. {{loguniform: [1e-4, 1e-2]}}")
            kind, args = next(iter(dist.items()))
            if kind in ("choice", "grid") and (not isinstance(args, list) or not args):
                raise ValueError(f"space.{key}.{kind} needs a non-empty list")
            if kind in ("uniform", "loguniform", "randint", "quniform"):
                if not isinstance(args, list) or len(args) not in (2, 3) or not args[0] < args[1]:
                    raise ValueError(f"space.{key}.{kind} needs [low, high] with low < high")
                if kind == "loguniform" and args[0] <= 0:
                    raise ValueError(f"space.{key}.loguniform needs a positive low bound")
        return space

    @model_validator(mode="after")
    def _check_search(self) -> "TuneSpec":
        grid = sorted(k for k, v in self.space.items() if "grid" in v)
        if self.search == "optuna" and grid:
            raise ValueError(f"search: optuna samples every axis itself; space.{grid[0]} is a grid axis: "
                             "write it as {choice: [...]} or use search: random")
        if self.search == "grid":
            sampled = sorted(k for k, v in self.space.items() if next(iter(v)) not in ("grid", "choice"))
            if sampled:
                raise ValueError(f"search: grid runs every combination of finite axes; space.{sampled[0]} is "
                                 f"{next(iter(self.space[sampled[0]]))}: give it as {{grid: [...]}} or use search: random")
        if self.search == "optuna" and self.scheduler.name == "pbt":
            raise ValueError("scheduler.name: pbt mutates trials itself and does not go with search: optuna; "
                             "use search: random with pbt, or another scheduler with optuna")
        if self.objective and self.objectives:
            raise ValueError("objective (a weighted sum) and objectives (several metrics) exclude each other; keep one")
        if self.objective:
            if "metric" in self.model_fields_set and self.metric != "objective":
                raise ValueError(f"metric: {self.metric} is replaced by objective (reported as 'objective'); "
                                 "remove tune.metric")
            self.__dict__["metric"] = "objective"
        if self.objectives:
            if len(self.objectives) < 2:
                raise ValueError("objectives: give two or more metrics (for one, set tune.metric and tune.mode)")
            if self.search != "optuna":
                raise ValueError("objectives: several metrics are optimized by Optuna's multi-objective mode: "
                                 "set tune.search: optuna")
            if self.scheduler.name != "fifo":
                raise ValueError(f"objectives: scheduler {self.scheduler.name} stops trials on one metric; "
                                 "set tune.scheduler.name: fifo")
            names = [o.metric for o in self.objectives]
            if len(set(names)) != len(names):
                raise ValueError(f"objectives: a metric is listed twice ({names})")
        return self


# ---------------------------------------------------------------- serve
class ServeSpec(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_n: int = Field(16, ge=1, le=256, description="most images one request may ask for")
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    max_queued_requests: int = Field(64, ge=1)
    request_timeout_s: float = Field(120.0, gt=0)
    replicas: int = Field(1, ge=1)


# ---------------------------------------------------------------- whole job
class JobSpec(Section):
    name: str = Field("raygen-run", description="run name; also the registered model name")
    run_dir: str = Field("runs", description="where runs, checkpoints and the embedded MLflow store live")
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    scale: ScaleSpec = Field(default_factory=ScaleSpec)
    track: TrackSpec = Field(default_factory=TrackSpec)
    tune: TuneSpec = Field(default_factory=TuneSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)

    @field_validator("name")
    @classmethod
    def _name_chars(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}", v):
            raise ValueError("name may hold letters, digits, '.', '_' and '-' (at most 100), starting with a letter or digit")
        return v
