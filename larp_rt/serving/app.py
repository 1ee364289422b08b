"""The HTTP server behind ``larp-rt serve``: FastAPI routes over one ``Engine`` and its step-level ``Scheduler``.

    server = build_server(engine, port=8000, max_batch=8, max_queue=64)   # a uvicorn.Server; .app .scheduler
    server.run()                                                          # what serve(engine, ...) does
    app = create_app(engine, scheduler, api_key=None, max_body_bytes=64 << 20, request_timeout=None)

Routes (their request and response models are in ``schemas``; the schema is served at ``/openapi.json``, the
interactive docs at ``/docs``, both behind the API key when one is set): ``POST /v1/generate`` (JSON -> tokens, a
video, or server-sent progress events), ``POST /v1/predict`` (a video's first frames -> the predicted clip, on
frame-prediction bundles), ``POST /v1/encode`` (a video upload -> tokens), ``POST /v1/decode`` (tokens -> mp4 / gif
/ npy), ``POST /v1/score`` (tokens or videos -> the tokenizer prior's NLL), ``GET /health``, ``GET /v1/models``,
``GET /metrics``, and ``GET /`` (the playground page). Every class id of a generate request is its own scheduler
request on stream i of the request's one seed, so concurrent HTTP requests share one continuous batch and a
request's tokens equal ``Engine.generate(class_ids, SamplingParams(seed=s, ...))``; a predict request is one
scheduler request whose tokens equal ``Engine.predict``'s.

Failure modes, each with a JSON body ``{"error": message, "status": code}``: bad input 400 (the field's rule or
the Engine's own message), JSON sent under another Content-Type 415, a missing or wrong API key 401, a body over
the limit 413 (the Content-Length, else the bytes read), a full queue 429 with Retry-After, shutting down 503, the
request's deadline 504. A client that goes away (also mid-stream) cancels its scheduler requests, which frees
their rows at the next step. The lifespan starts the scheduler and, at shutdown, drains it: uvicorn stops
accepting and lets the requests in flight finish first.
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
from typing import Annotated, Any

import anyio
import numpy as np
import uvicorn
from fastapi import FastAPI, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import __version__
from ..engine import Engine
from ..sampling import SamplingParams, fresh_seed
from ..video import VideoError, fit_clip, grid, read_video, write_video
from . import schemas as S
from .metrics import ServingMetrics
from .scheduler import QueueFull, RequestCancelled, Scheduler, SchedulerClosed

__all__ = ["create_app", "build_server", "serve", "LarpServer", "DEFAULT_MAX_BODY_BYTES"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 << 20
# resource budgets (create_app's arguments; `larp-rt serve` flags), each refused with a message naming it
DEFAULT_MAX_VIDEO_PIXELS = 1 << 24  # one response's video: rows x frames x height x width x scale^2 (16.8 M)
GIF_COST = 4  # a GIF's palette quantisation costs about 4x an mp4's encoding per pixel: it counts 4x
DEFAULT_MAX_UPLOAD_PIXELS = 1 << 23  # one uploaded frame's width x height (8.4 M: 4K UHD fits)
DECODE_CHUNK = 16  # token rows per decoder run when a response decodes many
DEFAULT_MAX_MEDIA_JOBS = 8  # encode / decode / upload jobs admitted at once (running or waiting); more: 429
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/generate", "/v1/encode", "/v1/decode", "/v1/predict",
          "/v1/score", "/openapi.json", "/docs")
# /health: what a load balancer probes; /: the playground page (static, no data: it asks for the key itself)
PUBLIC = ("/health", "/")
PLAYGROUND = Path(__file__).with_name("static") / "playground.html"
# the page loads nothing from elsewhere, posts no forms, and is framed by nobody (clickjacking); blob: is the
# clips it decodes, which it plays and offers for download
PLAYGROUND_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                  "connect-src 'self' blob:; img-src 'self' blob:; media-src 'self' blob:; form-action 'none'; "
                  "base-uri 'none'; frame-ancestors 'none'")
DOCS_STATIC = "/docs-static"  # the interactive docs' own scripts, served from the package (no CDN)
UPLOAD_ROUTES = ("/v1/encode", "/v1/predict")  # multipart only; /v1/score takes either
# each route's body model: its field list goes into the unknown-field message
BODY_MODELS = {"/v1/generate": S.GenerateRequest, "/v1/decode": S.DecodeRequest, "/v1/encode": S.EncodeForm,
               "/v1/predict": S.PredictForm}
ERRORS = {code: {"model": S.ErrorBody, "description": what} for code, what in (
    (400, "bad input: the field's rule or the Engine's message"), (401, "missing or wrong API key"),
    (413, "body over the server's limit"), (415, "JSON sent without Content-Type: application/json"),
    (429, "queue full (Retry-After)"), (503, "shutting down, or the bundle cannot serve this"),
    (504, "the request's deadline passed"))}
BINARY = {"schema": {"type": "string", "format": "binary"}}
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
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def _host_name(value: str) -> str:
    """A Host header -> its name, lowercased, without the port ('[::1]:8000' -> '::1')."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


class _Gate:
    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics: ServingMetrics,
                 allowed_hosts: tuple[str, ...] = ("*",), body_timeout: float = 30.0):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body_bytes, metrics
        self.body_timeout = body_timeout
        self.allowed_hosts = tuple(h.lower() for h in allowed_hosts)

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
            seen, body_done = 0, False

            async def receive_counted():
                nonlocal seen, body_done
                if body_done:  # after the body, receive() waits for the client to go away: no deadline
                    return await receive()
                try:
                    with anyio.fail_after(self.body_timeout):  # each chunk of the body within the deadline
                        message = await receive()
                except TimeoutError:
                    raise HTTPError(408, f"the request body stalled: no bytes for {self.body_timeout:g} s "
                                    "(--body-timeout)", {"Connection": "close"}) from None
                if message["type"] != "http.request" or not message.get("more_body", False):
                    body_done = True
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body:  # chunked uploads, or a Content-Length that lied
                        raise HTTPError(413, self._too_large(f"more than {self.max_body} bytes"),
                                        {"Connection": "close"})
                return message

            await self.app(scope, receive_counted, send_counted)
        except Exception:
            status[0] = 500  # the error middleware outside answers it: the client did not go away
            raise
        finally:
            # an SSE stream's outcome is known only at its end (the status line said 200 long before)
            self.metrics.on_http(route, scope.get("larp_rt.status", status[0]))

    def _host_allowed(self, host: str) -> bool:
        if "*" in self.allowed_hosts:
            return True
        name = _host_name(host)
        return any(name == h or (h.startswith("*.") and name.endswith(h[1:])) for h in self.allowed_hosts)

    def _refuse(self, scope, path: str) -> Response | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if not self._host_allowed(host):
            # a page on another site that resolves its name to this machine (DNS rebinding) gets nothing here
            return _error(400, f"Host {host!r} is not one this server answers to ({', '.join(self.allowed_hosts)}): "
                          "start it with --allowed-hosts NAME (or '*' behind a proxy that checks the host)")
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
    """A validated generate / predict request: its sampling, its output, and (for predict) its clip."""

    params: SamplingParams
    format: str
    stream: bool
    fps: float
    scale: int
    class_ids: list[int] = dataclasses.field(default_factory=list)  # generate: one scheduler request each
    clip: np.ndarray | None = None  # predict: (1, T, H, W, 3) uint8, fitted to the model
    num_cond_frames: int = 0
    stochastic_cond: bool = False
    cond_seed: int | None = None
    upload: dict | None = None  # predict: notes, input, model_input

    @property
    def n(self) -> int:
        return len(self.class_ids) if self.clip is None else 1


def _given(body, names) -> dict:
    return {k: getattr(body, k) for k in names if getattr(body, k) is not None}


class _State:
    def __init__(self, engine: Engine, scheduler: Scheduler | None, metrics: ServingMetrics, *, api_key, max_body_bytes,
                 request_timeout, max_classes: int, workers: int, max_video_pixels: int = DEFAULT_MAX_VIDEO_PIXELS,
                 max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS, max_media_jobs: int = DEFAULT_MAX_MEDIA_JOBS):
        self.engine, self.scheduler, self.metrics = engine, scheduler, metrics
        self.max_video_pixels, self.max_upload_pixels = max_video_pixels, max_upload_pixels
        self.max_media_jobs, self.media_jobs = max_media_jobs, 0
        self.api_key, self.max_body_bytes, self.request_timeout = api_key, max_body_bytes, request_timeout
        self.max_classes = max_classes
        self.started = False  # the lifespan has started the scheduler
        self.draining = False  # SIGTERM (or the lifespan's end): refuse new work, finish what runs
        # encode / decode / video writing run in threads; a small limiter keeps a burst of uploads from taking
        # every core away from the generation loop
        self.limiter = anyio.CapacityLimiter(workers)

    def scrub(self, message: str) -> str:
        """A message for the client: the bundle by its name, not by where it lies on the server's disk."""
        where = str(self.engine.bundle.path)
        return message.replace(where, self.engine.bundle.path.name) if where else message

    async def work(self, fn: Callable, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    @contextlib.asynccontextmanager
    async def media_job(self, what: str):
        """A slot for an encode / decode / upload job (they hold frames in memory): at most max_media_jobs at once,
        beyond that a 429 at once rather than an unbounded wait (the event loop is single-threaded: no lock)."""
        if self.media_jobs >= self.max_media_jobs:
            raise HTTPError(429, f"{what}: {self.max_media_jobs} video jobs are in flight, the server's limit "
                            "(--max-media-jobs); retry after 1 s", {"Retry-After": "1"})
        self.media_jobs += 1
        try:
            yield
        finally:
            self.media_jobs -= 1

    def check_video_budget(self, rows: int, fmt: str, scale: int) -> None:
        """Refuse (413) a video response larger than max_video_pixels before any of its work starts."""
        if fmt not in ("mp4", "gif", "npy"):
            return
        C, T, H, W = self.engine.tokenizer_config.video_shape
        cost = rows * T * H * W * scale * scale * (GIF_COST if fmt == "gif" else 1)
        if cost > self.max_video_pixels:
            gif = f" (a GIF counts {GIF_COST}x)" if fmt == "gif" else ""
            raise HTTPError(413, f"the {fmt} would hold {rows} video(s) x {T} frames x {H * scale}x{W * scale} pixels "
                            f"= {cost} pixel units{gif}, over the server's limit of {self.max_video_pixels} "
                            "(--max-video-mpixels): ask for fewer rows per request, a smaller scale, or mp4 / json")

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

    def need_task(self, task: str, route: str) -> None:
        """The bundle's generator must be of the kind the route serves (class-conditional vs frame prediction)."""
        self.need("generator", route)
        fp = self.engine.predicts_frames
        if task == "generate" and fp:
            raise HTTPError(400, f"{route}: this bundle's generator predicts frames from a video (POST /v1/predict); "
                            "it takes no class ids")
        if task == "predict" and not fp:
            raise HTTPError(400, f"{route}: this bundle's generator is class-conditional (POST /v1/generate with "
                            "class_ids); export a frame-prediction generator to predict frames")

    def params(self, given: dict) -> SamplingParams:
        # one seed for the request: class id i (or the one predicted clip) draws from the stream (seed, i)
        given.setdefault("seed", fresh_seed())
        params = dataclasses.replace(self.engine.default_params, **given)
        try:
            return params.validate(self.engine.generator_config.vocab_size)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None

    def video_options(self, fmt: str, stream: bool) -> None:
        if stream and fmt != "json":
            raise HTTPError(400, "stream: true sends the tokens in its last event: use format 'json' with it "
                            "(then POST /v1/decode), or stream: false for an mp4 / gif")
        if fmt != "json":
            self.need("tokenizer", f"format {fmt!r}")

    # -- generate / predict ------------------------------------------------------------------------------
    def generate_job(self, body: S.GenerateRequest) -> _Job:
        self.need_task("generate", "POST /v1/generate")
        ids = body.class_ids
        if len(ids) > self.max_classes:
            raise HTTPError(400, f"at most {self.max_classes} class ids per request (the scheduler's queue, "
                            f"--max-queue), got {len(ids)}: split the request")
        try:
            self.engine.check_class_ids(ids)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        params = self.params(_given(body, ("cfg_scale", "temperature", "top_k", "top_p", "seed")))
        self.video_options(body.format, body.stream)
        self.check_video_budget(len(ids), body.format, body.scale)
        return _Job(params, body.format, body.stream, body.fps, body.scale, class_ids=list(ids))

    def predict_job(self, form: S.PredictForm, path: str, name: str) -> _Job:
        """(a thread) The upload -> its clip fitted to the model, and the request's sampling."""
        C, T, H, W = self.engine.tokenizer_config.video_shape
        n = form.num_cond_frames
        if n > T:
            raise HTTPError(400, f"num_cond_frames must be an int in [1, {T}] (the tokenizer's {T} frames), got {n}")
        if form.cond_seed is not None and not form.stochastic_cond:
            raise HTTPError(400, "cond_seed seeds the stochastic conditioning draw: give it with stochastic_cond=true")
        frames, fps = _read_upload(path, name, T, self.max_upload_pixels)
        if len(frames) < n:
            raise HTTPError(400, f"the upload {name!r} has {len(frames)} frame(s); prediction is conditioned on the "
                            f"first num_cond_frames={n}: send a longer clip or lower num_cond_frames")
        t0, h0, w0 = frames.shape[:3]
        clip, notes = fit_clip(frames, T, H, W)
        # frames past the conditioning ones are never read, so their padding is no news
        notes = [f"{x} (the model takes {T}x{H}x{W})" for x in notes if not x.startswith("padded")]
        params = self.params({"cfg_scale": 1.0, **_given(form, ("temperature", "top_k", "top_p", "seed"))})
        self.video_options(form.format, form.stream)
        self.check_video_budget(1, form.format, form.scale)
        upload = {"notes": notes, "input": {"frames": t0 if t0 <= T else None, "height": h0, "width": w0, "fps": fps},
                  "model_input": {"frames": T, "height": H, "width": W}}
        return _Job(params, form.format, form.stream, form.fps, form.scale, clip=clip[None], num_cond_frames=n,
                    stochastic_cond=form.stochastic_cond, cond_seed=form.cond_seed, upload=upload)

    def _submit_one(self, job: _Job, i: int, on_step):
        if job.clip is None:
            return self.scheduler.submit(job.class_ids[i], job.params, stream=i, timeout=self.request_timeout,
                                         on_step=on_step)
        return self.scheduler.submit_predict(job.clip, job.params, num_cond_frames=job.num_cond_frames,
                                             stochastic_cond=job.stochastic_cond, seed=job.cond_seed,
                                             timeout=self.request_timeout, on_step=on_step)

    def submit(self, job: _Job, on_step: Callable[[int], Callable] | None = None) -> list:
        """One scheduler request per class id (stream i), or the one predict request; on any refusal the ones
        already in are cancelled. A predict request encodes its conditioning here: call it from a thread."""
        reqs = []
        try:
            for i in range(job.n):
                reqs.append(self._submit_one(job, i, None if on_step is None else on_step(i)))
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
        tokens = np.concatenate([g.tokens for g in gens], axis=0).tolist()
        p = job.params
        used = {"cfg_scale": p.cfg_scale, "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
                "seed": p.seed}
        seconds = round(time.monotonic() - t0, 6)
        if job.clip is None:
            return S.GenerateResult(tokens=tokens, seeds=[p.seed] * len(gens), class_ids=job.class_ids, params=used,
                                    seconds=seconds).model_dump()
        cond = reqs[0].seq.prefix[:-1]  # the conditioning clip's tokens (the separator dropped)
        return S.PredictResult(tokens=tokens, cond_tokens=[cond.tolist()], seed=p.seed,
                               num_cond_frames=job.num_cond_frames, params=used, seconds=seconds,
                               **job.upload).model_dump()

    # -- score ------------------------------------------------------------------------------------------
    def score(self, tokens: np.ndarray, method: str, t0: float, uploads: list[dict] | None = None) -> dict:
        try:
            nll = self.engine.prior_nll(tokens, method=method)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        out = S.ScoreResult(nll=[float(x) for x in nll], uniform=math.log(self.engine.tokenizer_config.codebook_size),
                            method=method, seconds=round(time.monotonic() - t0, 6))
        if uploads is not None:
            out.notes, out.tokens = [u["notes"] for u in uploads], tokens.tolist()
        return out.model_dump(exclude_none=True)

    def score_files(self, files: list[tuple[str, str]], method: str, t0: float) -> dict:
        """(a thread) uploaded videos -> fitted, encoded in one batch, scored."""
        T, H, W = self.engine.tokenizer_config.video_shape[1:]
        clips, uploads = [], []
        for path, name in files:
            frames, _ = _read_upload(path, name, T, self.max_upload_pixels)
            clip, notes = fit_clip(frames, T, H, W)
            clips.append(clip)
            uploads.append({"notes": [f"{x} (the model takes {T}x{H}x{W})" for x in notes]})
        tokens = self.engine.encode(np.stack(clips))
        return self.score(tokens, method, t0, uploads)

    # -- video (threads) --------------------------------------------------------------------------------
    def render(self, tokens: np.ndarray, fmt: str, fps: float, scale: int) -> bytes:
        # (B, 3, T, H, W) float32, decoded DECODE_CHUNK rows at a time: the decoder's activations (and the arena
        # ONNX Runtime keeps for them) grow with the batch, the videos themselves are small beside them
        videos = np.concatenate([self.engine.decode(tokens[i : i + DECODE_CHUNK])
                                 for i in range(0, len(tokens), DECODE_CHUNK)])
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
        # T + 1 frames at most: enough to know there were more, without decoding a long upload whole
        frames, fps = _read_upload(path, name, T + 1, self.max_upload_pixels)
        t0, h0, w0 = frames.shape[:3]
        notes = []
        if t0 > T:
            frames = frames[:T]
            notes.append(f"kept the first {T} frames of a longer video")
        clip, fit_notes = fit_clip(frames, T, H, W)
        notes += fit_notes
        tokens = self.engine.encode(clip[None])
        return S.EncodeResult(tokens=tokens.tolist(), notes=[f"{n} (the model takes {T}x{H}x{W})" for n in notes],
                              # frames: null when the upload is longer than T (only its first T frames are read)
                              input={"frames": t0 if t0 <= T else None, "height": h0, "width": w0, "fps": fps},
                              model_input={"frames": T, "height": H, "width": W}).model_dump()

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
            "tasks": self.tasks(),
            "precision": m.get("precision", "fp32"),
            "graphs": {name: {"file": g.get("file"), "inputs": [i.get("name") for i in g.get("inputs", [])],
                              "outputs": [o.get("name") for o in g.get("outputs", [])]}
                       for name, g in (m.get("graphs") or {}).items()},
            "backend": eng.backend_name,
            "sampler": {"running": eng.sampler_name, "bundle": m.get("sampler")},
            "default_sampling": dataclasses.asdict(eng.default_params),
            "created_by": m.get("created_by"),
            "limits": {"max_body_bytes": self.max_body_bytes, "request_timeout": self.request_timeout,
                       "max_classes_per_request": self.max_classes, "max_token_rows": S.MAX_TOKEN_ROWS,
                       "max_uploads_per_score": S.MAX_UPLOADS, "max_video_pixels": self.max_video_pixels,
                       "gif_cost": GIF_COST, "max_upload_pixels": self.max_upload_pixels,
                       "max_media_jobs": self.max_media_jobs, "fps": [S.MIN_FPS, S.MAX_FPS]},
        }
        for k in parts:
            out[k] = m[k]
        sched = self.scheduler
        out["scheduler"] = None if sched is None else {"max_batch": sched.max_batch, "max_queue": sched.max_queue}
        return out


def _read_upload(path: str, name: str, max_frames: int, max_pixels: int) -> tuple[np.ndarray, float | None]:
    """An uploaded file's first ``max_frames`` frames (the reader stops there), each at most ``max_pixels``; a 400
    naming the upload (never the server's temp path)."""
    try:
        return read_video(path, max_frames=max_frames, max_pixels=max_pixels)
    except (VideoError, ValueError, OSError) as e:
        raise HTTPError(400, f"unreadable upload {name!r}: {str(e).replace(repr(path), repr(name))}") from None


@contextlib.contextmanager
def _spooled(uploads: list[UploadFile]):
    """The uploads as named temporary files (the video reader takes paths; the suffix tells it the container)."""
    with contextlib.ExitStack() as stack:
        out = []
        for up in uploads:
            name = up.filename or "upload"
            suffix = Path(name).suffix.lower()
            suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ""
            tmp = stack.enter_context(tempfile.NamedTemporaryFile(prefix="larp_rt-upload-", suffix=suffix))
            shutil.copyfileobj(up.file, tmp)
            tmp.flush()
            out.append((tmp.name, name))
        yield out


def _tokens_array(tokens: list) -> np.ndarray:
    """The validated token lists -> (B, N); rows of unequal length are the one thing the model cannot say."""
    try:
        x = np.asarray(tokens, dtype=np.int64)
    except (ValueError, OverflowError) as e:
        raise HTTPError(400, f"tokens must be a (B, N) list of lists of ints of equal length: {e}") from None
    return x[None] if x.ndim == 1 else x


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
    allowed_hosts=None,
    max_video_pixels: int = DEFAULT_MAX_VIDEO_PIXELS,
    max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS,
    max_media_jobs: int = DEFAULT_MAX_MEDIA_JOBS,
    body_timeout: float = 30.0,
) -> FastAPI:
    """The FastAPI app. ``scheduler`` runs over ``engine`` (its lifespan starts it and drains it at shutdown;
    None for a bundle without a generator, which serves encode / decode only);
    ``metrics``: the ServingMetrics the scheduler was built with as its observer (default: the scheduler's
    observer if it is one, else a new one that sees only the HTTP layer). ``api_key``: required as a Bearer
    token on every route but / and /health. ``request_timeout``: seconds a generation may take from submission
    (None: no limit) -> 504. ``workers``: threads for encode / decode / video writing. ``allowed_hosts``: the Host
    header names answered (a list or a comma-separated string, '*' any, '*.example.com' a domain); None: the loopback
    names without an API key, any with one; other hosts get 400 (DNS rebinding). Budgets: ``max_video_pixels``, one
    video response's rows x frames x height x width x scale^2 (a GIF counts GIF_COST x) -> 413;
    ``max_upload_pixels``, an uploaded frame's width x height -> 400; ``max_media_jobs``, encode / decode / upload
    jobs in flight -> 429. ``body_timeout``: seconds the body may stall between chunks -> 408."""
    if not isinstance(engine, Engine):
        raise ValueError(f"engine must be a larp_rt.Engine, got {type(engine).__name__}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError("api_key must be a non-empty string, or None for no authentication")
    if api_key is not None:
        api_key = api_key.strip()  # a header value carries no surrounding spaces, so a key with them never matched
        if any(c.isspace() for c in api_key):
            raise ValueError("api_key must not contain whitespace (a Bearer token cannot carry it)")
    hosts = _allowed_hosts(allowed_hosts, api_key)
    if not isinstance(max_body_bytes, int) or isinstance(max_body_bytes, bool) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive int, got {max_body_bytes!r}")
    if request_timeout is not None and (not isinstance(request_timeout, (int, float)) or not request_timeout > 0
                                        or isinstance(request_timeout, bool) or not math.isfinite(request_timeout)):
        raise ValueError(f"request_timeout must be a number of seconds > 0, or None for no limit, got "
                         f"{request_timeout!r}")
    for name, v in (("workers", workers), ("max_video_pixels", max_video_pixels),
                    ("max_upload_pixels", max_upload_pixels), ("max_media_jobs", max_media_jobs)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(body_timeout, (int, float)) or isinstance(body_timeout, bool) or not body_timeout > 0:
        raise ValueError(f"body_timeout must be a number of seconds > 0, got {body_timeout!r}")
    if scheduler is None and engine.generator_config is not None:
        raise ValueError("the bundle has a generator: give create_app a Scheduler over the engine")
    if scheduler is not None and (not isinstance(scheduler, Scheduler) or scheduler.engine is not engine):
        raise ValueError("scheduler must be a larp_rt.serving.Scheduler over the same engine")
    max_batch = 1 if scheduler is None else scheduler.max_batch
    if metrics is None:
        obs = None if scheduler is None else scheduler.observer
        metrics = obs if isinstance(obs, ServingMetrics) else ServingMetrics(max_batch)
    # every class id of a request is queued before any of them runs: the queue's size is the most one can hold
    max_classes = 0 if scheduler is None else scheduler.max_queue
    st = _State(engine, scheduler, metrics, api_key=api_key, max_body_bytes=max_body_bytes,
                request_timeout=request_timeout, max_classes=max(1, max_classes), workers=workers,
                max_video_pixels=max_video_pixels, max_upload_pixels=max_upload_pixels, max_media_jobs=max_media_jobs)

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

    # the interactive docs load their scripts from the package, not from a CDN (servers are often offline)
    app = FastAPIOffline(title="larp_rt", version=__version__, lifespan=lifespan, redoc_url=None,
                         static_url=DOCS_STATIC, description=_API_DESCRIPTION, responses=ERRORS)
    app.state.larp = st
    _add_error_handlers(app)
    _add_routes(app, st)
    _finish_schema(app, api_key is not None)
    # the gate sits inside FastAPI's error middleware (an exception in it still becomes a 500) and outside its
    # router, so it sees every request, unknown routes included
    app.add_middleware(_Gate, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics, allowed_hosts=hosts,
                       body_timeout=body_timeout)
    return app


def _allowed_hosts(allowed_hosts, api_key) -> tuple[str, ...]:
    """The Host names the server answers to. Default: any with an API key (a page elsewhere cannot authenticate),
    else the loopback names only, so a rebinding page cannot drive an open server from a browser."""
    if allowed_hosts is None:
        return ("*",) if api_key is not None else LOOPBACK_HOSTS
    if isinstance(allowed_hosts, str):
        allowed_hosts = [h for h in allowed_hosts.split(",")]
    hosts = tuple(_host_name(h) if h.strip() != "*" else "*" for h in allowed_hosts if h.strip())
    if not hosts:
        raise ValueError("allowed_hosts must name at least one host (or '*' for any), e.g. 'localhost,example.com'")
    return hosts


_API_DESCRIPTION = """Video generation with LARP (a video tokenizer with a learned AR prior) and its AR generators.

Errors are JSON `{"error": message, "status": code}`. With an API key (`larp-rt serve --api-key`), every route but
`/` and `/health` needs `Authorization: Bearer KEY`. `GET /v1/models` lists what this bundle serves (`tasks`)."""


def _finish_schema(app: FastAPI, keyed: bool) -> None:
    """The published schema: the models' exact integer bounds (FastAPI's schema objects hold them as floats, and
    2**64 - 1 does not survive a float), and with a key, how to authenticate: a Bearer scheme on every route but the
    open ones (the gate enforces it)."""
    base = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = base()
            for name, comp in schema.get("components", {}).get("schemas", {}).items():
                model = getattr(S, name, None)
                if isinstance(model, type) and issubclass(model, BaseModel):
                    _exact_ints(comp, model.model_json_schema(ref_template=_REF))
            if keyed:
                schema.setdefault("components", {})["securitySchemes"] = {
                    "apiKey": {"type": "http", "scheme": "bearer", "description": "the server's --api-key"}}
                for path, ops in schema.get("paths", {}).items():
                    for op in ops.values():
                        op["security"] = [] if path in PUBLIC else [{"apiKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _exact_ints(published, exact) -> None:
    if isinstance(published, dict) and isinstance(exact, dict):
        for k, v in exact.items():
            if k not in published:
                continue
            if isinstance(v, int) and not isinstance(v, bool) and isinstance(published[k], float):
                published[k] = v
            else:
                _exact_ints(published[k], v)
    elif isinstance(published, list) and isinstance(exact, list) and len(published) == len(exact):
        for a, b in zip(published, exact, strict=True):
            _exact_ints(a, b)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def _on_http_error(request: Request, e: HTTPError):
        return _error(e.status, request.app.state.larp.scrub(e.message), e.headers)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, e: RequestValidationError):
        path = request.url.path
        errors = list(e.errors())
        if path in UPLOAD_ROUTES:
            ctype = request.headers.get("content-type", "")
            if not ctype.lower().startswith("multipart/form-data"):
                return _error(400, f"POST {path} takes multipart/form-data with the video in the field 'file' "
                              f"(curl -F file=@clip.mp4 ...), got Content-Type {ctype or 'none'!r}")
            if any(x.get("type") == "missing" and x.get("loc", ())[-1:] == ("file",) for x in errors):
                return _error(400, "no video in the multipart field 'file': upload it as a file "
                              "(curl -F file=@clip.mp4 ...)")
        model = BODY_MODELS.get(path)
        fields = [] if model is None else list(model.model_fields)
        status, message = S.validation_message(errors, fields, path)
        return _error(status, message)

    @app.exception_handler(StarletteHTTPException)
    async def _on_starlette_error(request: Request, e: StarletteHTTPException):  # 404, 405, bad multipart
        detail = str(e.detail)
        if e.status_code == 400 and detail == "There was an error parsing the body":
            cause = e.__cause__
            if isinstance(cause, HTTPError):  # the gate's 413, raised while FastAPI read the body
                return _error(cause.status, cause.message, cause.headers)
            why = "nested too deeply" if isinstance(cause, RecursionError) else str(cause or "not JSON")
            detail = f"malformed JSON body: {why}"
        return _error(e.status_code, detail, dict(e.headers or {}))

    @app.exception_handler(ClientDisconnect)
    async def _on_disconnect(request: Request, e: ClientDisconnect):  # gone while sending the body: nobody reads
        return Response(status_code=499)


def _add_routes(app: FastAPI, st: _State) -> None:
    engine = st.engine

    @app.get("/", include_in_schema=False)
    async def playground():
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-cache", "Content-Security-Policy": PLAYGROUND_CSP,
                                     "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    @app.get("/health", response_model=S.Health, responses={503: {"model": S.Health}},
             summary="Liveness and readiness (open, without the key)")
    async def health():
        status = ("ok" if st.ready else "draining" if st.draining else "starting" if not st.started
                  else "unavailable")  # started, not draining, yet the scheduler is not ready: its loop has stopped
        body = {"status": status, "ready": st.ready, **({} if st.scheduler is None else st.scheduler.stats())}
        return JSONResponse(body, status_code=200 if st.ready else 503)

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {}}}})
    async def metrics_route():
        data, ctype = st.metrics.render()
        return Response(content=data, media_type=ctype)

    @app.get("/v1/models", response_model=S.ModelsInfo, summary="The bundle, its tasks and the server's limits")
    async def models():
        return st.models()

    video_or_events = {"content": {"video/mp4": BINARY, "image/gif": BINARY,
                                   "text/event-stream": {"schema": {"type": "string"}}},
                       "description": "JSON tokens; with format mp4 / gif the video; with stream: true server-sent "
                                      "events (accepted, progress, then result or error)."}

    @app.post("/v1/generate", response_model=S.GenerateResult, responses={200: video_or_events},
              summary="Class-conditional videos (tokens, mp4 / gif, or streamed progress)")
    async def generate(body: S.GenerateRequest, request: Request):
        st.refuse_if_draining()
        job = st.generate_job(body)
        return await _run_job(st, job, request, lambda hook: st.submit(job, on_step=hook),
                              {"class_ids": job.class_ids, "seed": job.params.seed})

    @app.post("/v1/predict", response_model=S.PredictResult, responses={200: video_or_events},
              summary="Frame prediction: a video's first frames -> the whole clip")
    async def predict(form: Annotated[S.PredictForm, Form(media_type="multipart/form-data")], request: Request):
        st.refuse_if_draining()
        st.need_task("predict", "POST /v1/predict")
        st.need("tokenizer", "POST /v1/predict")

        def prepare():
            with _spooled([form.file]) as files:
                return st.predict_job(form, *files[0])

        async with st.media_job("POST /v1/predict"):
            job = await st.work(prepare)
        # the conditioning clip is encoded on submission: a thread, as every encode is
        return await _run_job(st, job, request, lambda hook: _in_thread(st, st.submit, job, hook),
                              {"num_cond_frames": job.num_cond_frames, "seed": job.params.seed})

    @app.post("/v1/encode", response_model=S.EncodeResult, summary="A video upload -> its tokens")
    async def encode(form: Annotated[S.EncodeForm, Form(media_type="multipart/form-data")]):
        st.refuse_if_draining()
        st.need("tokenizer", "POST /v1/encode")

        def run():
            with _spooled([form.file]) as files:
                return st.encode_file(*files[0])

        async with st.media_job("POST /v1/encode"):
            return await st.work(run)

    @app.post("/v1/decode", response_class=Response, summary="Tokens -> a video (mp4 / gif / npy)",
              responses={200: {"content": {"video/mp4": BINARY, "image/gif": BINARY, "application/x-npy": BINARY}}})
    async def decode(body: S.DecodeRequest, format: Annotated[S.DecodeFormat | None, Query(
            description="The output format, instead of the body's")] = None):
        st.refuse_if_draining()
        st.need("tokenizer", "POST /v1/decode")
        if format is not None and body.format is not None and format != body.format:
            raise HTTPError(400, f"format is {format!r} in the query but {body.format!r} in the body: give one")
        fmt = format or body.format or "mp4"
        try:
            tokens = engine.check_tokens(_tokens_array(body.tokens))
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        st.check_video_budget(len(tokens), fmt, 1 if fmt == "npy" else body.scale)
        async with st.media_job("POST /v1/decode"):
            data = await st.work(st.render, tokens, fmt, body.fps, body.scale)
        return Response(content=data, media_type=MEDIA[fmt],
                        headers={"Content-Disposition": f'inline; filename="decoded.{fmt}"'})

    score_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": S.ScoreTokensRequest.model_json_schema(ref_template=_REF)},
        "multipart/form-data": {"schema": S.ScoreUploadForm.model_json_schema(ref_template=_REF)}}}}

    @app.post("/v1/score", response_model=S.ScoreResult, openapi_extra=score_body, response_model_exclude_none=True,
              summary="The tokenizer prior's NLL of token rows (JSON) or of uploaded videos (multipart)")
    async def score(request: Request):
        st.refuse_if_draining()
        st.need("tokenizer", "POST /v1/score")
        if not engine.has_prior:
            raise HTTPError(400, "POST /v1/score needs the tokenizer's AR prior, and this server's bundle has none: "
                            "export a tokenizer trained with the prior (`larp-rt export --tokenizer DIR`)")
        t0 = time.monotonic()
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith("multipart/form-data"):
            async with request.form(max_files=S.MAX_UPLOADS, max_fields=S.MAX_UPLOADS + 8) as form:
                fields = {k: (form.getlist(k) if k == "file" else form.get(k)) for k in form.keys()}
                up = _validate(S.ScoreUploadForm, fields, "/v1/score")

                def run():
                    with _spooled(up.file) as files:
                        return st.score_files(files, up.method, t0)

                async with st.media_job("POST /v1/score"):
                    return await st.work(run)
        if ctype and not ctype.startswith("application/json"):
            raise HTTPError(415, "POST /v1/score takes JSON tokens (Content-Type: application/json) or videos as "
                            f"multipart/form-data (curl -F file=@clip.mp4 ...), got Content-Type {ctype!r}")
        body = _validate(S.ScoreTokensRequest, await request.body(), "/v1/score")
        try:
            tokens = engine.check_tokens(_tokens_array(body.tokens))
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        return await st.work(st.score, tokens, body.method, t0)


_REF = "#/components/schemas/{model}"


def _validate(model, data, route: str):
    """A body parsed outside FastAPI's signature (one route, two content types): the same errors as the others."""
    try:
        if isinstance(data, (bytes, bytearray)):
            if not data.strip():
                raise HTTPError(400, "the request body is empty: send a JSON object (Content-Type: application/json)")
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as e:
        status, message = S.validation_message(e.errors(), list(model.model_fields), route)
        raise HTTPError(status, message) from None
    except RecursionError:
        raise HTTPError(400, "malformed JSON body: nested too deeply") from None


async def _in_thread(st: _State, fn: Callable, *args):
    return await st.work(fn, *args)


async def _run_job(st: _State, job: _Job, request: Request, submit: Callable, accepted: dict):
    """Submit a generate / predict job (``submit(on_step factory or None) -> requests``, or a coroutine of them)
    and answer it: JSON, a video, or server-sent events."""
    t0 = time.monotonic()
    waker = _Waker(asyncio.get_running_loop(), job.n)
    reqs = submit(waker.on_step if job.stream else None)  # progress hooks only for a stream: they wake the loop
    if asyncio.iscoroutine(reqs):
        reqs = await reqs
    if job.stream:
        return _EventStream(_progress_events(st, job, reqs, waker, t0, request.scope, accepted),
                            on_close=lambda finished: _cancel(reqs))
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


async def _progress_events(st: _State, job: _Job, reqs: list, waker: _Waker, t0: float, scope,
                           accepted: dict) -> AsyncIterator[bytes]:
    """accepted, then progress per scheduler request as its steps advance (coalesced), then result (or error)."""
    for r in reqs:
        r.add_done_callback(waker.poke)
    total = getattr(reqs[0], "total", None) or st.engine.generator_config.max_seq_len
    yield _sse("accepted", {**accepted, "total": total})
    sent = [0] * len(reqs)
    while True:
        waker.event.clear()
        finished = all(r.done() for r in reqs)
        for i, k in enumerate(waker.steps):
            if k != sent[i]:
                sent[i] = k
                extra = {"class_id": job.class_ids[i]} if job.clip is None else {}
                yield _sse("progress", {"index": i, **extra, "step": k, "total": waker.total[i] or total})
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
        yield _sse("error", {"error": st.scrub(e.message), "status": e.status})


# ----------------------------------------------------------------------------------------------------
# uvicorn
# ----------------------------------------------------------------------------------------------------
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds a connection may take to send a request's headers
DEFAULT_MAX_CONNECTIONS = 256  # uvicorn's limit_concurrency: connections + tasks, beyond it 503


class _HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's headers: a connection that opens and never
    finishes them (slowloris) is closed after ``header_timeout`` s, from its opening and after each response
    (uvicorn itself times out only idle keep-alive connections, and any byte resets that)."""

    header_timeout = DEFAULT_HEADER_TIMEOUT

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._armed_for = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        timer, self._header_timer = getattr(self, "_header_timer", None), None
        if timer is not None:
            timer.cancel()

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_timer is not None and self.cycle is not self._armed_for:  # a request's headers arrived
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # before the base class, which may start the next pipelined request at once
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.cycle is self._armed_for and not self.transport.is_closing():
            self.transport.close()


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
    allowed_hosts=None,
    graceful_timeout: float | None = None,
    log_level: str = "info",
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    keep_alive_timeout: int = 5,
    **budgets,
) -> LarpServer:
    """Scheduler + metrics + app + uvicorn server over ``engine``; ``.run()`` serves until SIGTERM / SIGINT.
    graceful_timeout: seconds uvicorn waits for requests in flight at shutdown (None: as long as they take).
    allowed_hosts: as in create_app; None without a key: the loopback names, and ``host`` when it is one address.
    max_connections: uvicorn's limit_concurrency (beyond it 503); header_timeout: seconds to send a request's
    headers; keep_alive_timeout: seconds an idle connection stays open. ``budgets``: create_app's max_video_pixels,
    max_upload_pixels, max_media_jobs."""
    if not isinstance(max_connections, int) or isinstance(max_connections, bool) or max_connections < 1:
        raise ValueError(f"max_connections must be a positive int, got {max_connections!r}")
    if not isinstance(header_timeout, (int, float)) or isinstance(header_timeout, bool) or not header_timeout > 0:
        raise ValueError(f"header_timeout must be a number of seconds > 0, got {header_timeout!r}")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
    metrics = ServingMetrics(max_batch)
    # a tokenizer-only bundle has nothing to generate: no scheduler, encode / decode only
    scheduler = (Scheduler(engine, max_batch=max_batch, max_queue=max_queue, observer=metrics)
                 if engine.generator_config is not None else None)
    if allowed_hosts is None and api_key is None and host not in ("", "0.0.0.0", "::"):
        allowed_hosts = tuple(dict.fromkeys((*LOOPBACK_HOSTS, _host_name(host))))
    app = create_app(engine, scheduler, metrics=metrics, api_key=api_key, max_body_bytes=max_body_bytes,
                     request_timeout=request_timeout, allowed_hosts=allowed_hosts, **budgets)
    protocol = type("HeaderTimeoutH11", (_HeaderTimeoutH11,), {"header_timeout": float(header_timeout)})
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", http=protocol,
                            timeout_graceful_shutdown=graceful_timeout, server_header=False,
                            limit_concurrency=max_connections, timeout_keep_alive=keep_alive_timeout)
    return LarpServer(config, app)


def serve(engine: Engine, **kwargs) -> None:
    """Run the server (blocking) until SIGTERM / SIGINT; the arguments are build_server's."""
    build_server(engine, **kwargs).run()
