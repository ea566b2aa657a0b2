"""Join a Ray cluster or start an embedded one, with errors users can act on."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

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
            if is_auth_refusal(err):
                raise ClusterError(needs_token_message(f"the Ray cluster at {address!r}", err)) from None
            raise ClusterError(
                f"cannot reach the Ray cluster at {address!r} ({type(err).__name__}: {redact(str(err).splitlines()[0]) if str(err) else ''}). "
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


# ---------------------------------------------------------------- where the workers ran
WORKERS_FILE = "workers.jsonl"


def placement_strategy(placement: str) -> str:
    """`scale.placement` as Ray's placement group strategy name."""
    return placement.upper()


def record_worker_node(run_dir: Path, rank: int, world_size: int) -> None:
    """Append this worker's node (IP and id) to the run's workers.jsonl: one
    line per worker start, so a restart after a node failure shows where the
    workers went. One short append per line keeps concurrent writers whole."""
    import ray

    line = json.dumps({"rank": rank, "world_size": world_size, "node_ip": ray.util.get_node_ip_address(),
                       "node_id": ray.get_runtime_context().get_node_id(), "time": time.time()})
    with open(Path(run_dir) / WORKERS_FILE, "a") as f:
        f.write(line + "\n")


def worker_nodes(run_dir: Path) -> list[dict]:
    """Every worker start recorded in the run's workers.jsonl, oldest first."""
    path = Path(run_dir) / WORKERS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def describe_placement(records: list[dict]) -> str:
    """Where the last start of each rank ran, e.g. '127.0.0.1: ranks 0; 127.0.0.2: ranks 1'."""
    last = {r["rank"]: r["node_ip"] for r in records}
    by_node: dict[str, list[int]] = {}
    for rank in sorted(last):
        by_node.setdefault(last[rank], []).append(rank)
    return "; ".join(f"{ip}: rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
                     for ip, ranks in sorted(by_node.items()))


# ---------------------------------------------------------------- token auth
TOKEN_HOWTO = ("pass --token-file FILE, or set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH=FILE) with RAY_AUTH_MODE=token; "
               "`ray get-auth-token` on the head prints it")


def token_auth(token_file: str | None) -> None:
    """Before Ray is imported (it reads these once): `--token-file`, or a token
    in RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH with RAY_AUTH_MODE unset, turns
    token auth on for this client."""
    if token_file:
        use_token_file(token_file)
    elif "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_MODE"] = "token"


def use_token_file(path: str) -> None:
    """`--token-file`: Ray reads the token from the file itself (RAY_AUTH_TOKEN_PATH),
    so raygen never holds it in an argument, a message or a log."""
    file = Path(path).expanduser()
    try:
        empty = not file.read_text().strip()
    except OSError as err:
        raise ClusterError(f"--token-file {path}: {err.strerror or err}; give the file that holds the cluster's "
                           "Ray auth token") from None
    if empty:
        raise ClusterError(f"--token-file {path} is empty; give the file that holds the cluster's Ray auth token")
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(file.resolve())
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the file
    os.environ["RAY_AUTH_MODE"] = "token"


def _token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for candidate in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if candidate:
            try:
                return Path(candidate).read_text().strip() or None
            except OSError:
                continue
    return None


def redact(text: str) -> str:
    """`text` without the auth token in it: for any message raygen shows that quotes Ray."""
    token = _token()
    return text.replace(token, "<token>") if token and len(token) >= 8 else text


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def _chain_text(err: BaseException) -> str:
    return " ".join(str(e) for e in _chain(err)).lower()


def is_auth_refusal(err: BaseException) -> bool:
    """A refusal by a cluster that wants a (different) token: Ray's
    AuthenticationError (HTTP 401/403, gRPC InvalidAuthToken), also when
    ray.init wraps it in a ConnectionError, or a message that words it so."""
    from ray.exceptions import AuthenticationError
    if any(isinstance(e, AuthenticationError) for e in _chain(err)):
        return True
    text = _chain_text(err)
    return any(mark in text for mark in ("authentication required", "authentication failed", "unauthenticated",
                                         "missing authentication token", "invalid authentication token",
                                         "token authentication is enabled"))


def needs_token_message(what: str, err: BaseException) -> str:
    """One line: the cluster refused us for want of a (valid) token, and what to set."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode not in (None, "token") and _token():
        return f"{what} requires a Ray auth token, and RAY_AUTH_MODE={mode} keeps the one you have from being sent: set RAY_AUTH_MODE=token"
    text = _chain_text(err)
    wrong = ("invalid" in text or "authentication failed" in text or "incorrect" in text) and bool(_token())
    return f"{what} {'refused the auth token given' if wrong else 'requires a Ray auth token'}: {TOKEN_HOWTO}"
