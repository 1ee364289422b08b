"""``POST /v1/generate``: class ids -> tokens, a video, or server-sent progress events."""

from __future__ import annotations

from fastapi import FastAPI, Request

from .. import schemas as S
from ..openapi import VIDEO_OR_EVENTS
from ..state import State
from ..streaming import answer_job

__all__ = ["register"]


def register(app: FastAPI, st: State) -> None:
    @app.post("/v1/generate", response_model=S.GenerateResult, responses={200: VIDEO_OR_EVENTS},
              summary="Class-conditional videos (tokens, mp4 / gif, or streamed progress)")
    async def generate(body: S.GenerateRequest, request: Request):
        st.refuse_if_draining()
        job = st.generate_job(body)
        return await answer_job(st, job, request, lambda hook: st.submit(job, on_step=hook),
                                {"class_ids": job.class_ids, "seed": job.params.seed})
