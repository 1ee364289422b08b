"""What the server lets in before any route runs, and its resource budgets.

The gate (``Gate``, pure ASGI, so it sees every request, 404s included): the Host allow-list (DNS rebinding), the
API key, the body's size (Content-Length, else the bytes read) and its deadline between chunks, and the per-route
outcome counts. ``HeaderTimeoutH11``: uvicorn's h11 protocol with a deadline on each request's headers
(slowloris). The ``DEFAULT_*`` budgets are create_app's / build_server's defaults (``larp-rt serve`` flags).
"""

from __future__ import annotations

import hmac

import anyio
from fastapi.responses import Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import HTTPError, error_response
from .metrics import ServingMetrics

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_VIDEO_PIXELS", "GIF_COST", "DEFAULT_MAX_UPLOAD_PIXELS",
           "DEFAULT_MAX_MEDIA_JOBS", "DEFAULT_HEADER_TIMEOUT", "DEFAULT_MAX_CONNECTIONS", "ROUTES", "PUBLIC",
           "LOOPBACK_HOSTS", "host_name", "resolve_allowed_hosts", "Gate", "HeaderTimeoutH11"]

DEFAULT_MAX_BODY_BYTES = 64 << 20
# resource budgets (create_app's arguments; `larp-rt serve` flags), each refused with a message naming it
DEFAULT_MAX_VIDEO_PIXELS = 1 << 24  # one response's video: rows x frames x height x width x scale^2 (16.8 M)
GIF_COST = 4  # a GIF's palette quantisation costs about 4x an mp4's encoding per pixel: it counts 4x
DEFAULT_MAX_UPLOAD_PIXELS = 1 << 23  # one uploaded frame's width x height (8.4 M: 4K UHD fits)
DEFAULT_MAX_MEDIA_JOBS = 8  # encode / decode / upload jobs admitted at once (running or waiting); more: 429
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds a connection may take to send a request's headers
DEFAULT_MAX_CONNECTIONS = 256  # uvicorn's limit_concurrency: connections + tasks, beyond it 503
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/generate", "/v1/encode", "/v1/decode", "/v1/predict",
          "/v1/score", "/openapi.json", "/docs")
# /health: what a load balancer probes; /: the playground page (static, no data: it asks for the key itself)
PUBLIC = ("/health", "/")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(value: str) -> str:
    """A Host header -> its name, lowercased, without the port ('[::1]:8000' -> '::1')."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


class Gate:
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
        name = host_name(host)
        return any(name == h or (h.startswith("*.") and name.endswith(h[1:])) for h in self.allowed_hosts)

    def _refuse(self, scope, path: str) -> Response | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if not self._host_allowed(host):
            # a page on another site that resolves its name to this machine (DNS rebinding) gets nothing here
            return error_response(400, f"Host {host!r} is not one this server answers to "
                                  f"({', '.join(self.allowed_hosts)}): start it with --allowed-hosts NAME (or '*' "
                                  "behind a proxy that checks the host)")
        if self.api_key is not None and path not in PUBLIC:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                why = "missing" if not auth else "wrong"
                return error_response(401, f"{why} API key: send the header 'Authorization: Bearer KEY' with the "
                                      "server's --api-key (or LARP_RT_API_KEY)", {"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return error_response(400, f"Content-Length must be a byte count, got {length!r}",
                                      {"Connection": "close"})
            if int(length) > self.max_body:
                return error_response(413, self._too_large(f"{int(length)} bytes"), {"Connection": "close"})
        return None

    def _too_large(self, got: str) -> str:
        return (f"request body too large: {got}, the limit is {self.max_body} bytes "
                f"({self.max_body / 2**20:.4g} MiB, the server's --max-body-mb)")


def resolve_allowed_hosts(allowed_hosts, api_key) -> tuple[str, ...]:
    """The Host names the server answers to. Default: any with an API key (a page elsewhere cannot authenticate),
    else the loopback names only, so a rebinding page cannot drive an open server from a browser."""
    if allowed_hosts is None:
        return ("*",) if api_key is not None else LOOPBACK_HOSTS
    if isinstance(allowed_hosts, str):
        allowed_hosts = [h for h in allowed_hosts.split(",")]
    hosts = tuple(host_name(h) if h.strip() != "*" else "*" for h in allowed_hosts if h.strip())
    if not hosts:
        raise ValueError("allowed_hosts must name at least one host (or '*' for any), e.g. 'localhost,example.com'")
    return hosts



class HeaderTimeoutH11(H11Protocol):
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
