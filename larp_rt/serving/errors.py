"""The HTTP layer's one error: routes, the gate and the state raise ``HTTPError``; it reaches the client as
``{"error": message, "status": code}`` (``error_response``), with the bundle's path scrubbed from the message."""

from __future__ import annotations

from fastapi.responses import JSONResponse

__all__ = ["HTTPError", "error_response"]


class HTTPError(Exception):
    """An error response: status, the message the client reads, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)
