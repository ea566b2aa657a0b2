"""What one trial asks of the cluster (tune.resources, scale.workers), and
whether it can ever get it: a trial that cannot fit fails before the sweep
starts, instead of waiting forever for resources."""
from __future__ import annotations

from dataclasses import dataclass

from raygen.spec.errors import SpecError
from raygen.spec.schema import JobSpec

#: the function trainable's own actor (it only waits on its TorchTrainer)
TRIAL_CPU = 0.1


@dataclass(frozen=True)
class TrialResources:
    cpus_per_worker: float
    gpus_per_worker: float
    workers: int
    concurrent: int

    @property
    def cpus(self) -> float:
        return round(TRIAL_CPU + self.cpus_per_worker * self.workers, 6)

    @property
    def gpus(self) -> float:
        return round(self.gpus_per_worker * self.workers, 6)

    def describe(self) -> str:
        gpu = f" + {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        return (f"{self.cpus:g} CPU{f', {self.gpus:g} GPU' if self.gpus else ''} "
                f"({self.workers} worker(s) × {self.cpus_per_worker:g} CPU{gpu}, plus {TRIAL_CPU:g} CPU for the trial)")


def plan_trial_resources(spec: JobSpec, cluster: dict[str, float], nodes: list[dict[str, float]]) -> TrialResources:
    """Per-worker CPUs and GPUs of a trial; `cluster` is Ray's cluster_resources(),
    `nodes` each alive node's resources. Raises SpecError naming what a trial asks
    for and what the cluster has when it can never fit."""
    t, workers = spec.tune, spec.scale.workers
    total_cpu, total_gpu = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    concurrent = t.max_concurrent
    if t.resources.cpus_per_trial:
        cpw = t.resources.cpus_per_trial / workers
    elif spec.scale.cpus_per_worker:
        cpw = spec.scale.cpus_per_worker
    else:  # share the cluster among the concurrent trials, one CPU left for Ray Data's tasks
        spare = total_cpu - 1.0 - TRIAL_CPU * concurrent
        cpw = round(max(0.1, spare / (workers * concurrent)), 3)
    if t.resources.gpus_per_trial:
        gpw = t.resources.gpus_per_trial / workers
    else:
        gpw = 1.0 if spec.scale.use_gpu else 0.0
    plan = TrialResources(cpus_per_worker=cpw, gpus_per_worker=gpw, workers=workers, concurrent=concurrent)

    has = f"the cluster has {total_cpu:g} CPU, {total_gpu:g} GPU"
    if nodes:
        biggest_cpu = max(n.get("CPU", 0) for n in nodes)
        biggest_gpu = max(n.get("GPU", 0) for n in nodes)
        has += f" (largest node {biggest_cpu:g} CPU, {biggest_gpu:g} GPU)"
    else:
        biggest_cpu, biggest_gpu = total_cpu, total_gpu
    fix = "lower tune.resources (cpus_per_trial, gpus_per_trial), scale.workers or scale.cpus_per_worker, or add nodes"
    if plan.cpus > total_cpu or plan.gpus > total_gpu or cpw > biggest_cpu or gpw > biggest_gpu:
        raise SpecError([f"tune.resources: a trial asks for {plan.describe()}, but {has}: it can never run; {fix}"])
    if not t.resources.cpus_per_trial and not spec.scale.cpus_per_worker and plan.cpus * concurrent > total_cpu:
        raise SpecError([f"tune.max_concurrent: {concurrent} trials × {workers} workers do not fit on "
                         f"{total_cpu:g} CPUs; lower tune.max_concurrent or scale.workers"])
    return plan
