"""What ``/openapi.json`` publishes beyond the routes' own models: the API's description, the error responses
every route may give, the binary / event-stream bodies, and the finishing pass (exact integer bounds, and with an
API key the Bearer scheme on every route but the open ones)."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from . import schemas as S
from .limits import PUBLIC

__all__ = ["API_DESCRIPTION", "DOCS_STATIC", "ERRORS", "BINARY", "VIDEO_OR_EVENTS", "REF", "finish_schema"]

DOCS_STATIC = "/docs-static"  # the interactive docs' own scripts, served from the package (no CDN)
ERRORS = {code: {"model": S.ErrorBody, "description": what} for code, what in (
    (400, "bad input: the field's rule or the Engine's message"), (401, "missing or wrong API key"),
    (413, "body over the server's limit"), (415, "JSON sent without Content-Type: application/json"),
    (429, "queue full (Retry-After)"), (503, "shutting down, or the bundle cannot serve this"),
    (504, "the request's deadline passed"))}
BINARY = {"schema": {"type": "string", "format": "binary"}}
# generate / predict: JSON, a video, or server-sent events
VIDEO_OR_EVENTS = {"content": {"video/mp4": BINARY, "image/gif": BINARY,
                               "text/event-stream": {"schema": {"type": "string"}}},
                   "description": "JSON tokens; with format mp4 / gif the video; with stream: true server-sent "
                                  "events (accepted, progress, then result or error)."}
REF = "#/components/schemas/{model}"  # a model's place in the schema (for request bodies written by hand)

API_DESCRIPTION = """Video generation with LARP (a video tokenizer with a learned AR prior) and its AR generators.

Errors are JSON `{"error": message, "status": code}`. With an API key (`larp-rt serve --api-key`), every route but
`/` and `/health` needs `Authorization: Bearer KEY`. `GET /v1/models` lists what this bundle serves (`tasks`)."""


def finish_schema(app: FastAPI, keyed: bool) -> None:
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
                    _exact_ints(comp, model.model_json_schema(ref_template=REF))
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
