"""The server's state (``State``, one per app at ``app.state.larp``) and the work the routes hand it: validating a
generate / predict request into a ``Job``, submitting it to the scheduler and collecting its result, scoring,
encoding and rendering (in worker threads, bounded by the media-job budget), and the ``GET /v1/models`` summary.

Every refusal is an ``HTTPError`` in the client's words. Routes call these as methods of the instance, so a test
may replace one on a running server's state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np

from .. import __version__, checks
from ..engine import Engine
from ..errors import BackendCapabilityError
from ..sampling import SamplingParams, fresh_seed
from ..video import fit_clip
from . import media
from . import schemas as S
from .errors import HTTPError, unsupported
from .limits import DEFAULT_MAX_MEDIA_JOBS, DEFAULT_MAX_UPLOAD_PIXELS, DEFAULT_MAX_VIDEO_PIXELS, GIF_COST
from .metrics import ServingMetrics
from .scheduler import QueueFull, RequestCancelled, Scheduler, SchedulerClosed

__all__ = ["Job", "State", "cancel_all"]

log = logging.getLogger("larp_rt.serving.app")  # the name it logged under before the split (log filters)


@dataclasses.dataclass
class Job:
    """A validated generate / predict request: its sampling, its output, and (for predict) its clip."""

    params: SamplingParams
    format: str
    stream: bool
    fps: float
    scale: int
    class_ids: list[int] = dataclasses.field(default_factory=list)  # generate: one scheduler request each
    clip: np.ndarray | None = None  # predict: (1, T, H, W, 3) uint8, fitted to the model
    num_cond_frames: int = 0
    stochastic_cond: bool = False
    cond_seed: int | None = None
    upload: dict | None = None  # predict: notes, input, model_input

    @property
    def n(self) -> int:
        return len(self.class_ids) if self.clip is None else 1


def cancel_all(reqs) -> None:
    """Cancel the scheduler requests of ``reqs`` that have not finished (their rows free at the next step)."""
    for r in reqs:
        if not r.done():
            r.cancel()


def _given(body, names) -> dict:
    return {k: getattr(body, k) for k in names if getattr(body, k) is not None}

class State:
    """One app's engine, scheduler, metrics and limits; whether it has started and whether it drains."""

    def __init__(self, engine: Engine, scheduler: Scheduler | None, metrics: ServingMetrics, *, api_key, max_body_bytes,
                 request_timeout, max_classes: int, workers: int, max_video_pixels: int = DEFAULT_MAX_VIDEO_PIXELS,
                 max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS, max_media_jobs: int = DEFAULT_MAX_MEDIA_JOBS):
        self.engine, self.scheduler, self.metrics = engine, scheduler, metrics
        self.max_video_pixels, self.max_upload_pixels = max_video_pixels, max_upload_pixels
        self.max_media_jobs, self.media_jobs = max_media_jobs, 0
        self.api_key, self.max_body_bytes, self.request_timeout = api_key, max_body_bytes, request_timeout
        self.max_classes = max_classes
        self.started = False  # the lifespan has started the scheduler
        self.draining = False  # SIGTERM (or the lifespan's end): refuse new work, finish what runs
        # encode / decode / video writing run in threads; a small limiter keeps a burst of uploads from taking
        # every core away from the generation loop
        self.limiter = anyio.CapacityLimiter(workers)

    def scrub(self, message: str) -> str:
        """A message for the client: the bundle by its name, not by where it lies on the server's disk."""
        where = str(self.engine.bundle.path)
        return message.replace(where, self.engine.bundle.path.name) if where else message

    async def work(self, fn: Callable, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    @contextlib.asynccontextmanager
    async def media_job(self, what: str):
        """A slot for an encode / decode / upload job (they hold frames in memory): at most max_media_jobs at once,
        beyond that a 429 at once rather than an unbounded wait (the event loop is single-threaded: no lock)."""
        if self.media_jobs >= self.max_media_jobs:
            raise HTTPError(429, f"{what}: {self.max_media_jobs} video jobs are in flight, the server's limit "
                            "(--max-media-jobs); retry after 1 s", {"Retry-After": "1"})
        self.media_jobs += 1
        try:
            yield
        finally:
            self.media_jobs -= 1

    def check_video_budget(self, rows: int, fmt: str, scale: int) -> None:
        """Refuse (413) a video response larger than max_video_pixels before any of its work starts."""
        if fmt not in ("mp4", "gif", "npy"):
            return
        C, T, H, W = self.engine.tokenizer_config.video_shape
        cost = rows * T * H * W * scale * scale * (GIF_COST if fmt == "gif" else 1)
        if cost > self.max_video_pixels:
            gif = f" (a GIF counts {GIF_COST}x)" if fmt == "gif" else ""
            raise HTTPError(413, f"the {fmt} would hold {rows} video(s) x {T} frames x {H * scale}x{W * scale} pixels "
                            f"= {cost} pixel units{gif}, over the server's limit of {self.max_video_pixels} "
                            "(--max-video-mpixels): ask for fewer rows per request, a smaller scale, or mp4 / json")

    def begin_drain(self) -> None:
        self.draining = True

    @property
    def ready(self) -> bool:
        sched = self.scheduler
        return self.started and not self.draining and (sched is None or (sched.ready and sched.accepting))

    def refuse_if_draining(self) -> None:
        if self.draining or (self.started and self.scheduler is not None and not self.scheduler.accepting):
            raise HTTPError(503, "the server is shutting down and takes no new work; retry on another instance",
                            {"Retry-After": "5"})

    def need(self, part: str, what: str) -> None:
        cfg = self.engine.tokenizer_config if part == "tokenizer" else self.engine.generator_config
        if cfg is None:
            raise HTTPError(400, f"{what} needs a {part}, and this server's bundle has none "
                            f"(export one with --{part}); GET /v1/models lists the bundle's parts")

    def need_task(self, task: str, route: str) -> None:
        """The bundle's generator must be of the kind the route serves (class-conditional vs frame prediction)."""
        self.need("generator", route)
        fp = self.engine.predicts_frames
        if task == "generate" and fp:
            raise HTTPError(400, f"{route}: this bundle's generator predicts frames from a video (POST /v1/predict); "
                            "it takes no class ids")
        if task == "predict" and not fp:
            raise HTTPError(400, f"{route}: this bundle's generator is class-conditional (POST /v1/generate with "
                            "class_ids); export a frame-prediction generator to predict frames")

    def params(self, given: dict) -> SamplingParams:
        # one seed for the request: class id i (or the one predicted clip) draws from the stream (seed, i)
        given.setdefault("seed", fresh_seed())
        params = dataclasses.replace(self.engine.default_params, **given)
        try:
            return params.validate(self.engine.generator_config.vocab_size)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None

    def video_options(self, fmt: str, stream: bool) -> None:
        if stream and fmt != "json":
            raise HTTPError(400, "stream: true sends the tokens in its last event: use format 'json' with it "
                            "(then POST /v1/decode), or stream: false for an mp4 / gif")
        if fmt != "json":
            self.need("tokenizer", f"format {fmt!r}")

    # -- generate / predict ------------------------------------------------------------------------------
    def generate_job(self, body: S.GenerateRequest) -> Job:
        self.need_task("generate", "POST /v1/generate")
        ids = body.class_ids
        if len(ids) > self.max_classes:
            raise HTTPError(400, f"at most {self.max_classes} class ids per request (the scheduler's queue, "
                            f"--max-queue), got {len(ids)}: split the request")
        try:
            self.engine.check_class_ids(ids)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        params = self.params(_given(body, ("cfg_scale", "temperature", "top_k", "top_p", "seed")))
        self.video_options(body.format, body.stream)
        self.check_video_budget(len(ids), body.format, body.scale)
        return Job(params, body.format, body.stream, body.fps, body.scale, class_ids=list(ids))

    def predict_job(self, form: S.PredictForm, path: str, name: str) -> Job:
        """(a thread) The upload -> its clip fitted to the model, and the request's sampling."""
        C, T, H, W = self.engine.tokenizer_config.video_shape
        try:
            n = checks.check_num_cond_frames(form.num_cond_frames, self.engine.tokenizer_config)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        if form.cond_seed is not None and not form.stochastic_cond:
            raise HTTPError(400, "cond_seed seeds the stochastic conditioning draw: give it with stochastic_cond=true")
        frames, fps = media.read_upload(path, name, T, self.max_upload_pixels)
        if len(frames) < n:
            raise HTTPError(400, f"the upload {name!r} has {len(frames)} frame(s); prediction is conditioned on the "
                            f"first num_cond_frames={n}: send a longer clip or lower num_cond_frames")
        t0, h0, w0 = frames.shape[:3]
        clip, notes = fit_clip(frames, T, H, W)
        # frames past the conditioning ones are never read, so their padding is no news
        notes = [f"{x} (the model takes {T}x{H}x{W})" for x in notes if not x.startswith("padded")]
        params = self.params({"cfg_scale": 1.0, **_given(form, ("temperature", "top_k", "top_p", "seed"))})
        self.video_options(form.format, form.stream)
        self.check_video_budget(1, form.format, form.scale)
        upload = {"notes": notes, "input": {"frames": t0 if t0 <= T else None, "height": h0, "width": w0, "fps": fps},
                  "model_input": {"frames": T, "height": H, "width": W}}
        return Job(params, form.format, form.stream, form.fps, form.scale, clip=clip[None], num_cond_frames=n,
                    stochastic_cond=form.stochastic_cond, cond_seed=form.cond_seed, upload=upload)

    def _submit_one(self, job: Job, i: int, on_step):
        if job.clip is None:
            return self.scheduler.submit(job.class_ids[i], job.params, stream=i, timeout=self.request_timeout,
                                         on_step=on_step)
        return self.scheduler.submit_predict(job.clip, job.params, num_cond_frames=job.num_cond_frames,
                                             stochastic_cond=job.stochastic_cond, seed=job.cond_seed,
                                             timeout=self.request_timeout, on_step=on_step)

    def submit(self, job: Job, on_step: Callable[[int], Callable] | None = None) -> list:
        """One scheduler request per class id (stream i), or the one predict request; on any refusal the ones
        already in are cancelled. A predict request encodes its conditioning here: call it from a thread."""
        reqs = []
        try:
            for i in range(job.n):
                reqs.append(self._submit_one(job, i, None if on_step is None else on_step(i)))
        except QueueFull as e:
            cancel_all(reqs)
            retry = max(1, math.ceil(e.retry_after))
            raise HTTPError(429, f"the queue is full ({self.scheduler.max_queue} waiting); retry after {retry} s",
                            {"Retry-After": str(retry)}) from None
        except SchedulerClosed:
            cancel_all(reqs)
            self.refuse_if_draining()
            raise HTTPError(503, "the scheduler has stopped and takes no new work", {"Retry-After": "5"}) from None
        except ValueError as e:
            cancel_all(reqs)
            raise HTTPError(400, str(e)) from None
        except BackendCapabilityError as e:  # e.g. stochastic_cond on a backend without the stochastic encoder
            cancel_all(reqs)
            raise unsupported(e) from None
        except BaseException:
            cancel_all(reqs)
            raise
        return reqs

    def collect(self, job: Job, reqs: list, t0: float) -> dict:
        """The finished requests -> the response JSON; the first failure becomes the HTTPError."""
        gens = []
        for r in reqs:
            try:
                gens.append(r.result(timeout=0))
            except TimeoutError:
                raise HTTPError(504, f"generation did not finish within the server's request timeout "
                                f"({self.request_timeout} s, --request-timeout)") from None
            except RequestCancelled:
                raise HTTPError(503, "the request was cancelled: the server stopped before it finished") from None
            except BackendCapabilityError as e:  # a NotImplementedError, so a RuntimeError: before the 500
                raise unsupported(e) from None
            except (ValueError, RuntimeError) as e:
                log.error("generation failed: %s", e)
                raise HTTPError(500, f"generation failed: {e}") from None
        tokens = np.concatenate([g.tokens for g in gens], axis=0).tolist()
        p = job.params
        used = {"cfg_scale": p.cfg_scale, "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
                "seed": p.seed}
        seconds = round(time.monotonic() - t0, 6)
        if job.clip is None:
            return S.GenerateResult(tokens=tokens, seeds=[p.seed] * len(gens), class_ids=job.class_ids, params=used,
                                    seconds=seconds).model_dump()
        cond = reqs[0].seq.prefix[:-1]  # the conditioning clip's tokens (the separator dropped)
        return S.PredictResult(tokens=tokens, cond_tokens=[cond.tolist()], seed=p.seed,
                               num_cond_frames=job.num_cond_frames, params=used, seconds=seconds,
                               **job.upload).model_dump()

    # -- score ------------------------------------------------------------------------------------------
    def score(self, tokens: np.ndarray, method: str, t0: float, uploads: list[dict] | None = None) -> dict:
        try:
            nll = self.engine.prior_nll(tokens, method=method)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        except BackendCapabilityError as e:
            raise unsupported(e) from None
        out = S.ScoreResult(nll=[float(x) for x in nll], uniform=math.log(self.engine.tokenizer_config.codebook_size),
                            method=method, seconds=round(time.monotonic() - t0, 6))
        if uploads is not None:
            out.notes, out.tokens = [u["notes"] for u in uploads], tokens.tolist()
        return out.model_dump(exclude_none=True)

    def score_files(self, files: list[tuple[str, str]], method: str, t0: float) -> dict:
        """(a thread) uploaded videos -> fitted, encoded in one batch, scored."""
        T, H, W = self.engine.tokenizer_config.video_shape[1:]
        clips, uploads = [], []
        for path, name in files:
            frames, _ = media.read_upload(path, name, T, self.max_upload_pixels)
            clip, notes = fit_clip(frames, T, H, W)
            clips.append(clip)
            uploads.append({"notes": [f"{x} (the model takes {T}x{H}x{W})" for x in notes]})
        tokens = self.engine.encode(np.stack(clips))
        return self.score(tokens, method, t0, uploads)

    # -- video (threads) --------------------------------------------------------------------------------
    def render(self, tokens: np.ndarray, fmt: str, fps: float, scale: int) -> bytes:
        return media.render(self.engine, tokens, fmt, fps, scale)

    def encode_file(self, path: str, name: str) -> dict:
        return media.encode_upload(self.engine, path, name, self.max_upload_pixels)

    # -- the manifest summary ---------------------------------------------------------------------------
    def tasks(self) -> list[str]:
        """The routes this bundle can answer: generate (class-conditional) or predict (frame prediction),
        encode / decode (a tokenizer), score (a tokenizer with its AR prior)."""
        eng, out = self.engine, []
        if eng.generator_config is not None:
            out.append("predict" if eng.predicts_frames else "generate")
        if eng.tokenizer_config is not None:
            out += ["encode", "decode"] + (["score"] if eng.has_prior else [])
        return out

    def models(self) -> dict:
        eng = self.engine
        spec = eng.bundle.spec
        parts = {k: v for k, v in (("tokenizer", spec.tokenizer), ("generator", spec.generator)) if v is not None}
        out: dict[str, Any] = {
            "id": eng.bundle.path.name,
            "larp_rt": __version__,
            "format_version": spec.format_version,
            "parts": list(parts),
            "tasks": self.tasks(),
            "precision": eng.bundle.precision,
            "graphs": {name: {"file": g.file, "inputs": g.input_names, "outputs": g.output_names}
                       for name, g in eng.bundle.graphs.items()},
            "backend": eng.backend_name,
            "sampler": {"running": eng.sampler_name, "bundle": spec.sampler and spec.sampler.to_dict()},
            "default_sampling": dataclasses.asdict(eng.default_params),
            "created_by": None if spec.created_by is None else dict(spec.created_by),
            "limits": {"max_body_bytes": self.max_body_bytes, "request_timeout": self.request_timeout,
                       "max_classes_per_request": self.max_classes, "max_token_rows": S.MAX_TOKEN_ROWS,
                       "max_uploads_per_score": S.MAX_UPLOADS, "max_video_pixels": self.max_video_pixels,
                       "gif_cost": GIF_COST, "max_upload_pixels": self.max_upload_pixels,
                       "max_media_jobs": self.max_media_jobs, "fps": [S.MIN_FPS, S.MAX_FPS]},
        }
        for k, part in parts.items():
            out[k] = part.to_dict()
        sched = self.scheduler
        out["scheduler"] = None if sched is None else {"max_batch": sched.max_batch, "max_queue": sched.max_queue}
        return out
