"""``larp-rt serve``: the HTTP server over one continuously batched loop (``larp_rt.serving``)."""

from __future__ import annotations

import argparse
import sys

from .common import engine_args, open_engine

__all__ = ["VERBS"]


def _cmd_serve(args: argparse.Namespace) -> int:
    import ipaddress
    import os

    try:
        from ..serving.app import build_server
    except ModuleNotFoundError as e:
        raise ValueError(f"larp-rt serve needs the [serve] extra ({e.name} is missing): "
                         "pip install 'larp_rt[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    for flag, v in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise ValueError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    for flag, v in (("--max-body-mb", args.max_body_mb), ("--max-video-mpixels", args.max_video_mpixels),
                    ("--max-upload-mpixels", args.max_upload_mpixels), ("--header-timeout", args.header_timeout),
                    ("--body-timeout", args.body_timeout)):
        if not v > 0:
            raise ValueError(f"{flag} must be > 0, got {v}")
    for flag, v in (("--max-media-jobs", args.max_media_jobs), ("--max-connections", args.max_connections)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("LARP_RT_API_KEY") or None
    if api_key is not None and not api_key.strip():
        raise ValueError("--api-key must not be empty (leave it out for no authentication)")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and api_key is None:
        print(f"note: listening on {args.host} without an API key: anyone who reaches port {args.port} can use "
              "the server (set --api-key or LARP_RT_API_KEY)", file=sys.stderr)
    eng = open_engine(args, preallocate=0)  # the scheduler owns (and pre-faults) the caches it serves from
    server = build_server(eng, host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
                          request_timeout=args.request_timeout, max_body_bytes=int(args.max_body_mb * 2**20),
                          api_key=api_key, allowed_hosts=args.allowed_hosts, log_level=args.log_level,
                          max_connections=args.max_connections, header_timeout=args.header_timeout,
                          max_video_pixels=max(1, int(args.max_video_mpixels * 1e6)),
                          max_upload_pixels=max(1, int(args.max_upload_mpixels * 1e6)),
                          max_media_jobs=args.max_media_jobs, body_timeout=args.body_timeout)
    print(f"serving {args.bundle} ({eng.backend_name}, sampler {eng.sampler_name}) on http://{args.host}:{args.port}"
          f" (max batch {args.max_batch}, queue {args.max_queue}{', API key required' if api_key else ''})",
          flush=True)
    server.run()  # until SIGTERM / SIGINT: stops accepting, finishes the requests in flight, drains the scheduler
    return 0


def add_serve(sub) -> None:
    s = sub.add_parser("serve", help="HTTP server (generate / predict / encode / decode / score; OpenAPI at /docs, "
                                     "a playground at /) over one continuously batched loop")
    engine_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=8,
                   help="rows generated together per step (a request with CFG takes two)")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait for rows; beyond it 429")
    s.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a generation may take from submission, then 504 (default: no limit)")
    s.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body (413 beyond it)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but / and /health "
                        "(default: $LARP_RT_API_KEY)")
    s.add_argument("--max-video-mpixels", type=float, default=16.777216, metavar="M",
                   help="one video response's budget, rows x frames x height x width x scale^2 in millions of pixels "
                        "(a GIF counts 4x; default 16.8): beyond it 413")
    s.add_argument("--max-upload-mpixels", type=float, default=8.388608, metavar="M",
                   help="largest uploaded frame, width x height in millions of pixels (default 8.4, 4K fits): beyond "
                        "it 400, before decoding")
    s.add_argument("--max-media-jobs", type=int, default=8,
                   help="encode / decode / upload jobs in flight at once (default 8): beyond it 429")
    s.add_argument("--max-connections", type=int, default=256,
                   help="connections + tasks uvicorn serves at once (limit_concurrency; default 256): beyond it 503")
    s.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a connection may take to send a request's headers (default 10): then it is closed")
    s.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                   help="seconds a request body may stall between chunks (default 30): then 408")
    s.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="comma-separated Host names the server answers to ('*' any, '*.example.com' a domain; "
                        "default: any with an API key, else loopback and --host): other hosts get 400")
    s.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")
    s.set_defaults(fn=_cmd_serve)


# verb -> its sub-parser (the package assembles them in `larp-rt --help` order)
VERBS = {"serve": add_serve}
