"""Join a Ray cluster or start an embedded one, with errors users can act on."""
from __future__ import annotations

import os

from raygen.spec.errors import SpecError


class ClusterError(RuntimeError):
    pass


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes: ray.init retries an unreachable GCS for a long time."""
    import socket

    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address!r} ({err.strerror or err}). Start it with `ray start --head` "
            "(or `ray up cluster.yaml`), check the address, or unset RAY_ADDRESS to train on an embedded local cluster.") from None


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> dict:
    """Connect to `address` / RAY_ADDRESS, or start a local cluster. Returns cluster resources."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _probe(address)
        try:
            ray.init(address=address, log_to_driver=not quiet, logging_level="ERROR")
        except Exception as err:  # ConnectionError, TimeoutError, RuntimeError depending on the failure
            raise ClusterError(
                f"cannot reach the Ray cluster at {address!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                "Start it with `ray start --head` (or `ray up cluster.yaml`), check the address, "
                "or unset RAY_ADDRESS to train on an embedded local cluster.") from None
    else:
        cpus = num_cpus or os.cpu_count() or 2
        mem = min(2 * 1024**3, int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.1))
        # The dashboard's state API is what lets Ray Train release a worker
        # group whose driver died (a Tune trial stopped early): without it
        # those CPUs stay reserved and later trials wait forever.
        try:
            ray.init(address="local", num_cpus=cpus, object_store_memory=mem, include_dashboard=True,
                     dashboard_host="127.0.0.1",
                     # quiet: workers' output goes to each run's run.log, not through the driver (raygen.train.console)
                     log_to_driver=not quiet, logging_level="ERROR")
        except Exception as err:  # e.g. "The current node timed out during startup" on an overloaded machine
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ClusterError(f"the local Ray cluster did not start ({first}). Retry when the machine is less "
                               "busy, or join a running cluster with --address / RAY_ADDRESS.") from None
    return ray.cluster_resources()


def cpus_per_worker(requested: float | None, workers: int, total_cpus: float) -> float:
    """Leave a CPU for Ray Data's read and decode tasks: workers at 1 CPU each on
    a 2-core machine leave none, and the data stream then never starts."""
    if requested is not None:
        if requested * workers > total_cpus:
            raise SpecError([f"scale.cpus_per_worker: {workers} workers × {requested} CPU exceed the cluster's "
                             f"{total_cpus:g} CPUs; lower it or scale.workers"])
        return requested
    share = (total_cpus - 1.0) / workers
    if share <= 0.05:
        raise SpecError([f"scale.workers: {workers} workers do not fit on {total_cpus:g} CPUs with room for data loading; "
                         "lower scale.workers or set scale.cpus_per_worker"])
    return round(min(1.0, share), 3) if share < 1 else float(int(share))
