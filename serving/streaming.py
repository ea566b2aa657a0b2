"""Streamed previews: a request sampled alone whose sampling loop reports each step.

The model's loop calls `raygen.models.sampling.preview(step, total, images)`
after every step; `PreviewSink` listens (in the sampling thread), turns the
steps chosen by `preview_steps` into uint8 images for the event loop, and
raises `SamplingCancelled` at the next step once the client has gone, so the
work stops instead of finishing for nobody. `stream_job` is the async
generator a replica returns: `{"type": "partial", ...}` events, then one
`{"type": "result", ...}` (the same dict as a plain request's result).

A streamed request is never merged into a batch with others: its steps are
its own, and a cancelled stream must not take other requests with it.
Server-sent events are written by `sse` and sent by `EventStream` (OpenAI's
`image_generation.*` events are built in `openai_images`, raygen's own
`preview`/`result`/`error` events in the ingress).
No Ray here: tested in plain Python.
"""
from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from starlette.responses import StreamingResponse

from raygen.serving.metrics import metrics
from raygen.serving.requests import SampleJob

def preview_steps(total: int, k: int) -> list[int]:
    """The steps (1..total-1) after which the k previews are sent: evenly spaced, never the last step
    (that is the final image); fewer than k when there are fewer steps than that."""
    if k <= 0 or total <= 1:
        return []
    return sorted({min(max(round(total * (i + 1) / (k + 1)), 1), total - 1) for i in range(k)})


class PreviewSink:
    """The preview callback of one streamed request (`raygen.models.sampling.previewing`).

    Called in the sampling thread; hands previews to the event loop of the
    request through `loop.call_soon_threadsafe`. `cancel()` (from the event
    loop, when the client goes) makes the next step raise `SamplingCancelled`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, *, k: int, model: str, family: str):
        self.loop, self.queue, self.k = loop, queue, k
        self.model, self.family = model, family
        self.cancelled = threading.Event()
        self.steps = 0          # sampling steps run for this request
        self.sent = 0           # previews handed over
        self._targets: Optional[list[int]] = None
        self._total: Optional[int] = None

    def cancel(self) -> None:
        self.cancelled.set()

    def __call__(self, step: int, total: int, images) -> None:
        from raygen.models.sampling import SamplingCancelled

        if self.cancelled.is_set():
            metrics().cancelled(self.model)
            raise SamplingCancelled(f"the client of a streamed request to {self.model!r} went away")
        self.steps += 1
        metrics().stepped(self.model, self.family)
        if images is None or not self.k:
            return
        if total != self._total:  # a new loop (a cascade level reports levels, diffusion its steps)
            self._total, self._targets = total, preview_steps(total, self.k)
        # a preview is due once the loop reaches its step; at most k in all
        if self.sent < self.k and self._targets and step >= self._targets[0] and step < total:
            while self._targets and step >= self._targets[0]:
                self._targets.pop(0)
            self._hand_over(step, total, images())

    def _hand_over(self, step: int, total: int, images) -> None:
        from raygen.images import to_uint8

        event = {"type": "partial", "index": self.sent, "step": step, "total": total,
                 "images": to_uint8(images.float().clamp(0, 1))}
        self.sent += 1
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


@dataclass
class StreamItem:
    """A streamed request as the batcher sees it: always a batch of its own (`alone`)."""
    job: SampleJob
    sink: PreviewSink
    alone: bool = True


async def stream_job(submit, job: SampleJob, k: int, *, model: str, family: str) -> AsyncIterator[dict]:
    """Partial events, then the result: `submit(StreamItem)` is the batcher's submit (a coroutine).

    When the consumer stops early (a client disconnect closes this generator),
    the sink is cancelled: a queued request is dropped unsampled and a running
    one stops at its next step."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    sink = PreviewSink(loop, queue, k=k, model=model, family=family)
    done = asyncio.ensure_future(submit(StreamItem(job, sink)))
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            finished, _ = await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
            if getter in finished:
                yield getter.result()
                continue
            getter.cancel()
            while not queue.empty():  # previews handed over just before the end
                yield queue.get_nowait()
            yield {"type": "result", **done.result()}
            return
    finally:
        if not done.done():
            sink.cancel()
            done.cancel()


def sse(event: str, data: Any) -> bytes:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode("utf-8")


class EventStream(StreamingResponse):
    """Server-sent events that stop when the client goes away.

    Starlette only notices a gone client when a write fails (ASGI 2.4) or
    through its own listener (older servers); here the listener always
    runs, so a client that leaves between two previews stops the sampling
    at once (closing the events' generator cancels the work)."""
    media_type = "text/event-stream"

    def __init__(self, content, **kwargs):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(kwargs.pop("headers", None) or {})}
        super().__init__(content, headers=headers, **kwargs)

    async def __call__(self, scope, receive, send) -> None:
        import anyio

        try:
            async with anyio.create_task_group() as group:
                async def produce() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-write
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(produce)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()
