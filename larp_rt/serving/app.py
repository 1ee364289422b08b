"""The HTTP server behind ``larp-rt serve``: FastAPI routes over one ``Engine`` and its step-level ``Scheduler``.

    server = build_server(engine, port=8000, max_batch=8, max_queue=64)   # a uvicorn.Server; .app .scheduler
    server.run()                                                          # what serve(engine, ...) does
    app = create_app(engine, scheduler, api_key=None, max_body_bytes=64 << 20, request_timeout=None)

Routes: ``POST /v1/generate`` (JSON, or a video, or server-sent progress events), ``POST /v1/encode``
(multipart video upload -> tokens), ``POST /v1/decode`` (tokens -> mp4 / gif / npy), ``GET /health``,
``GET /v1/models``, ``GET /metrics``. Every class id of a generate request is its own scheduler request on
stream i of the request's one seed, so concurrent HTTP requests share one continuous batch and a request's tokens
equal ``Engine.generate(class_ids, SamplingParams(seed=s, ...))``.

Failure modes, each with a JSON body ``{"error": message, "status": code}``: bad input 400 (the Engine's own
message), a missing or wrong API key 401, a body over the limit 413 (the Content-Length, else the bytes read), a
full queue 429 with Retry-After, shutting down 503, the request's deadline 504. A client that goes away (also
mid-stream) cancels its scheduler requests, which frees their rows at the next step. The lifespan starts the
scheduler and, at shutdown, drains it: uvicorn stops accepting and lets the requests in flight finish first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import io
import json
import logging
import math
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..engine import Engine
from ..sampling import SamplingParams, fresh_seed
from ..video import VideoError, fit_clip, grid, read_video, write_video
from .metrics import ServingMetrics
from .scheduler import QueueFull, RequestCancelled, Scheduler, SchedulerClosed

__all__ = ["create_app", "build_server", "serve", "LarpServer", "DEFAULT_MAX_BODY_BYTES"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 << 20
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/generate", "/v1/encode", "/v1/decode", "/v1/predict",
          "/v1/score", "/openapi.json", "/docs")
# /health: what a load balancer probes; /: the playground page (static, no data: it asks for the key itself)
PUBLIC = ("/health", "/")
PLAYGROUND = Path(__file__).with_name("static") / "playground.html"
GENERATE_KEYS = ("class_ids", "cfg_scale", "temperature", "top_k", "top_p", "seed", "format", "stream", "fps", "scale")
DECODE_KEYS = ("tokens", "format", "fps", "scale")
MEDIA = {"mp4": "video/mp4", "gif": "image/gif", "npy": "application/x-npy"}
HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream


class HTTPError(Exception):
    """An error response: status, the message the client reads, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


# ----------------------------------------------------------------------------------------------------
# the gate: API key, body size, per-route outcome counts (pure ASGI, so it sees every request, 404s included)
# ----------------------------------------------------------------------------------------------------
class _Gate:
    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics: ServingMetrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "other"
        status = [499]  # no response started: the client went away first

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            early = self._refuse(scope, path)
            if early is not None:
                return await early(scope, receive, send_counted)
            seen = 0

            async def receive_counted():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body:  # chunked uploads, or a Content-Length that lied
                        raise HTTPError(413, self._too_large(f"more than {self.max_body} bytes"),
                                        {"Connection": "close"})
                return message

            await self.app(scope, receive_counted, send_counted)
        finally:
            # an SSE stream's outcome is known only at its end (the status line said 200 long before)
            self.metrics.on_http(route, scope.get("larp_rt.status", status[0]))

    def _refuse(self, scope, path: str) -> Response | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and path not in PUBLIC:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                why = "missing" if not auth else "wrong"
                return _error(401, f"{why} API key: send the header 'Authorization: Bearer KEY' with the server's "
                              "--api-key (or LARP_RT_API_KEY)", {"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return _error(400, f"Content-Length must be a byte count, got {length!r}", {"Connection": "close"})
            if int(length) > self.max_body:
                return _error(413, self._too_large(f"{int(length)} bytes"), {"Connection": "close"})
        return None

    def _too_large(self, got: str) -> str:
        return (f"request body too large: {got}, the limit is {self.max_body} bytes "
                f"({self.max_body / 2**20:.4g} MiB, the server's --max-body-mb)")


# ----------------------------------------------------------------------------------------------------
# the app's state and the work it does off the event loop
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Job:
    class_ids: list[int]
    params: SamplingParams
    format: str
    stream: bool
    fps: float
    scale: int


class _State:
    def __init__(self, engine: Engine, scheduler: Scheduler | None, metrics: ServingMetrics, *, api_key, max_body_bytes,
                 request_timeout, max_classes: int, workers: int):
        self.engine, self.scheduler, self.metrics = engine, scheduler, metrics
        self.api_key, self.max_body_bytes, self.request_timeout = api_key, max_body_bytes, request_timeout
        self.max_classes = max_classes
        self.started = False  # the lifespan has started the scheduler
        self.draining = False  # SIGTERM (or the lifespan's end): refuse new work, finish what runs
        # encode / decode / video writing run in threads; a small limiter keeps a burst of uploads from taking
        # every core away from the generation loop
        self.limiter = anyio.CapacityLimiter(workers)

    async def work(self, fn: Callable, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    def begin_drain(self) -> None:
        self.draining = True

    @property
    def ready(self) -> bool:
        sched = self.scheduler
        return self.started and not self.draining and (sched is None or (sched.ready and sched.accepting))

    def refuse_if_draining(self) -> None:
        if self.draining or (self.started and self.scheduler is not None and not self.scheduler.accepting):
            raise HTTPError(503, "the server is shutting down and takes no new work; retry on another instance",
                            {"Retry-After": "5"})

    def need(self, part: str, what: str) -> None:
        cfg = self.engine.tokenizer_config if part == "tokenizer" else self.engine.generator_config
        if cfg is None:
            raise HTTPError(400, f"{what} needs a {part}, and this server's bundle has none "
                            f"(export one with --{part}); GET /v1/models lists the bundle's parts")

    # -- generate -------------------------------------------------------------------------------------
    def parse_generate(self, body: dict) -> _Job:
        _no_unknown_keys(body, GENERATE_KEYS, "/v1/generate")
        self.need("generator", "POST /v1/generate")
        ids = body.get("class_ids")
        if not isinstance(ids, list) or not ids:
            raise HTTPError(400, f"class_ids must be a non-empty list of ints, e.g. [0, 3], got {ids!r}")
        for i, c in enumerate(ids):
            if not isinstance(c, int) or isinstance(c, bool):
                raise HTTPError(400, f"class_ids[{i}] must be an int, got {c!r}")
        if len(ids) > self.max_classes:
            raise HTTPError(400, f"at most {self.max_classes} class ids per request (what the scheduler holds: "
                            f"max_batch + max_queue), got {len(ids)}: split the request")
        try:
            self.engine.check_class_ids(ids)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        given = {k: body[k] for k in ("cfg_scale", "temperature", "top_k", "top_p", "seed") if body.get(k) is not None}
        # one seed for every class id: row i draws from the stream (seed, i), as Engine.generate does
        given.setdefault("seed", fresh_seed())
        params = dataclasses.replace(self.engine.default_params, **given)
        try:
            params.validate(self.engine.generator_config.vocab_size)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        fmt = body.get("format", "json")
        if fmt not in ("json", "mp4", "gif"):
            raise HTTPError(400, f"format must be 'json' (tokens), 'mp4' or 'gif' (the decoded videos), got {fmt!r}")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise HTTPError(400, f"stream must be true or false, got {stream!r}")
        if stream and fmt != "json":
            raise HTTPError(400, "stream: true sends the tokens in its last event: use format 'json' with it "
                            "(then POST /v1/decode), or stream: false for an mp4 / gif")
        if fmt != "json":
            self.need("tokenizer", f"format {fmt!r}")
        fps, scale = _video_options(body)
        return _Job(ids, params, fmt, stream, fps, scale)

    def submit(self, job: _Job, on_step: Callable[[int], Callable] | None = None) -> list:
        """One scheduler request per class id (stream i); on any refusal the ones already in are cancelled."""
        reqs = []
        try:
            for i, c in enumerate(job.class_ids):
                reqs.append(self.scheduler.submit(c, job.params, stream=i, timeout=self.request_timeout,
                                                  on_step=None if on_step is None else on_step(i)))
        except QueueFull as e:
            _cancel(reqs)
            retry = max(1, math.ceil(e.retry_after))
            raise HTTPError(429, f"the queue is full ({self.scheduler.max_queue} waiting); retry after {retry} s",
                            {"Retry-After": str(retry)}) from None
        except SchedulerClosed:
            _cancel(reqs)
            self.refuse_if_draining()
            raise HTTPError(503, "the scheduler has stopped and takes no new work", {"Retry-After": "5"}) from None
        except ValueError as e:
            _cancel(reqs)
            raise HTTPError(400, str(e)) from None
        except BaseException:
            _cancel(reqs)
            raise
        return reqs

    def collect(self, job: _Job, reqs: list, t0: float) -> dict:
        """The finished requests -> the response JSON; the first failure becomes the HTTPError."""
        gens = []
        for r in reqs:
            try:
                gens.append(r.result(timeout=0))
            except TimeoutError:
                raise HTTPError(504, f"generation did not finish within the server's request timeout "
                                f"({self.request_timeout} s, --request-timeout)") from None
            except RequestCancelled:
                raise HTTPError(503, "the request was cancelled: the server stopped before it finished") from None
            except (ValueError, RuntimeError) as e:
                log.error("generation failed: %s", e)
                raise HTTPError(500, f"generation failed: {e}") from None
        tokens = np.concatenate([g.tokens for g in gens], axis=0)
        p = job.params
        return {
            "tokens": tokens.tolist(),
            "seeds": [p.seed] * len(gens),
            "class_ids": job.class_ids,
            "params": {"cfg_scale": p.cfg_scale, "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
                       "seed": p.seed},
            "seconds": round(time.monotonic() - t0, 6),
        }

    # -- video (threads) --------------------------------------------------------------------------------
    def render(self, tokens: np.ndarray, fmt: str, fps: float, scale: int) -> bytes:
        videos = self.engine.decode(tokens)  # (B, 3, T, H, W) float32
        if fmt == "npy":
            buf = io.BytesIO()
            np.save(buf, videos, allow_pickle=False)
            return buf.getvalue()
        with tempfile.TemporaryDirectory(prefix="larp_rt-serve-") as d:
            # several videos tile a grid (as `larp-rt generate` writes them); one is written as it is
            frames = grid(videos, pad=2 if len(videos) > 1 else 0, scale=scale)
            return write_video(Path(d) / f"out.{fmt}", frames, fps=fps).read_bytes()

    def encode_file(self, path: str, name: str) -> dict:
        C, T, H, W = self.engine.tokenizer_config.video_shape
        try:
            # T + 1 frames at most: enough to know there were more, without decoding a long upload whole
            frames, fps = read_video(path, max_frames=T + 1)
        except (VideoError, ValueError, OSError) as e:
            raise HTTPError(400, f"unreadable upload {name!r}: {str(e).replace(repr(path), repr(name))}") from None
        t0, h0, w0 = frames.shape[:3]
        notes = []
        if t0 > T:
            frames = frames[:T]
            notes.append(f"kept the first {T} frames of a longer video")
        clip, fit_notes = fit_clip(frames, T, H, W)
        notes += fit_notes
        tokens = self.engine.encode(clip[None])
        return {"tokens": tokens.tolist(), "notes": [f"{n} (the model takes {T}x{H}x{W})" for n in notes],
                # frames: null when the upload is longer than T (only its first T frames are read)
                "input": {"frames": t0 if t0 <= T else None, "height": h0, "width": w0, "fps": fps},
                "model_input": {"frames": T, "height": H, "width": W}}

    # -- the manifest summary ---------------------------------------------------------------------------
    def tasks(self) -> list[str]:
        """The routes this bundle can answer: generate (class-conditional) or predict (frame prediction),
        encode / decode (a tokenizer), score (a tokenizer with its AR prior)."""
        eng, out = self.engine, []
        if eng.generator_config is not None:
            out.append("predict" if eng.predicts_frames else "generate")
        if eng.tokenizer_config is not None:
            out += ["encode", "decode"] + (["score"] if eng.has_prior else [])
        return out

    def models(self) -> dict:
        eng, m = self.engine, self.engine.bundle.manifest
        parts = [k for k in ("tokenizer", "generator") if m.get(k)]
        out: dict[str, Any] = {
            "id": eng.bundle.path.name,
            "larp_rt": __version__,
            "format_version": m.get("format_version"),
            "parts": parts,
            "precision": m.get("precision", "fp32"),
            "graphs": {name: {"file": g.get("file"), "inputs": [i.get("name") for i in g.get("inputs", [])],
                              "outputs": [o.get("name") for o in g.get("outputs", [])]}
                       for name, g in (m.get("graphs") or {}).items()},
            "backend": eng.backend_name,
            "sampler": {"running": eng.sampler_name, "bundle": m.get("sampler")},
            "default_sampling": dataclasses.asdict(eng.default_params),
            "created_by": m.get("created_by"),
            "tasks": self.tasks(),
            "limits": {"max_body_bytes": self.max_body_bytes, "request_timeout": self.request_timeout,
                       "max_classes_per_request": self.max_classes},
        }
        for k in parts:
            out[k] = m[k]
        sched = self.scheduler
        out["scheduler"] = None if sched is None else {"max_batch": sched.max_batch, "max_queue": sched.max_queue}
        return out


def _no_unknown_keys(body: dict, allowed: tuple[str, ...], route: str) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise HTTPError(400, f"unknown field(s) {unknown} for {route}; it takes {', '.join(allowed)}")


def _video_options(body: dict) -> tuple[float, int]:
    fps, scale = body.get("fps", 8.0), body.get("scale", 1)
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not (0 < fps <= 240):
        raise HTTPError(400, f"fps must be a number in (0, 240], got {fps!r}")
    if not isinstance(scale, int) or isinstance(scale, bool) or not (1 <= scale <= 16):
        raise HTTPError(400, f"scale must be an int in [1, 16] (nearest upscaling), got {scale!r}")
    return float(fps), scale


def _cancel(reqs) -> None:
    for r in reqs:
        if not r.done():
            r.cancel()


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable) -> None:
    """From the scheduler's thread; a closed loop (the server has gone) has nobody left to tell."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn)


class _Waker:
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
            _call_soon(self.loop, self._wake)

    def on_step(self, i: int) -> Callable:
        def hook(step: int, total: int, token: int) -> None:  # step 0..total-1: report tokens done
            self.steps[i], self.total[i] = step + 1, total
            self.poke()

        return hook


async def _until_disconnect(request: Request) -> None:
    # once the body is read, uvicorn's receive() blocks until the client goes away (or the response completes)
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _await_all(request: Request, reqs: list, waker: _Waker) -> bool:
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
                _cancel(reqs)
                return False
        return True
    finally:
        gone.cancel()


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class _EventStream(StreamingResponse):
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


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    if not raw.strip():
        raise HTTPError(400, "the request body is empty: send a JSON object (Content-Type: application/json)")
    try:
        body = json.loads(raw)
    except ValueError as e:  # bad syntax, bad UTF-8, an int past Python's digit limit
        raise HTTPError(400, f"malformed JSON body: {e}") from None
    except RecursionError:
        raise HTTPError(400, "malformed JSON body: nested too deeply") from None
    if not isinstance(body, dict):
        raise HTTPError(400, f"the body must be a JSON object, got a JSON {type(body).__name__}")
    return body


# ----------------------------------------------------------------------------------------------------
# the app
# ----------------------------------------------------------------------------------------------------
def create_app(
    engine: Engine,
    scheduler: Scheduler | None,
    *,
    metrics: ServingMetrics | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    request_timeout: float | None = None,
    workers: int = 2,
) -> FastAPI:
    """The FastAPI app. ``scheduler`` runs over ``engine`` (its lifespan starts it and drains it at shutdown;
    None for a bundle without a generator, which serves encode / decode only);
    ``metrics``: the ServingMetrics the scheduler was built with as its observer (default: the scheduler's
    observer if it is one, else a new one that sees only the HTTP layer). ``api_key``: required as a Bearer
    token on every route but /health. ``request_timeout``: seconds a generation may take from submission
    (None: no limit) -> 504. ``workers``: threads for encode / decode / video writing."""
    if not isinstance(engine, Engine):
        raise ValueError(f"engine must be a larp_rt.Engine, got {type(engine).__name__}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError("api_key must be a non-empty string, or None for no authentication")
    if not isinstance(max_body_bytes, int) or isinstance(max_body_bytes, bool) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive int, got {max_body_bytes!r}")
    if request_timeout is not None and (not isinstance(request_timeout, (int, float)) or not request_timeout > 0
                                        or isinstance(request_timeout, bool) or not math.isfinite(request_timeout)):
        raise ValueError(f"request_timeout must be a number of seconds > 0, or None for no limit, got "
                         f"{request_timeout!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if scheduler is None and engine.generator_config is not None:
        raise ValueError("the bundle has a generator: give create_app a Scheduler over the engine")
    if scheduler is not None and (not isinstance(scheduler, Scheduler) or scheduler.engine is not engine):
        raise ValueError("scheduler must be a larp_rt.serving.Scheduler over the same engine")
    max_batch = 1 if scheduler is None else scheduler.max_batch
    if metrics is None:
        obs = None if scheduler is None else scheduler.observer
        metrics = obs if isinstance(obs, ServingMetrics) else ServingMetrics(max_batch)
    max_classes = 0 if scheduler is None else scheduler.max_batch + scheduler.max_queue
    st = _State(engine, scheduler, metrics, api_key=api_key, max_body_bytes=max_body_bytes,
                request_timeout=request_timeout, max_classes=max(1, max_classes), workers=workers)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if scheduler is not None:
            scheduler.start()  # idempotent; starts the loop thread and returns
        st.started = True
        try:
            yield
        finally:
            # uvicorn has stopped accepting and waited for the connections in flight; whatever is still queued
            # (a client that went away leaves nothing: its requests were cancelled) finishes before the exit
            st.begin_drain()
            if scheduler is not None:
                await anyio.to_thread.run_sync(lambda: scheduler.stop(drain=True))

    app = FastAPI(title="larp_rt", version=__version__, lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None)
    app.state.larp = st

    @app.exception_handler(HTTPError)
    async def _on_http_error(request: Request, e: HTTPError):
        return _error(e.status, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _on_starlette_error(request: Request, e: StarletteHTTPException):  # 404, 405, bad multipart
        return _error(e.status_code, str(e.detail), dict(e.headers or {}))

    @app.exception_handler(ClientDisconnect)
    async def _on_disconnect(request: Request, e: ClientDisconnect):  # gone while sending the body: nobody reads
        return Response(status_code=499)

    @app.get("/", include_in_schema=False)
    async def playground():
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        status = ("ok" if st.ready else "draining" if st.draining else "starting" if not st.started
                  else "unavailable")  # started, not draining, yet the scheduler is not ready: its loop has stopped
        body = {"status": status, "ready": st.ready, **({} if st.scheduler is None else st.scheduler.stats())}
        return JSONResponse(body, status_code=200 if st.ready else 503)

    @app.get("/metrics")
    async def metrics_route():
        data, ctype = st.metrics.render()
        return Response(content=data, media_type=ctype)

    @app.get("/v1/models")
    async def models():
        return st.models()

    @app.post("/v1/generate")
    async def generate(request: Request):
        st.refuse_if_draining()
        job = st.parse_generate(await _json_body(request))
        t0 = time.monotonic()
        waker = _Waker(asyncio.get_running_loop(), len(job.class_ids))
        if job.stream:
            reqs = st.submit(job, on_step=waker.on_step)
            return _EventStream(_progress_events(st, job, reqs, waker, t0, request.scope),
                                on_close=lambda finished: _cancel(reqs))
        reqs = st.submit(job)
        try:
            if not await _await_all(request, reqs, waker):
                return Response(status_code=499)  # nobody is listening; the rows are already freed
            result = st.collect(job, reqs, t0)
        finally:
            _cancel(reqs)
        if job.format == "json":
            return JSONResponse(result)
        data = await st.work(st.render, np.asarray(result["tokens"], np.int64), job.format, job.fps, job.scale)
        return Response(content=data, media_type=MEDIA[job.format],
                        headers={"X-Larp-Seed": str(job.params.seed),
                                 "Content-Disposition": f'inline; filename="samples.{job.format}"'})

    @app.post("/v1/encode")
    async def encode(request: Request):
        st.refuse_if_draining()
        st.need("tokenizer", "POST /v1/encode")
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise HTTPError(400, "POST /v1/encode takes multipart/form-data with the video in the field 'file' "
                            f"(curl -F file=@clip.mp4 ...), got Content-Type {ctype or 'none'!r}")
        async with request.form(max_files=1, max_fields=8) as form:
            up = form.get("file")
            if up is None or isinstance(up, str):
                raise HTTPError(400, "no video in the multipart field 'file': upload it as a file "
                                "(curl -F file=@clip.mp4 ...)")
            name = up.filename or "upload"
            suffix = Path(name).suffix.lower()
            suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ""
            with tempfile.NamedTemporaryFile(prefix="larp_rt-upload-", suffix=suffix) as tmp:
                await st.work(shutil.copyfileobj, up.file, tmp)
                tmp.flush()
                return await st.work(st.encode_file, tmp.name, name)

    @app.post("/v1/decode")
    async def decode(request: Request):
        st.refuse_if_draining()
        st.need("tokenizer", "POST /v1/decode")
        body = await _json_body(request)
        _no_unknown_keys(body, DECODE_KEYS, "/v1/decode")
        fmt_q, fmt_b = request.query_params.get("format"), body.get("format")
        if fmt_q is not None and fmt_b is not None and fmt_q != fmt_b:
            raise HTTPError(400, f"format is {fmt_q!r} in the query but {fmt_b!r} in the body: give one")
        fmt = fmt_q or fmt_b or "mp4"
        if fmt not in MEDIA:
            raise HTTPError(400, f"format must be 'mp4', 'gif' or 'npy' (the decoded float32 videos), got {fmt!r}")
        fps, scale = _video_options(body)
        tokens = _tokens_array(body.get("tokens"))
        try:
            tokens = engine.check_tokens(tokens)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        data = await st.work(st.render, tokens, fmt, fps, scale)
        return Response(content=data, media_type=MEDIA[fmt],
                        headers={"Content-Disposition": f'inline; filename="decoded.{fmt}"'})

    # the gate sits inside FastAPI's error middleware (an exception in it still becomes a 500) and outside its
    # router, so it sees every request, unknown routes included
    app.add_middleware(_Gate, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    return app


def _tokens_array(tokens) -> np.ndarray:
    if not isinstance(tokens, list) or not tokens:
        raise HTTPError(400, f"tokens must be a (B, N) list of lists of ints (or one list of N), got {tokens!r:.80}")
    try:
        x = np.asarray(tokens)
    except (ValueError, OverflowError) as e:
        raise HTTPError(400, f"tokens must be a (B, N) list of lists of ints of equal length: {e}") from None
    if x.dtype == object:
        raise HTTPError(400, "tokens must hold ints only, in a (B, N) list of lists of equal length")
    return x[None] if x.ndim == 1 else x


async def _progress_events(st: _State, job: _Job, reqs: list, waker: _Waker, t0: float, scope) -> AsyncIterator[bytes]:
    """accepted, then progress per class id as its steps advance (coalesced), then result (or error)."""
    for r in reqs:
        r.add_done_callback(waker.poke)
    total = getattr(reqs[0], "total", None) or st.engine.generator_config.max_seq_len
    yield _sse("accepted", {"class_ids": job.class_ids, "seed": job.params.seed, "total": total})
    sent = [0] * len(reqs)
    while True:
        waker.event.clear()
        finished = all(r.done() for r in reqs)
        for i, k in enumerate(waker.steps):
            if k != sent[i]:
                sent[i] = k
                yield _sse("progress", {"index": i, "class_id": job.class_ids[i], "step": k,
                                        "total": waker.total[i] or total})
        if finished:
            break
        try:
            await asyncio.wait_for(waker.event.wait(), HEARTBEAT_S)
        except asyncio.TimeoutError:
            yield b": keep-alive\n\n"
    try:
        yield _sse("result", st.collect(job, reqs, t0))
    except HTTPError as e:
        scope["larp_rt.status"] = e.status
        yield _sse("error", {"error": e.message, "status": e.status})


# ----------------------------------------------------------------------------------------------------
# uvicorn
# ----------------------------------------------------------------------------------------------------
class LarpServer(uvicorn.Server):
    """uvicorn's server; SIGTERM / SIGINT first mark the app draining (/health 503, new work 503), then uvicorn's
    graceful shutdown stops accepting, waits for the requests in flight, and the lifespan drains the scheduler."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    @property
    def state(self) -> _State:
        return self.app.state.larp

    @property
    def scheduler(self) -> Scheduler | None:
        return self.state.scheduler

    def handle_exit(self, sig, frame) -> None:
        self.state.begin_drain()
        super().handle_exit(sig, frame)


def build_server(
    engine: Engine,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    max_queue: int = 64,
    request_timeout: float | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    api_key: str | None = None,
    graceful_timeout: float | None = None,
    log_level: str = "info",
) -> LarpServer:
    """Scheduler + metrics + app + uvicorn server over ``engine``; ``.run()`` serves until SIGTERM / SIGINT.
    graceful_timeout: seconds uvicorn waits for requests in flight at shutdown (None: as long as they take)."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
    metrics = ServingMetrics(max_batch)
    # a tokenizer-only bundle has nothing to generate: no scheduler, encode / decode only
    scheduler = (Scheduler(engine, max_batch=max_batch, max_queue=max_queue, observer=metrics)
                 if engine.generator_config is not None else None)
    app = create_app(engine, scheduler, metrics=metrics, api_key=api_key, max_body_bytes=max_body_bytes,
                     request_timeout=request_timeout)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=graceful_timeout, server_header=False)
    return LarpServer(config, app)


def serve(engine: Engine, **kwargs) -> None:
    """Run the server (blocking) until SIGTERM / SIGINT; the arguments are build_server's."""
    build_server(engine, **kwargs).run()
