"""``POST /v1/score``: the tokenizer prior's NLL of token rows (JSON) or of uploaded videos (multipart)."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request

from ... import checks
from .. import schemas as S
from ..errors import HTTPError
from ..media import spooled
from ..openapi import REF
from ..state import State

__all__ = ["register"]


def register(app: FastAPI, st: State) -> None:
    engine = st.engine
    # one route, two content types: FastAPI's signature cannot say so, the schema is written out here
    score_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": S.ScoreTokensRequest.model_json_schema(ref_template=REF)},
        "multipart/form-data": {"schema": S.ScoreUploadForm.model_json_schema(ref_template=REF)}}}}

    @app.post("/v1/score", response_model=S.ScoreResult, openapi_extra=score_body, response_model_exclude_none=True,
              summary="The tokenizer prior's NLL of token rows (JSON) or of uploaded videos (multipart)")
    async def score(request: Request):
        st.refuse_if_draining()
        st.need("tokenizer", "POST /v1/score")
        if not engine.has_prior:
            raise HTTPError(400, "POST /v1/score needs the tokenizer's AR prior, and this server's bundle has none: "
                            "export a tokenizer trained with the prior (`larp-rt export --tokenizer DIR`)")
        t0 = time.monotonic()
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith("multipart/form-data"):
            return await _score_uploads(st, request, t0)
        if ctype and not ctype.startswith("application/json"):
            raise HTTPError(415, "POST /v1/score takes JSON tokens (Content-Type: application/json) or videos as "
                            f"multipart/form-data (curl -F file=@clip.mp4 ...), got Content-Type {ctype!r}")
        body = S.validate_body(S.ScoreTokensRequest, await request.body(), "/v1/score")
        try:
            tokens = checks.check_tokens(S.tokens_array(body.tokens), engine.tokenizer_config)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        return await st.work(st.score, tokens, body.method, t0)


async def _score_uploads(st: State, request: Request, t0: float) -> dict:
    """The multipart form: one to MAX_UPLOADS videos, encoded in one batch and scored, in a media-job slot."""
    async with request.form(max_files=S.MAX_UPLOADS, max_fields=S.MAX_UPLOADS + 8) as form:
        fields = {k: (form.getlist(k) if k == "file" else form.get(k)) for k in form.keys()}
        up = S.validate_body(S.ScoreUploadForm, fields, "/v1/score")

        def run():
            with spooled(up.file) as files:
                return st.score_files(files, up.method, t0)

        async with st.media_job("POST /v1/score"):
            return await st.work(run)
