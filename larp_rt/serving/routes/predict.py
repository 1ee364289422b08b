"""``POST /v1/predict``: a video's first frames -> the whole clip (frame-prediction bundles)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import FastAPI, Form, Request

from .. import schemas as S
from ..media import spooled
from ..openapi import VIDEO_OR_EVENTS
from ..state import State
from ..streaming import answer_job

__all__ = ["register"]


def register(app: FastAPI, st: State) -> None:
    @app.post("/v1/predict", response_model=S.PredictResult, responses={200: VIDEO_OR_EVENTS},
              summary="Frame prediction: a video's first frames -> the whole clip")
    async def predict(form: Annotated[S.PredictForm, Form(media_type="multipart/form-data")], request: Request):
        st.refuse_if_draining()
        st.need_task("predict", "POST /v1/predict")
        st.need("tokenizer", "POST /v1/predict")

        def prepare():
            with spooled([form.file]) as files:
                return st.predict_job(form, *files[0])

        async with st.media_job("POST /v1/predict"):
            job = await st.work(prepare)
        # the conditioning clip is encoded on submission: a thread, as every encode is
        return await answer_job(st, job, request, lambda hook: _in_thread(st, st.submit, job, hook),
                                {"num_cond_frames": job.num_cond_frames, "seed": job.params.seed})


async def _in_thread(st: State, fn: Callable, *args):
    return await st.work(fn, *args)
