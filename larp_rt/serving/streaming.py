"""Answering a scheduler job over HTTP: waiting for it while watching for the client to go away, or streaming its
progress as server-sent events.

The scheduler runs on its own thread; ``Waker`` carries its progress and completions to the event loop (coalesced,
so a fast loop does not flood it). A client that goes away, before the answer or mid-stream, cancels the job's
scheduler requests, which frees their rows at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable

import anyio
import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .errors import HTTPError
from .media import MEDIA
from .state import Job, State, cancel_all  # the state sits below: it validates and submits, this module answers

__all__ = ["HEARTBEAT_S", "cancel_all", "call_soon", "Waker", "await_all", "sse", "EventStream", "answer_job"]

HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream


def call_soon(loop: asyncio.AbstractEventLoop, fn: Callable) -> None:
    """From the scheduler's thread; a closed loop (the server has gone) has nobody left to tell."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn)


class Waker:
    """Wakes the request's coroutine from the scheduler thread: progress (coalesced to one pending wake-up, so a
    fast loop does not flood the event loop) and completions."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int):
        self.loop, self.event = loop, asyncio.Event()
        self.steps, self.total = [0] * n, [0] * n
        self._pending = False

    def _wake(self) -> None:
        self._pending = False
        self.event.set()

    def poke(self, *_):
        if not self._pending:
            self._pending = True
            call_soon(self.loop, self._wake)

    def on_step(self, i: int) -> Callable:
        def hook(step: int, total: int, token: int) -> None:  # step 0..total-1: report tokens done
            self.steps[i], self.total[i] = step + 1, total
            self.poke()

        return hook

async def _until_disconnect(request: Request) -> None:
    # once the body is read, uvicorn's receive() blocks until the client goes away (or the response completes)
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def await_all(request: Request, reqs: list, waker: Waker) -> bool:
    """True once every request is done; False if the client went away first (their rows are then freed)."""
    for r in reqs:
        r.add_done_callback(waker.poke)
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        while not all(r.done() for r in reqs):
            waker.event.clear()
            if all(r.done() for r in reqs):
                break
            wake = asyncio.ensure_future(waker.event.wait())
            await asyncio.wait({gone, wake}, return_when=asyncio.FIRST_COMPLETED)
            wake.cancel()
            if gone.done():
                cancel_all(reqs)
                return False
        return True
    finally:
        gone.cancel()


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class EventStream(StreamingResponse):
    """Server-sent events. A task watches for the client going away and stops the stream at once (uvicorn tells
    only through receive()); ``on_close(finished)`` runs however the stream ends."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[bool], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        finished = False
        try:
            async with anyio.create_task_group() as tg:

                async def watch():
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                finished = True
                tg.cancel_scope.cancel()
        finally:
            if not finished:
                scope["larp_rt.status"] = 499
            self.on_close(finished)
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def answer_job(st: State, job: Job, request: Request, submit: Callable, accepted: dict):
    """Submit a generate / predict job (``submit(on_step factory or None) -> requests``, or a coroutine of them)
    and answer it: JSON, a video, or server-sent events."""
    t0 = time.monotonic()
    waker = Waker(asyncio.get_running_loop(), job.n)
    reqs = submit(waker.on_step if job.stream else None)  # progress hooks only for a stream: they wake the loop
    if asyncio.iscoroutine(reqs):
        reqs = await reqs
    if job.stream:
        return EventStream(_progress_events(st, job, reqs, waker, t0, request.scope, accepted),
                            on_close=lambda finished: cancel_all(reqs))
    try:
        if not await await_all(request, reqs, waker):
            return Response(status_code=499)  # nobody is listening; the rows are already freed
        result = st.collect(job, reqs, t0)
    finally:
        cancel_all(reqs)
    if job.format == "json":
        return JSONResponse(result)
    data = await st.work(st.render, np.asarray(result["tokens"], np.int64), job.format, job.fps, job.scale)
    return Response(content=data, media_type=MEDIA[job.format],
                    headers={"X-Larp-Seed": str(job.params.seed),
                             "Content-Disposition": f'inline; filename="samples.{job.format}"'})


async def _progress_events(st: State, job: Job, reqs: list, waker: Waker, t0: float, scope,
                           accepted: dict) -> AsyncIterator[bytes]:
    """accepted, then progress per scheduler request as its steps advance (coalesced), then result (or error)."""
    for r in reqs:
        r.add_done_callback(waker.poke)
    total = getattr(reqs[0], "total", None) or st.engine.generator_config.max_seq_len
    yield sse("accepted", {**accepted, "total": total})
    sent = [0] * len(reqs)
    while True:
        waker.event.clear()
        finished = all(r.done() for r in reqs)
        for i, k in enumerate(waker.steps):
            if k != sent[i]:
                sent[i] = k
                extra = {"class_id": job.class_ids[i]} if job.clip is None else {}
                yield sse("progress", {"index": i, **extra, "step": k, "total": waker.total[i] or total})
        if finished:
            break
        try:
            await asyncio.wait_for(waker.event.wait(), HEARTBEAT_S)
        except asyncio.TimeoutError:
            yield b": keep-alive\n\n"
    try:
        yield sse("result", st.collect(job, reqs, t0))
    except HTTPError as e:
        scope["larp_rt.status"] = e.status
        yield sse("error", {"error": st.scrub(e.message), "status": e.status})
