"""The job spec: one typed, validated description of a run."""
from raygen.spec.errors import SpecError
from raygen.spec.loader import apply_overrides, load_spec, parse_spec
from raygen.spec.schema import (
    AugmentSpec,
    ClipSpec,
    DataSpec,
    EMASpec,
    FIDSpec,
    JobSpec,
    ModelSpec,
    OptimizerSpec,
    ScaleSpec,
    ScheduleSpec,
    ServeSpec,
    TrackSpec,
    TrainSpec,
    TuneSpec,
)

__all__ = [
    "AugmentSpec", "ClipSpec", "DataSpec", "EMASpec", "FIDSpec", "JobSpec", "ModelSpec",
    "OptimizerSpec", "ScaleSpec", "ScheduleSpec", "ServeSpec", "SpecError", "TrackSpec",
    "TrainSpec", "TuneSpec", "apply_overrides", "load_spec", "parse_spec",
]
