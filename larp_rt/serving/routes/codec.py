"""``POST /v1/encode`` (a video upload -> its tokens) and ``POST /v1/decode`` (tokens -> mp4 / gif / npy)."""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Form, Query
from fastapi.responses import Response

from ... import checks
from .. import schemas as S
from ..errors import HTTPError
from ..media import MEDIA, spooled
from ..openapi import BINARY
from ..state import State

__all__ = ["register"]


def register(app: FastAPI, st: State) -> None:
    engine = st.engine

    @app.post("/v1/encode", response_model=S.EncodeResult, summary="A video upload -> its tokens")
    async def encode(form: Annotated[S.EncodeForm, Form(media_type="multipart/form-data")]):
        st.refuse_if_draining()
        st.need("tokenizer", "POST /v1/encode")

        def run():
            with spooled([form.file]) as files:
                return st.encode_file(*files[0])

        async with st.media_job("POST /v1/encode"):
            return await st.work(run)

    @app.post("/v1/decode", response_class=Response, summary="Tokens -> a video (mp4 / gif / npy)",
              responses={200: {"content": {"video/mp4": BINARY, "image/gif": BINARY, "application/x-npy": BINARY}}})
    async def decode(body: S.DecodeRequest, format: Annotated[S.DecodeFormat | None, Query(
            description="The output format, instead of the body's")] = None):
        st.refuse_if_draining()
        st.need("tokenizer", "POST /v1/decode")
        if format is not None and body.format is not None and format != body.format:
            raise HTTPError(400, f"format is {format!r} in the query but {body.format!r} in the body: give one")
        fmt = format or body.format or "mp4"
        try:
            tokens = checks.check_tokens(S.tokens_array(body.tokens), engine.tokenizer_config)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        st.check_video_budget(len(tokens), fmt, 1 if fmt == "npy" else body.scale)
        async with st.media_job("POST /v1/decode"):
            data = await st.work(st.render, tokens, fmt, body.fps, body.scale)
        return Response(content=data, media_type=MEDIA[fmt],
                        headers={"Content-Disposition": f'inline; filename="decoded.{fmt}"'})
