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
request's deadline 504, work this server's backend cannot do 501 (a ``BackendCapabilityError``, e.g.
stochastic_cond on a backend without the stochastic encoder). A client that goes away (also mid-stream)
cancels its scheduler requests, which frees their rows at the next step. The lifespan starts the scheduler and,
at shutdown, drains it: uvicorn stops accepting and lets the requests in flight finish first.

Where things live: ``app`` assembles (create_app, the error handlers, the uvicorn server); ``routes/`` holds one
module per route family; ``state`` the per-app state and the work it does; ``schemas`` the request / response
models and their parsing; ``streaming`` waiting on scheduler requests and server-sent events; ``media`` video I/O
in threads; ``limits`` the gate (hosts, key, body size and deadline), the budgets and the header deadline;
``openapi`` what the published schema adds; ``errors`` the one error type.
"""

from __future__ import annotations

import contextlib
import math

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..engine import Engine
from ..errors import BackendCapabilityError
from . import routes
from . import schemas as S
from .errors import HTTPError, error_response, unsupported
from .limits import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_MEDIA_JOBS,
    DEFAULT_MAX_UPLOAD_PIXELS,
    DEFAULT_MAX_VIDEO_PIXELS,
    LOOPBACK_HOSTS,
    Gate,
    HeaderTimeoutH11,
    host_name,
    resolve_allowed_hosts,
)
from .limits import GIF_COST as GIF_COST  # re-exported: the names this module has always offered
from .limits import PUBLIC as PUBLIC
from .limits import ROUTES as ROUTES
from .media import DECODE_CHUNK as DECODE_CHUNK
from .media import MEDIA as MEDIA
from .metrics import ServingMetrics
from .openapi import API_DESCRIPTION, DOCS_STATIC, ERRORS, finish_schema
from .openapi import BINARY as BINARY
from .routes.info import PLAYGROUND as PLAYGROUND
from .routes.info import PLAYGROUND_CSP as PLAYGROUND_CSP
from .scheduler import Scheduler
from .state import State
from .streaming import HEARTBEAT_S as HEARTBEAT_S

__all__ = ["create_app", "build_server", "serve", "LarpServer", "DEFAULT_MAX_BODY_BYTES"]

UPLOAD_ROUTES = ("/v1/encode", "/v1/predict")  # multipart only; /v1/score takes either
# each route's body model: its field list goes into the unknown-field message
BODY_MODELS = {"/v1/generate": S.GenerateRequest, "/v1/decode": S.DecodeRequest, "/v1/encode": S.EncodeForm,
               "/v1/predict": S.PredictForm}


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
    api_key, hosts = _check_options(engine, scheduler, api_key=api_key, allowed_hosts=allowed_hosts,
                                    max_body_bytes=max_body_bytes, request_timeout=request_timeout, workers=workers,
                                    max_video_pixels=max_video_pixels, max_upload_pixels=max_upload_pixels,
                                    max_media_jobs=max_media_jobs, body_timeout=body_timeout)
    max_batch = 1 if scheduler is None else scheduler.max_batch
    if metrics is None:
        obs = None if scheduler is None else scheduler.observer
        metrics = obs if isinstance(obs, ServingMetrics) else ServingMetrics(max_batch)
    # every class id of a request is queued before any of them runs: the queue's size is the most one can hold
    max_classes = 0 if scheduler is None else scheduler.max_queue
    st = State(engine, scheduler, metrics, api_key=api_key, max_body_bytes=max_body_bytes,
               request_timeout=request_timeout, max_classes=max(1, max_classes), workers=workers,
               max_video_pixels=max_video_pixels, max_upload_pixels=max_upload_pixels, max_media_jobs=max_media_jobs)
    # the interactive docs load their scripts from the package, not from a CDN (servers are often offline)
    app = FastAPIOffline(title="larp_rt", version=__version__, lifespan=_lifespan(st), redoc_url=None,
                         static_url=DOCS_STATIC, description=API_DESCRIPTION, responses=ERRORS)
    app.state.larp = st
    _add_error_handlers(app)
    routes.register(app, st)
    finish_schema(app, api_key is not None)
    # the gate sits inside FastAPI's error middleware (an exception in it still becomes a 500) and outside its
    # router, so it sees every request, unknown routes included
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics, allowed_hosts=hosts,
                       body_timeout=body_timeout)
    return app


def _check_options(engine, scheduler, *, api_key, allowed_hosts, max_body_bytes, request_timeout, workers,
                   max_video_pixels, max_upload_pixels, max_media_jobs, body_timeout) -> tuple[str | None, tuple]:
    """create_app's arguments checked (a ValueError naming the bad one) -> (the API key, stripped; the hosts)."""
    if not isinstance(engine, Engine):
        raise ValueError(f"engine must be a larp_rt.Engine, got {type(engine).__name__}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError("api_key must be a non-empty string, or None for no authentication")
    if api_key is not None:
        api_key = api_key.strip()  # a header value carries no surrounding spaces, so a key with them never matched
        if any(c.isspace() for c in api_key):
            raise ValueError("api_key must not contain whitespace (a Bearer token cannot carry it)")
    hosts = resolve_allowed_hosts(allowed_hosts, api_key)
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
    return api_key, hosts


def _lifespan(st: State):
    """Starts the scheduler with the app; at shutdown, drains it (once uvicorn has stopped accepting)."""
    scheduler = st.scheduler

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

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def _on_http_error(request: Request, e: HTTPError):
        return error_response(e.status, request.app.state.larp.scrub(e.message), e.headers)

    @app.exception_handler(BackendCapabilityError)
    async def _on_unsupported(request: Request, e: BackendCapabilityError):  # engine work in a route or a thread
        u = unsupported(e)
        return error_response(u.status, request.app.state.larp.scrub(u.message))

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, e: RequestValidationError):
        path = request.url.path
        errors = list(e.errors())
        if path in UPLOAD_ROUTES:
            ctype = request.headers.get("content-type", "")
            if not ctype.lower().startswith("multipart/form-data"):
                return error_response(400, f"POST {path} takes multipart/form-data with the video in the field "
                                      f"'file' (curl -F file=@clip.mp4 ...), got Content-Type {ctype or 'none'!r}")
            if any(x.get("type") == "missing" and x.get("loc", ())[-1:] == ("file",) for x in errors):
                return error_response(400, "no video in the multipart field 'file': upload it as a file "
                                      "(curl -F file=@clip.mp4 ...)")
        model = BODY_MODELS.get(path)
        fields = [] if model is None else list(model.model_fields)
        status, message = S.validation_message(errors, fields, path)
        return error_response(status, message)

    @app.exception_handler(StarletteHTTPException)
    async def _on_starlette_error(request: Request, e: StarletteHTTPException):  # 404, 405, bad multipart
        detail = str(e.detail)
        if e.status_code == 400 and detail == "There was an error parsing the body":
            cause = e.__cause__
            if isinstance(cause, HTTPError):  # the gate's 413, raised while FastAPI read the body
                return error_response(cause.status, cause.message, cause.headers)
            why = "nested too deeply" if isinstance(cause, RecursionError) else str(cause or "not JSON")
            detail = f"malformed JSON body: {why}"
        return error_response(e.status_code, detail, dict(e.headers or {}))

    @app.exception_handler(ClientDisconnect)
    async def _on_disconnect(request: Request, e: ClientDisconnect):  # gone while sending the body: nobody reads
        return Response(status_code=499)


class LarpServer(uvicorn.Server):
    """uvicorn's server; SIGTERM / SIGINT first mark the app draining (/health 503, new work 503), then uvicorn's
    graceful shutdown stops accepting, waits for the requests in flight, and the lifespan drains the scheduler."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    @property
    def state(self) -> State:
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
        allowed_hosts = tuple(dict.fromkeys((*LOOPBACK_HOSTS, host_name(host))))
    app = create_app(engine, scheduler, metrics=metrics, api_key=api_key, max_body_bytes=max_body_bytes,
                     request_timeout=request_timeout, allowed_hosts=allowed_hosts, **budgets)
    protocol = type("HeaderTimeoutH11", (HeaderTimeoutH11,), {"header_timeout": float(header_timeout)})
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", http=protocol,
                            timeout_graceful_shutdown=graceful_timeout, server_header=False,
                            limit_concurrency=max_connections, timeout_keep_alive=keep_alive_timeout)
    return LarpServer(config, app)


def serve(engine: Engine, **kwargs) -> None:
    """Run the server (blocking) until SIGTERM / SIGINT; the arguments are build_server's."""
    build_server(engine, **kwargs).run()
