"""The HTTP layer's one error: routes, the gate and the state raise ``HTTPError``; it reaches the client as
``{"error": message, "status": code}`` (``error_response``), with the bundle's path scrubbed from the message.

Work the engine's backend cannot do (``larp_rt.errors.BackendCapabilityError``, e.g. the stochastic encoder on a
backend without it) is the server's limit, not a fault: ``UNSUPPORTED`` (501), wherever the routes meet it."""

from __future__ import annotations

from fastapi.responses import JSONResponse

__all__ = ["HTTPError", "error_response", "UNSUPPORTED", "unsupported"]

UNSUPPORTED = 501  # Not Implemented: this server's backend lacks the computation


class HTTPError(Exception):
    """An error response: status, the message the client reads, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def unsupported(e: NotImplementedError) -> HTTPError:
    """The HTTPError of a computation this server's backend lacks (its message names a backend that has it)."""
    return HTTPError(UNSUPPORTED, f"this server cannot do that: {e}")
