"""Serving: the step-level scheduler (one generation loop; requests join and leave the batch at step
boundaries), the FastAPI app behind ``larp-rt serve`` and its Prometheus metrics.

``from larp_rt.serving import Scheduler`` needs nothing beyond the core; ``create_app`` / ``serve`` need the
``[serve]`` extra (fastapi, uvicorn, prometheus-client, python-multipart) and are imported on first use.
"""

from .scheduler import Observer, QueueFull, Request, RequestCancelled, Scheduler, SchedulerClosed

__all__ = ["Scheduler", "Request", "Observer", "QueueFull", "SchedulerClosed", "RequestCancelled",
           "create_app", "build_server", "serve", "ServingMetrics"]


def __getattr__(name: str):
    # lazily: the scheduler must stay importable where the [serve] extra is not installed
    if name in ("create_app", "build_server", "serve"):
        from . import app

        return getattr(app, name)
    if name == "ServingMetrics":
        from .metrics import ServingMetrics

        return ServingMetrics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
