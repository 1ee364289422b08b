"""The HTTP routes, one module per family, each a ``register(app, st)`` that adds its routes to the app over the
server's ``State``: ``info`` (the playground, /health, /metrics, /v1/models), ``generate``, ``predict``, ``codec``
(/v1/encode, /v1/decode) and ``score``. ``register`` adds them all, in the order the schema lists them."""

from __future__ import annotations

from fastapi import FastAPI

from ..state import State
from . import codec, generate, info, predict, score

__all__ = ["register"]


def register(app: FastAPI, st: State) -> None:
    for family in (info, generate, predict, codec, score):
        family.register(app, st)
