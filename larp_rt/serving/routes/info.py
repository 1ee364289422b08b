"""``GET /`` (the playground page), ``GET /health``, ``GET /metrics`` and ``GET /v1/models``."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response

from .. import schemas as S
from ..state import State

__all__ = ["register", "PLAYGROUND", "PLAYGROUND_CSP"]

PLAYGROUND = Path(__file__).parent.parent / "static" / "playground.html"
# the page loads nothing from elsewhere, posts no forms, and is framed by nobody (clickjacking); blob: is the
# clips it decodes, which it plays and offers for download
PLAYGROUND_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                  "connect-src 'self' blob:; img-src 'self' blob:; media-src 'self' blob:; form-action 'none'; "
                  "base-uri 'none'; frame-ancestors 'none'")


def register(app: FastAPI, st: State) -> None:
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
