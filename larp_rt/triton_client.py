"""A client for the repository ``larp-rt triton`` writes, on tritonclient (HTTP or gRPC): no raw v2 JSON.

    from larp_rt.triton_client import TritonClient
    c = TritonClient("127.0.0.1:8000")                       # or TritonClient("127.0.0.1:8001", protocol="grpc")
    out = c.generate([0, 3], seed=[1, 2], cfg_scale=1.25)    # out.tokens (2, N) int64, out.seeds [1, 2]
    frames, out = c.video([0, 3], seed=[1, 2])              # (2, T, H, W, 3) uint8
    tokens = c.encode(frames)                               # uint8 (B, T, H, W, 3) -> (B, N) int64
    frames = c.decode(tokens)                               # -> (B, T, H, W, 3) uint8
    for ev in c.generate_stream(3, seed=0): ...             # gRPC only: ev.step, ev.total, ev.token; last: ev.tokens

Row i of ``generate(ids, seed=[s0, s1, ...])`` draws what ``Engine.generate(ids, [SamplingParams(seed=s_i)...])``
draws. A scalar seed s gives every row the seed s (stream 0); None draws fresh seeds (returned in ``.seeds``).
Errors from the server are raised as ``tritonclient.utils.InferenceServerException`` with its message.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["TritonClient", "TritonGeneration", "StreamEvent"]


@dataclass(frozen=True)
class TritonGeneration:
    tokens: np.ndarray  # (B, N) int64
    seeds: list[int]


@dataclass(frozen=True)
class StreamEvent:
    step: int
    total: int
    token: int
    tokens: np.ndarray | None = None  # the whole sequence, on the last event
    seed: int | None = None


def _column(v, B: int, dtype, missing) -> np.ndarray | None:
    if v is None:
        return None
    a = np.asarray(v)
    if a.ndim == 0:
        a = np.full(B, a)
    if a.shape != (B,):
        raise ValueError(f"give one value or one per class id ({B}), got shape {a.shape}")
    return np.where(np.equal(a, None), missing, a).astype(dtype).reshape(B, 1) if a.dtype == object else \
        a.astype(dtype).reshape(B, 1)


class TritonClient:
    def __init__(self, url: str = "127.0.0.1:8000", *, protocol: str = "http", timeout: float | None = None,
                 **client_kwargs):
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        self.protocol = protocol
        if protocol == "http":
            import tritonclient.http as mod

            client_kwargs.setdefault("network_timeout", timeout or 600.0)
            client_kwargs.setdefault("connection_timeout", timeout or 600.0)
        else:
            import tritonclient.grpc as mod
        self._mod = mod
        self.client = mod.InferenceServerClient(url=url, **client_kwargs)
        self.timeout = timeout

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # plumbing ---------------------------------------------------------------------------------
    def _input(self, name: str, arr: np.ndarray):
        from tritonclient.utils import np_to_triton_dtype

        t = self._mod.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(np.ascontiguousarray(arr))
        return t

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Any model: named numpy inputs -> named numpy outputs."""
        req = [self._input(k, v) for k, v in inputs.items()]
        outs = [self._mod.InferRequestedOutput(n) for n in outputs]
        kw = {} if self.protocol == "http" or self.timeout is None else {"client_timeout": self.timeout}
        res = self.client.infer(model, req, outputs=outs, **kw)
        return {n: res.as_numpy(n) for n in outputs}

    def _sampling(self, class_ids, seed, cfg_scale, temperature, top_k, top_p) -> dict[str, np.ndarray]:
        ids = np.asarray(class_ids)
        ids = ids.reshape(-1) if ids.ndim <= 1 else ids
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"class_ids must be an int or a non-empty 1-D sequence of ints, got shape {ids.shape}")
        B = len(ids)
        cols = {"CLASS_ID": ids.astype(np.int64).reshape(B, 1) if np.issubdtype(ids.dtype, np.integer) else
                ids.reshape(B, 1)}
        for name, v, dtype, missing in (("SEED", seed, np.int64, -1), ("CFG_SCALE", cfg_scale, np.float32, np.nan),
                                        ("TEMPERATURE", temperature, np.float32, np.nan),
                                        ("TOP_K", top_k, np.int32, -1), ("TOP_P", top_p, np.float32, np.nan)):
            c = _column(v, B, dtype, missing)
            if c is not None:
                cols[name] = c
        return cols

    # the models -------------------------------------------------------------------------------
    def generate(self, class_ids, *, seed=None, cfg_scale=None, temperature=None, top_k=None, top_p=None,
                 model: str = "larp_generate") -> TritonGeneration:
        out = self.infer(model, self._sampling(class_ids, seed, cfg_scale, temperature, top_k, top_p),
                         ["TOKENS", "SEED"])
        return TritonGeneration(out["TOKENS"], [int(s) for s in out["SEED"].reshape(-1)])

    def video(self, class_ids, *, seed=None, cfg_scale=None, temperature=None, top_k=None, top_p=None,
              model: str = "larp_video") -> tuple[np.ndarray, TritonGeneration]:
        out = self.infer(model, self._sampling(class_ids, seed, cfg_scale, temperature, top_k, top_p),
                         ["FRAMES", "TOKENS", "SEED"])
        return out["FRAMES"], TritonGeneration(out["TOKENS"], [int(s) for s in out["SEED"].reshape(-1)])

    def encode(self, frames: np.ndarray, *, model: str = "larp_encode") -> np.ndarray:
        """uint8 frames (B, T, H, W, 3) -> tokens (B, N) int64."""
        return self.infer(model, {"VIDEO": np.asarray(frames)}, ["TOKENS"])["TOKENS"]

    def decode(self, tokens: np.ndarray, *, model: str = "larp_decode") -> np.ndarray:
        """tokens (B, N) int64 -> uint8 frames (B, T, H, W, 3)."""
        return self.infer(model, {"TOKENS": np.asarray(tokens)}, ["FRAMES"])["FRAMES"]

    def generate_stream(self, class_id: int, *, seed=None, cfg_scale=None, temperature=None, top_k=None, top_p=None,
                        model: str = "larp_generate_stream", timeout: float = 600.0,
                        request_id: str = "") -> Iterator[StreamEvent]:
        """gRPC only (Triton streams decoupled models over gRPC): progress events, the last with the tokens.

        Closing the generator before its last event (``break``, an error) cancels the request: the server stops
        its generation and frees its rows."""
        if self.protocol != "grpc":
            raise ValueError("generate_stream needs protocol='grpc' (decoupled models stream over gRPC only)")
        cols = self._sampling([class_id], seed, cfg_scale, temperature, top_k, top_p)
        inputs = [self._input(k, v.reshape(-1)) for k, v in cols.items()]  # the stream model is unbatched
        q: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: q.put((result, error)))
        finished = False
        try:
            self.client.async_stream_infer(model, inputs, request_id=request_id)
            while True:
                result, error = q.get(timeout=timeout)
                if error is not None:
                    finished = True  # an error response is the last one
                    raise error
                tokens = result.as_numpy("TOKENS")
                step, total = int(result.as_numpy("STEP")[0]), int(result.as_numpy("TOTAL")[0])
                token = int(result.as_numpy("TOKEN")[0])
                if tokens is not None:
                    finished = True
                    yield StreamEvent(step, total, token, tokens.reshape(1, -1), int(result.as_numpy("SEED")[0]))
                    return
                yield StreamEvent(step, total, token)
        finally:
            self.client.stop_stream(cancel_requests=not finished)

    def ready(self, model: str | None = None) -> bool:
        return self.client.is_model_ready(model) if model else self.client.is_server_ready()
