"""The python-backend models behind the repository that ``larp-rt triton`` writes (imported inside the stub).

Tensors cross the stub by DLPack (``np.from_dlpack`` in, ``Tensor.from_dlpack`` out): the stub's own numpy glue
(``as_numpy()`` / ``Tensor(name, array)``) misreads numpy 2 arrays (wrong strides in, "output tensor shape does
not match size of output" out). The stub renames a consumed capsule "used_dlpack" where numpy expects
"used_dltensor"; ``_out`` renames it so numpy's capsule destructor does not raise (the stub releases the tensor).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from ..sampling import SamplingParams
from .frames import to_frames

_set_name = ctypes.pythonapi.PyCapsule_SetName
_set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_set_name.restype = ctypes.c_int
_USED = ctypes.create_string_buffer(b"used_dltensor")  # lives as long as the module: capsule names are not copied


def _out(name: str, arr: np.ndarray):
    arr = np.ascontiguousarray(arr)
    cap = arr.__dlpack__()
    t = pb_utils.Tensor.from_dlpack(name, cap)
    _set_name(cap, _USED)
    return t


def _in(request, name: str) -> np.ndarray | None:
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else np.array(np.from_dlpack(t))  # a copy: the stub's buffer is the request's


def _params(args) -> dict[str, str]:
    cfg = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}


def _error(msg: str, internal: bool = False):
    """An error response: INVALID_ARG (HTTP 400) for bad input, INTERNAL (500) for a failure of ours."""
    code = pb_utils.TritonError.INTERNAL if internal else pb_utils.TritonError.INVALID_ARG
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(msg, code))


def _engine(p: dict[str, str]):
    from ..engine import Engine

    threads = int(p.get("threads") or 0) or None
    os.environ.setdefault("LARP_RT_ORT_SPIN", "0")
    return Engine(p["bundle"], backend="auto", device=p.get("device") or "cpu",
                  threads=threads, preallocate=0)  # the scheduler owns (and pre-faults) its caches


SAMPLING = ("SEED", "CFG_SCALE", "TEMPERATURE", "TOP_K", "TOP_P")


def row_params(request, B: int, default: SamplingParams) -> list[SamplingParams]:
    """One SamplingParams per row from the optional inputs; SEED < 0, NaN floats or TOP_K < 0 mean the default."""
    cols = {n: _in(request, n) for n in SAMPLING}
    for n, v in cols.items():
        if v is not None and v.reshape(-1).shape[0] != B:
            raise ValueError(f"{n} has {v.reshape(-1).shape[0]} values for {B} CLASS_ID rows; give one per row")
    out = []
    for i in range(B):
        kw = {}
        for name, field in (("CFG_SCALE", "cfg_scale"), ("TEMPERATURE", "temperature"), ("TOP_P", "top_p")):
            v = cols[name]
            if v is not None and not math.isnan(float(v.reshape(-1)[i])):
                kw[field] = float(v.reshape(-1)[i])
        if cols["TOP_K"] is not None and int(cols["TOP_K"].reshape(-1)[i]) >= 0:
            kw["top_k"] = int(cols["TOP_K"].reshape(-1)[i])
        if cols["SEED"] is not None and int(cols["SEED"].reshape(-1)[i]) >= 0:
            kw["seed"] = int(cols["SEED"].reshape(-1)[i])
        base = {f: getattr(default, f) for f in ("cfg_scale", "temperature", "top_k", "top_p")}
        out.append(SamplingParams(**{**base, **kw}))
    return out


def class_ids(request) -> np.ndarray:
    ids = _in(request, "CLASS_ID")
    return ids.reshape(-1)


class Generate:
    """Every row of every request is one request of the instance's Scheduler (one continuous batch)."""

    stream = False

    def initialize(self, args):
        from ..serving import Scheduler

        self.p = _params(args)
        self.engine = _engine(self.p)
        rows = int(self.p.get("scheduler_rows") or 16)
        self.scheduler = Scheduler(self.engine, max_batch=rows, max_queue=1 << 16).start()
        self.every = int(self.p.get("stream_every") or 16)

    def _submit(self, request, on_step=None):
        ids = class_ids(request)
        self.engine.check_class_ids(ids)
        params = row_params(request, len(ids), self.engine.default_params)
        return [self.scheduler.submit(int(c), p, on_step=on_step) for c, p in zip(ids, params, strict=True)]

    def execute(self, requests):
        pending = []
        for r in requests:
            try:
                pending.append(self._submit(r))
            except Exception as e:  # bad input: this request's error; the others go on
                pending.append(e)
        responses = []
        for subs in pending:
            if isinstance(subs, Exception):
                responses.append(_error(str(subs)))
                continue
            try:
                gens = [s.result() for s in subs]
            except Exception as e:
                responses.append(_error(f"generation failed: {e}", internal=True))
                continue
            tokens = np.concatenate([g.tokens for g in gens], 0).astype(np.int64)
            seeds = np.array([[s.seed] for s in subs], np.int64)
            responses.append(pb_utils.InferenceResponse([_out("TOKENS", tokens), _out("SEED", seeds)]))
        return responses

    def finalize(self):
        self.scheduler.stop(drain=False)
        self.engine.close()


class GenerateStream(Generate):
    """Decoupled: execute() only submits; partial responses (STEP, TOTAL, TOKEN) come from the loop thread every
    ``stream_every`` steps and the last one carries TOKENS + SEED with the final flag."""

    def execute(self, requests):
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for r in requests:
            sender = r.get_response_sender()
            lock = threading.Lock()

            def on_step(step, total, token, sender=sender, lock=lock):
                if (step + 1) % self.every == 0 and step + 1 < total:
                    with lock:
                        sender.send(pb_utils.InferenceResponse([
                            _out("STEP", np.array([step + 1], np.int32)), _out("TOTAL", np.array([total], np.int32)),
                            _out("TOKEN", np.array([token], np.int64))]))

            try:
                subs = self._submit(r, on_step)
                if len(subs) != 1:
                    for s in subs:
                        s.cancel()
                    raise ValueError(f"larp_generate_stream takes one CLASS_ID per request, got {len(subs)}")
            except Exception as e:
                sender.send(_error(str(e)), flags=final)
                continue

            def done(req, sender=sender, lock=lock):
                with lock:
                    try:
                        g = req.result(0)
                        sender.send(pb_utils.InferenceResponse([
                            _out("TOKENS", g.tokens.reshape(-1).astype(np.int64)),
                            _out("SEED", np.array([req.seed], np.int64)),
                            _out("STEP", np.array([req.total], np.int32)),
                            _out("TOTAL", np.array([req.total], np.int32)),
                            _out("TOKEN", np.array([g.tokens[0, -1]], np.int64))]), flags=final)
                    except Exception as e:
                        sender.send(_error(f"generation failed: {e}", internal=True), flags=final)

            subs[0].add_done_callback(done)
        return None


class _Tokenizer:
    def initialize(self, args):
        self.p = _params(args)
        self.engine = _engine(self.p)

    def finalize(self):
        self.engine.close()

    def _batched(self, requests, name: str, check, run, out_name: str):
        arrays, responses = [], [None] * len(requests)
        for i, r in enumerate(requests):
            try:
                x = _in(r, name)
                check(x)
                arrays.append((i, x))
            except Exception as e:
                responses[i] = _error(str(e))
        if arrays:
            try:
                y = run(np.concatenate([a for _, a in arrays], 0))
                at = 0
                for i, a in arrays:
                    responses[i] = pb_utils.InferenceResponse([_out(out_name, y[at:at + len(a)])])
                    at += len(a)
            except Exception as e:
                for i, _ in arrays:
                    responses[i] = _error(f"{name}: {e}")
        return responses


class Encode(_Tokenizer):
    def execute(self, requests):
        return self._batched(requests, "VIDEO", self.engine.check_video, self.engine.encode, "TOKENS")


class Decode(_Tokenizer):
    def execute(self, requests):
        return self._batched(requests, "TOKENS", self.engine.check_tokens,
                             lambda t: to_frames(self.engine.decode(t)), "FRAMES")


class Video:
    """BLS: one larp_generate request with every row of the batch's requests (so they share its continuous batch),
    then one larp_decode request; when the joint request fails (one request's bad input) each request runs alone,
    so the error is that request's only."""

    def initialize(self, args):
        pass

    def finalize(self):
        pass

    def execute(self, requests):
        if len(requests) > 1:
            try:
                return self._joint(requests)
            except ValueError:
                pass
        return [self._one(r) for r in requests]

    def _joint(self, requests):
        ids = [class_ids(r) for r in requests]
        sizes = [len(i) for i in ids]
        cols = {"CLASS_ID": np.concatenate(ids).astype(np.int64).reshape(-1, 1)}
        for name, dtype, missing in (("SEED", np.int64, -1), ("CFG_SCALE", np.float32, np.nan),
                                     ("TEMPERATURE", np.float32, np.nan), ("TOP_K", np.int32, -1),
                                     ("TOP_P", np.float32, np.nan)):
            vals = [_in(r, name) for r in requests]
            if all(v is None for v in vals):
                continue
            parts = []
            for v, n in zip(vals, sizes, strict=True):
                if v is None:
                    parts.append(np.full(n, missing, dtype))
                elif v.size != n:
                    raise ValueError(f"{name}: one value per CLASS_ID row")
                else:
                    parts.append(v.reshape(-1).astype(dtype))
            cols[name] = np.concatenate(parts).reshape(-1, 1)
        frames, tokens, seeds = self._run([_out(k, v) for k, v in cols.items()])
        out, at = [], 0
        for n in sizes:
            out.append(pb_utils.InferenceResponse([_out("FRAMES", frames[at:at + n]), _out("TOKENS", tokens[at:at + n]),
                                                   _out("SEED", seeds[at:at + n])]))
            at += n
        return out

    def _run(self, inputs):
        gen = pb_utils.InferenceRequest(model_name="larp_generate", inputs=inputs,
                                        requested_output_names=["TOKENS", "SEED"]).exec()
        if gen.has_error():
            raise ValueError(gen.error().message())
        tokens = np.array(np.from_dlpack(pb_utils.get_output_tensor_by_name(gen, "TOKENS")))
        seeds = np.array(np.from_dlpack(pb_utils.get_output_tensor_by_name(gen, "SEED")))
        dec = pb_utils.InferenceRequest(model_name="larp_decode", inputs=[_out("TOKENS", tokens)],
                                        requested_output_names=["FRAMES"]).exec()
        if dec.has_error():
            raise RuntimeError(dec.error().message())
        frames = np.array(np.from_dlpack(pb_utils.get_output_tensor_by_name(dec, "FRAMES")))
        return frames, tokens, seeds

    def _one(self, r):
        try:
            inputs = [t for t in (pb_utils.get_input_tensor_by_name(r, n) for n in ("CLASS_ID",) + SAMPLING)
                      if t is not None]
            frames, tokens, seeds = self._run(inputs)
            return pb_utils.InferenceResponse([_out("FRAMES", frames), _out("TOKENS", tokens), _out("SEED", seeds)])
        except ValueError as e:
            return _error(str(e))
        except Exception as e:
            return _error(str(e), internal=True)
