"""The serving app in one process, without Ray: the same FastAPI app, routes, checks and
batcher as a Serve replica, with every model (and the scorer) loaded here.

For tests of the HTTP surface (the OpenAI client, limits, auth, schemathesis,
the browser) that do not need Ray's proxy and replicas, and for measuring the
HTTP path without Ray's hops (`bench/serve_batching.py`), and behind `raygen serve
--in-process` for one-machine use where the lowest latency matters: one process, no
replicas, no autoscaling.
"""
from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Union

from raygen.serving.app import AppArgs, AppPlan, load_plan


@dataclass
class LocalApp:
    api: Any            # fastapi.FastAPI
    plan: AppPlan
    slots: dict         # name -> deployments.ModelSlot (its sampler's counters, alias swaps)

    def close(self) -> None:
        """Stop following registry aliases."""
        for slot in self.slots.values():
            slot.close()


class _LocalScorer:
    """The scorer deployment's class run in process, with a handle's `.rerank.remote(...)`."""

    def __init__(self, plan: AppPlan):
        from raygen.serving.deployments import ScorerServer, _LocalMethod

        cls = ScorerServer.func_or_class
        self._scorer = cls(plan.args.scorer, plan.args.scorer_loader, tracking_uri=plan.tracking_uri,
                           imports=plan.imports, use_gpu=plan.args.scorer_gpus > 0)
        self.rerank = _LocalMethod(self._scorer.rerank)


def build_local(args: Union[AppArgs, dict], *, merge: bool = True) -> LocalApp:
    from raygen.serving.deployments import local_generator
    from raygen.serving.ingress import Frontend, HttpOptions, make_api

    plan = load_plan(args)
    spec = plan.serve
    slots, generators = {}, {}
    for entry in plan.models:
        slots[entry.name], generators[entry.name] = local_generator(
            entry.name, entry.uri, tracking_uri=plan.tracking_uri, imports=plan.imports,
            use_gpu=plan.args.replica_gpus > 0, merge=merge, max_batch_size=spec.max_batch_size,
            batch_wait_timeout_s=spec.batch_wait_timeout_s, max_queued_requests=spec.max_queued_requests,
            replicas=1, alias_poll_s=plan.args.alias_poll_s)
    scorer = _LocalScorer(plan) if plan.reranking == "ready" else None
    http = HttpOptions.model_validate(plan.http)
    front = Frontend(generators, scorer, cards=[e.card for e in plan.models], default_model=plan.models[0].name,
                     max_n=spec.max_n, request_timeout_s=spec.request_timeout_s, reranking=plan.reranking,
                     files=http.file_store())
    return LocalApp(api=make_api(front, **http.api_kwargs()), plan=plan, slots=slots)


class LocalServer:
    """uvicorn serving an ASGI app on 127.0.0.1 in a background thread (a context manager)."""

    def __init__(self, api, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.host = host
        self.port = port or _free_port(host)
        config = uvicorn.Config(api, host=host, port=self.port, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="raygen-local-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "LocalServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the local server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_in_process(args: AppArgs, *, host: str | None = None, port: int | None = None, insecure: bool = False,
                     out=sys.stdout) -> int:
    """`raygen serve --in-process`: the app in this process under uvicorn until SIGINT/SIGTERM.

    No Ray proxy and replica hops, so the HTTP path costs a few milliseconds less per
    request (bench/serve_batching.py): for one machine and one process's worth of load.
    Replicas, autoscaling and GPU fractions need Ray Serve (`raygen serve` without it)."""
    import uvicorn

    from raygen.serving.app import _check_port, _url, check_exposure

    app = build_local(args)
    spec = app.plan.serve
    host, port = host or spec.host, port or spec.port
    warning = check_exposure(host, app.plan.has_token, insecure)
    if warning:
        print(f"raygen serve: {warning}", file=sys.stderr, flush=True)
    _check_port(host, port)
    url = _url(host, port)
    lines = [f"raygen serve: {len(app.plan.models)} model(s) in process (no Ray) at {url}  "
             f"(playground {url}/, API docs {url}/docs)"]
    for i, entry in enumerate(app.plan.models):
        lines.append(f"  {entry.name}: {entry.summary}{'  [default]' if i == 0 else ''}")
    lines.append(f"  OpenAI images API: {url}/v1/images/generations; token: "
                 f"{'required' if app.plan.has_token else 'none (--token-file to require one)'}")
    lines.append(f"  best_of reranking: {app.plan.reranking}; max_n {spec.max_n}, batch {spec.max_batch_size}, "
                 f"queue {spec.max_queued_requests}, timeout {spec.request_timeout_s:g} s"
                 + (f"; serve.replicas {spec.replicas} needs Ray Serve: one process here" if spec.replicas > 1 else ""))
    lines.append("Press Ctrl-C (or send SIGTERM) to stop.")
    print("\n".join(lines), file=out, flush=True)
    # uvicorn catches SIGINT/SIGTERM itself (stops accepting, finishes what is in flight), then
    # raises the signal again to the handler found before it: ours notes it, so the exit is clean
    received: list[str] = []
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, _frame: received.append(signal.Signals(signum).name))
                for s in stop_signals}
    try:
        uvicorn.run(app.api, host=host, port=port, log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
    finally:
        for s in stop_signals:
            signal.signal(s, previous[s])
        app.close()
    print(f"raygen serve: {received[0] if received else 'server'} received, stopped", file=out, flush=True)
    return 0


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


__all__ = ["LocalApp", "LocalServer", "build_local", "serve_in_process"]
