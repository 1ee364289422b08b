"""Triton Inference Server model repositories for larp_rt bundles (``larp-rt triton BUNDLE_DIR REPO_DIR``).

    from larp_rt.triton import write_repository, LocalServer
    write_repository("bundles/larp-tiny", "triton_repo", instances=1, kind="cpu", max_batch=8)
    with LocalServer("triton_repo") as srv:          # tritonserver from the nvidia-pytriton wheel, loopback ports
        srv.http_url, srv.grpc_url, srv.metrics_url

Models written (every config.pbtxt complete: dtypes, dims, dynamic batching, instance groups, version policy):

* ``larp_generate``: python backend over ``larp_rt.serving.Scheduler`` (one continuous batch per model instance).
  In: CLASS_ID int64 [1]; optional SEED int64 [1] (-1 or absent: a fresh seed), CFG_SCALE fp32, TEMPERATURE fp32,
  TOP_K int32, TOP_P fp32 ([1] each; absent: the bundle's defaults). Out: TOKENS int64 [N], SEED int64 [1].
  Row r of a request draws exactly what ``Engine.generate([c], [SamplingParams(seed=s, ...)])`` draws.
* ``larp_generate_stream``: the same, decoupled: a gRPC stream of partial responses (STEP int32 [1], TOTAL int32
  [1], TOKEN int64 [1]) every ``stream_every`` steps, then the final TOKENS + SEED. Each request joins the running
  batch at the next step boundary, whatever else runs.
* ``larp_encode``: VIDEO uint8 [T, H, W, 3] -> TOKENS int64 [N]; ``larp_decode``: TOKENS int64 [N] ->
  FRAMES uint8 [T, H, W, 3]. Python backend over ``Engine``; ``native=True`` writes ``onnxruntime`` platform
  configs over the bundle's encoder.onnx / decoder.onnx instead (their I/O: video fp32 [3, T, H, W] -> indices,
  latents; indices -> video fp32).
* ``larp_video``: BLS: generate then decode in one request: CLASS_ID (+ the sampling inputs) -> FRAMES uint8
  [T, H, W, 3], TOKENS, SEED.

Isolation (details in ``models``): a larp_generate request's rows are admitted all or none (a refused row
withdraws the others; one error for the request); a stream's responses go out from sender threads, never from the
scheduler's loop, and a departed gRPC client has its request cancelled; a bad encode / decode / video request
fails alone, with its own error code. The generate models' schedulers appear in /metrics as
``larp_scheduler_*`` and ``larp_stream_open``.

The python models find larp_rt through the ``larp_rt_path`` parameter of their config (the folder that holds the
``larp_rt`` package, put first on sys.path) and run in the Python environment whose ``python3`` is first on the
server's PATH (the stub embeds that interpreter's version; see README.md in the written repository).
"""

from __future__ import annotations

from .repository import MODELS, write_repository
from .server import LocalServer, find_tritonserver, server_env

__all__ = ["MODELS", "LocalServer", "find_tritonserver", "server_env", "write_repository"]
