"""The HTTP API's request and response models (pydantic v2): what ``/openapi.json`` publishes and every route
validates before any work starts.

Each constrained field carries its rule (``RULES``): the same words go into the schema's description and into the
400 a client gets when the field is wrong (``validation_message``), so the schema, the docs and the error agree.
Unknown fields are refused (``extra="forbid"``). Ints and bools are strict (``true`` is no class id, ``"3"`` is
no seed); a float field takes a JSON int. The limits a model cannot know (the bundle's class count, codebook size
and vocabulary, the server's batch and queue) are checked by the Engine / the route, with the Engine's message.
``validate_body`` parses a body outside FastAPI's signature (``/v1/score`` takes two content types) with the same
messages; ``tokens_array`` turns validated token lists into the (B, N) array the Engine takes.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from ..sampling import MAX_CFG_SCALE, MAX_SEED, MAX_TEMPERATURE, MIN_TOP_P, PARAM_RULES
from .errors import HTTPError

__all__ = [
    "RULES", "DecodeFormat", "MAX_CLASS_IDS", "MIN_FPS", "MAX_TOKEN_ROWS", "MAX_FPS", "MAX_SCALE", "MAX_UPLOADS",
    "GenerateRequest", "DecodeRequest", "ScoreTokensRequest", "PredictForm", "EncodeForm", "ScoreUploadForm",
    "GenerateResult", "ModelsInfo", "PredictResult", "EncodeResult", "ScoreResult", "ErrorBody", "Health",
    "validation_message", "validate_body", "tokens_array",
]

MAX_CLASS_IDS = 1024  # the schema's cap; a server holds at most max_batch + max_queue (GET /v1/models says)
MAX_TOKEN_ROWS = 256  # token rows per decode / score request
MIN_FPS, MAX_FPS = 1.0, 120.0  # mp4 time bases and GIF frame delays (10 ms units) hold these exactly
MAX_SCALE = 16
MAX_UPLOADS = 16  # videos per POST /v1/score

DecodeFormat = Literal["mp4", "gif", "npy"]

# field -> (the name the client reads, the rule: "<name> must be <rule>, got <value>")
RULES: dict[str, tuple[str, str]] = {
    "class_ids": ("class_ids", f"a non-empty list of at most {MAX_CLASS_IDS} ints, e.g. [0, 3]"),
    "class_ids[]": ("class_ids[{i}]", "an int"),
    "cfg_scale": ("SamplingParams.cfg_scale", PARAM_RULES["cfg_scale"]),
    "temperature": ("SamplingParams.temperature", PARAM_RULES["temperature"]),
    "top_k": ("SamplingParams.top_k", "an int >= 0 (0 = off)"),
    "top_p": ("SamplingParams.top_p", PARAM_RULES["top_p"]),
    "seed": ("SamplingParams.seed", f"None or an int in [0, {MAX_SEED}]"),
    "format": ("format", "one of {choices}"),
    "stream": ("stream", "true or false"),
    "fps": ("fps", f"a number in [{MIN_FPS:g}, {MAX_FPS:g}]"),
    "scale": ("scale", f"an int in [1, {MAX_SCALE}] (nearest upscaling)"),
    "tokens": ("tokens", f"a (B, N) list of at most {MAX_TOKEN_ROWS} lists of ints (or one list of N)"),
    "num_cond_frames": ("num_cond_frames", "an int >= 1 (at most the tokenizer's frame count)"),
    "stochastic_cond": ("stochastic_cond", "true or false"),
    "cond_seed": ("cond_seed", f"an int in [0, {2**63 - 1}], for stochastic_cond"),
    "method": ("method", "one of {choices}"),
    "file": ("file", "an uploaded video file (multipart field 'file')"),
}


def _field(key: str, default: Any = None, **constraints) -> Any:
    label, rule = RULES[key]
    desc = constraints.pop("description", "")
    return Field(default, description=f"{desc} Must be {rule}.".strip(), **constraints)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Sampling(_Body):
    temperature: float | None = _field("temperature", ge=0.0, le=MAX_TEMPERATURE,
                                       description="Softmax temperature; unset: the bundle's default.")
    top_k: StrictInt | None = _field("top_k", ge=0, description="Keep the k most likely tokens; unset: default.")
    top_p: float | None = _field("top_p", ge=MIN_TOP_P, le=1.0, description="Nucleus mass; unset: default.")
    seed: StrictInt | None = _field("seed", ge=0, le=MAX_SEED, description="The request's Philox seed; unset: "
                                    "the server draws one and returns it.")


class GenerateRequest(_Sampling):
    """``POST /v1/generate``: one video per class id, all from one seed (class id i draws from stream i)."""

    class_ids: list[StrictInt] = _field("class_ids", ..., min_length=1, max_length=MAX_CLASS_IDS,
                                        description="Class ids in [0, num_classes).")
    cfg_scale: float | None = _field("cfg_scale", ge=0.0, le=MAX_CFG_SCALE,
                                     description="Classifier-free guidance; unset: default.")
    format: Literal["json", "mp4", "gif"] = _field("format", "json", description="json: the tokens; mp4 / gif: "
                                                   "the decoded videos tiled in one clip.")
    stream: StrictBool = _field("stream", False, description="Server-sent events: accepted, progress per token, "
                                "then result (format json only).")
    fps: float = _field("fps", 8.0, ge=MIN_FPS, le=MAX_FPS, description="Frame rate of an mp4 / gif.")
    scale: StrictInt = _field("scale", 1, ge=1, le=MAX_SCALE, description="Nearest upscaling of an mp4 / gif.")


class DecodeRequest(_Body):
    """``POST /v1/decode``: tokens -> video (format also as the query ``?format=``)."""

    tokens: list[list[StrictInt]] | list[StrictInt] = _field("tokens", ..., min_length=1, max_length=MAX_TOKEN_ROWS,
                                                             description="Token ids in [0, codebook).")
    format: DecodeFormat | None = _field("format", description="mp4 (default), gif, or npy (the "
                                                         "float32 (B, C, T, H, W) videos).")
    fps: float = _field("fps", 8.0, ge=MIN_FPS, le=MAX_FPS)
    scale: StrictInt = _field("scale", 1, ge=1, le=MAX_SCALE)


class ScoreTokensRequest(_Body):
    """``POST /v1/score`` as JSON: the prior's NLL of token rows."""

    tokens: list[list[StrictInt]] | list[StrictInt] = _field("tokens", ..., min_length=1, max_length=MAX_TOKEN_ROWS,
                                                             description="Token ids in [0, codebook).")
    method: Literal["auto", "full", "steps"] = _field("method", "auto", description="full: one causal forward "
                                                      "(auto); steps: the cached step graph, as generation runs.")


class _Form(BaseModel):
    # multipart fields arrive as text: numbers are parsed (not strict); unknown fields are still refused
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class EncodeForm(_Form):
    """``POST /v1/encode``: a video upload -> its tokens."""

    file: UploadFile = _field("file", ..., description="The video (mp4, gif, webm, ...).")


class PredictForm(_Form):
    """``POST /v1/predict``: a video's first frames -> the predicted clip (frame-prediction bundles)."""

    file: UploadFile = _field("file", ..., description="The conditioning video; its first num_cond_frames frames "
                              "are used, fitted to the model's frame size.")
    num_cond_frames: int = _field("num_cond_frames", 5, ge=1)
    temperature: float | None = _field("temperature", ge=0.0, le=MAX_TEMPERATURE)
    top_k: int | None = _field("top_k", ge=0)
    top_p: float | None = _field("top_p", ge=MIN_TOP_P, le=1.0)
    seed: int | None = _field("seed", ge=0, le=MAX_SEED)
    stochastic_cond: bool = _field("stochastic_cond", False, description="Encode the conditioning frames with "
                                   "the authors' stochastic SVQ (seeded by cond_seed) instead of argmax.")
    cond_seed: int | None = _field("cond_seed", ge=0, le=2**63 - 1)
    format: Literal["json", "mp4", "gif"] = _field("format", "json")
    stream: bool = _field("stream", False, description="Server-sent events, as for /v1/generate (format json).")
    fps: float = _field("fps", 8.0, ge=MIN_FPS, le=MAX_FPS)
    scale: int = _field("scale", 1, ge=1, le=MAX_SCALE)


class ScoreUploadForm(_Form):
    """``POST /v1/score`` as multipart: videos -> encoded -> the prior's NLL of each."""

    file: list[UploadFile] = _field("file", ..., min_length=1, max_length=MAX_UPLOADS,
                                    description=f"One to {MAX_UPLOADS} videos, each in a field named 'file'.")
    method: Literal["auto", "full", "steps"] = _field("method", "auto")


# ------------------------------------------------------------------------------------------------
# responses
# ------------------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    error: str = Field(description="What is wrong and how to fix it.")
    status: int = Field(description="The HTTP status, repeated.")


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")  # plus the scheduler's stats
    status: Literal["ok", "starting", "draining", "unavailable"]
    ready: bool


class ModelsInfo(BaseModel):
    """``GET /v1/models``: the bundle's parts, graphs, configs, the tasks it serves, the server's limits."""

    model_config = ConfigDict(extra="allow")
    id: str
    larp_rt: str
    format_version: int | None
    parts: list[str]
    tasks: list[Literal["generate", "predict", "encode", "decode", "score"]]
    precision: str
    backend: str
    default_sampling: dict[str, Any]
    limits: dict[str, Any]


class SamplingUsed(BaseModel):
    cfg_scale: float
    temperature: float
    top_k: int
    top_p: float
    seed: int


class GenerateResult(BaseModel):
    tokens: list[list[int]] = Field(description="(B, N): row i is class_ids[i]'s video; decode with /v1/decode.")
    seeds: list[int]
    class_ids: list[int]
    params: SamplingUsed
    seconds: float


class VideoInfo(BaseModel):
    frames: int | None = Field(description="null when the upload is longer than what was read.")
    height: int
    width: int
    fps: float | None = None


class ModelInput(BaseModel):
    frames: int
    height: int
    width: int


class EncodeResult(BaseModel):
    tokens: list[list[int]]
    notes: list[str] = Field(description="How the upload was fitted to the model (resized, cropped, padded).")
    input: VideoInfo
    model_input: ModelInput


class PredictResult(BaseModel):
    tokens: list[list[int]] = Field(description="(1, N): the predicted clip's tokens (decode with /v1/decode).")
    cond_tokens: list[list[int]] = Field(description="(1, N): the conditioning frames' tokens (padded clip).")
    seed: int
    num_cond_frames: int
    params: SamplingUsed
    notes: list[str]
    input: VideoInfo
    model_input: ModelInput
    seconds: float


class ScoreResult(BaseModel):
    nll: list[float] = Field(description="Per video: the mean negative log-likelihood under the tokenizer's AR "
                             "prior, nats per predicted token (tokens 1 .. N-1).")
    uniform: float = Field(description="log(codebook size): the NLL of a uniform guess, for comparison.")
    method: str
    notes: list[list[str]] | None = Field(None, description="Per uploaded video, how it was fitted.")
    tokens: list[list[int]] | None = Field(None, description="The uploaded videos' tokens.")
    seconds: float


# ------------------------------------------------------------------------------------------------
# validation errors -> one message in the server's words
# ------------------------------------------------------------------------------------------------
def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validation_message(errors: list[dict], fields: list[str], route: str) -> tuple[int, str]:
    """FastAPI / pydantic errors of one request -> (status, message) for the ``{"error", "status"}`` body.
    ``fields``: the fields the route's model takes (for the unknown-field message)."""
    unknown = sorted({str(e["loc"][-1]) for e in errors if e.get("type") == "extra_forbidden"})
    if unknown:
        return 400, f"unknown field(s) {unknown} for {route}; it takes {', '.join(fields)}"
    e = errors[0]
    kind, loc = e.get("type", ""), [x for x in e.get("loc", ()) if x not in ("body", "query")]
    if kind == "json_invalid":
        return 400, f"malformed JSON body: {(e.get('ctx') or {}).get('error', 'not JSON')}"
    if not loc or isinstance(loc[0], int):
        got = e.get("input")
        if kind == "missing" or got in (None, b"", ""):
            return 400, "the request body is empty: send a JSON object (Content-Type: application/json)"
        if isinstance(got, (bytes, bytearray, str)):
            return 415, "send the body as JSON with the header 'Content-Type: application/json'"
        return 400, f"the body must be a JSON object, got a JSON {_json_kind(got)}"
    name = str(loc[0])
    index = next((x for x in loc[1:] if isinstance(x, int)), None)
    key = f"{name}[]" if index is not None and f"{name}[]" in RULES else name
    label, rule = RULES.get(key, (name, "valid"))
    if "{choices}" in rule:
        rule = rule.format(choices=(e.get("ctx") or {}).get("expected", "the documented values"))
    if kind == "missing":
        return 400, f"{label.format(i=index)} is required: it must be {rule}"
    got = e.get("input")
    if isinstance(got, float) and not math.isfinite(got):
        got = str(got)
    return 400, f"{label.format(i=index)} must be {rule}, got {_show(got)}"


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "value")


def validate_body(model, data, route: str):
    """A body parsed outside FastAPI's signature (one route, two content types): the same errors as the others."""
    try:
        if isinstance(data, (bytes, bytearray)):
            if not data.strip():
                raise HTTPError(400, "the request body is empty: send a JSON object (Content-Type: application/json)")
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as e:
        status, message = validation_message(e.errors(), list(model.model_fields), route)
        raise HTTPError(status, message) from None
    except RecursionError:
        raise HTTPError(400, "malformed JSON body: nested too deeply") from None


def tokens_array(tokens: list) -> np.ndarray:
    """The validated token lists -> (B, N); rows of unequal length are the one thing the model cannot say."""
    try:
        x = np.asarray(tokens, dtype=np.int64)
    except (ValueError, OverflowError) as e:
        raise HTTPError(400, f"tokens must be a (B, N) list of lists of ints of equal length: {e}") from None
    return x[None] if x.ndim == 1 else x
