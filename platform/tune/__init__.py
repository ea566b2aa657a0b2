"""Hyperparameter search over job specs with Ray Tune."""
from raygen.tune.runner import TuneResult, run_tune
from raygen.tune.space import build_param_space, evaluate_filter

__all__ = ["TuneResult", "build_param_space", "evaluate_filter", "run_tune"]
