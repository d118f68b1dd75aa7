"""The wire protocol: OpenAI-compatible request and response models, the error envelope, and body parsing.

Bodies are parsed here, not by FastAPI, so that every malformed body (not JSON, not an object, wrong
types, out-of-range values) becomes one 400 in OpenAI's envelope
`{"error": {"message", "type", "param", "code"}}` naming the offending parameter — never a 422 or a 500.
Unknown fields are ignored (clients send many); fields we cannot honour (tools, a response_format other than
text) are refused.
"""

from __future__ import annotations

import json
from typing import ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator,
                      model_serializer, model_validator)
from starlette.responses import Response as HTTPResponse

MAX_STOPS = 4
MAX_STOP_CHARS = 1000  # per stop string (matching is incremental; this bounds memory and what is held back)
MAX_LOGPROBS = 20  # alternatives per token (`logprobs` of completions, `top_logprobs` of chat), as vLLM's default


class APIError(Exception):
    """An error answered to the client as-is. Messages never hold paths, traces or keys."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def envelope(self) -> ErrorResponse:
        """The error as answered to the client: `{"error": {"message", "type", "param", "code"}}`."""
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code))

    def body(self) -> dict:
        """`envelope()` as a JSON-ready dict."""
        return self.envelope().body()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 `APIError` (`invalid_request_error`) naming the offending `param`, if any; the caller raises it."""
    return APIError(400, message, param=param, code=code)


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class TextPart(Request):
    type: Literal["text"]
    text: str


class Message(Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The content as one string: text parts joined with no separator; "" for no content."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(Request):
    include_usage: bool = False


class Sampling(Request):
    """What chat and text completions share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="extension: 0 = off")
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 64)  # the range torch's manual_seed accepts
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    response_format: dict | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop sequence is at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("response_format", mode="before")
    @classmethod
    def _text_only(cls, v):
        if v is not None and not (isinstance(v, dict) and v.get("type") == "text"):
            raise ValueError('only {"type": "text"} is supported (no JSON mode or JSON schema)')
        return v

    def stops(self) -> list[str]:
        """The stop strings as a new list (a single string becomes one item; [] when none)."""
        return list(self.stop or [])

    def include_usage(self) -> bool:
        """True when a stream should end with a usage chunk (`stream_options.include_usage`)."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs set to true")
        return self

    def token_logprobs(self) -> tuple[int | None, int | None]:
        """(alternatives per generated token, per prompt token): None for no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None, None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("tools are not supported")
        return v

    def limit(self) -> int | None:
        """The completion-token limit asked for: `max_completion_tokens`, else `max_tokens`; None when neither
        is given (the route picks one)."""
        return self.max_completion_tokens or self.max_tokens


PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)  # how many alternatives (legacy: an integer)
    max_tokens: int | None = Field(None, ge=0)  # 0: only with echo (the prompt scored, nothing generated)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        if isinstance(v, str):
            return v
        if not isinstance(v, list) or not v:
            raise ValueError(f"must be {PROMPT_SHAPES} (not empty)")
        if all(isinstance(p, str) for p in v):
            return v
        ids = [v] if all(_is_id(t) for t in v) else v
        if not all(isinstance(p, list) and p and all(_is_id(t) for t in p) for p in ids):
            raise ValueError(f"must be {PROMPT_SHAPES} (token ids: integers ≥ 0; no empty lists)")
        return v

    @model_validator(mode="after")
    def _zero_needs_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is allowed only with echo (to score the prompt)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """`prompt` as a list of prompts, each a string or a list of token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return self.prompt

    def token_logprobs(self) -> tuple[int | None, int | None]:
        """(alternatives per generated token, per prompt token): None for no log-probabilities; prompt tokens
        are scored when `echo` asks for them back with `logprobs`."""
        return self.logprobs, self.logprobs if self.echo else None

    def limit(self) -> int | None:
        """`max_tokens` (0 with echo), or None when not given (the route picks one)."""
        return self.max_tokens


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


class TokenizeRequest(Request):
    """POST /tokenize: `prompt` (special tokens added unless `add_special_tokens` is false), or `messages` rendered
    by the chat template (ending in the assistant header unless `add_generation_prompt` is false)."""

    model: str | None = Field(None, min_length=1)
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give either prompt or messages")
        return self


class DetokenizeRequest(Request):
    model: str | None = Field(None, min_length=1)
    tokens: list[int]

    @field_validator("tokens", mode="before")
    @classmethod
    def _ids(cls, v):
        if not isinstance(v, list) or not all(_is_id(t) for t in v):
            raise ValueError("must be a list of token ids (integers ≥ 0)")
        return v


class ClassifyRequest(Request):
    model: str = Field(min_length=1)
    input: str | list[str]

    def texts(self) -> list[str]:
        """`input` as a list (a single string becomes one text); may be empty, which the route refuses."""
        return [self.input] if isinstance(self.input, str) else self.input


class EntitiesRequest(ClassifyRequest):
    """POST /v1/entities: the same body as /v1/classify."""


class EmbeddingRequest(Request):
    model: str = Field(min_length=1)
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    def texts(self) -> list[str]:
        """`input` as a list (a single string becomes one text); may be empty, which the route refuses."""
        return [self.input] if isinstance(self.input, str) else self.input


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes, model: type[Request]) -> Request:
    """Bytes of a request body -> a validated request, or a 400 `APIError` naming the parameter."""
    try:
        data = json.loads(raw, parse_constant=_no_constants)  # NaN, Infinity: Python's json takes them, JSON has none
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise bad_request("the request body is not valid JSON (UTF-8)") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        param = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p)) or None
        msg = first["msg"].removeprefix("Value error, ")
        if param is None and msg.split(": ", 1)[0] in model.model_fields:  # a check across fields names its field
            param, msg = msg.split(": ", 1)
        raise bad_request(f"{param}: {msg}" if param else msg, param=param) from None


def _is_union_tag(part) -> bool:
    """pydantic names the union member it tried (`str`, `list[TextPart]`) in the location; drop those."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part
                                      or part[:1].isupper())


# ---- responses -----------------------------------------------------------------------------------------
# Field order is the order on the wire. `null` fields that OpenAI sends (`logprobs`, an open `finish_reason`)
# are sent; the fields a class names in `omit_none` are left out when None (a chunk's `usage`, a delta's
# `role`).


class JSONBody(HTTPResponse):
    media_type = "application/json"


class Response(BaseModel):
    """A response body: `body()` for a JSON response, `sse()` for one server-sent event."""

    omit_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        data = handler(self)
        for key in self.omit_none:
            if data.get(key, 0) is None:
                del data[key]
        return data

    def body(self) -> dict:
        """The JSON-ready dict of this response."""
        return self.model_dump(mode="json")

    def response(self, status: int = 200) -> JSONBody:
        """This response as an HTTP JSON response (serialised once, by pydantic)."""
        return JSONBody(self.model_dump_json(), status_code=status)

    def sse(self) -> str:
        """This response as one server-sent event: `data: {json}` and a blank line."""
        return f"data: {self.model_dump_json()}\n\n"


class ErrorDetail(Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Response):
    """OpenAI's error envelope (every 4xx and 5xx, and a failed choice in a stream)."""

    error: ErrorDetail


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        """Usage for `prompt` prompt and `completion` generated tokens."""
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class AssistantMessage(Response):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(Response):
    """A token and its log-probability; `bytes`: its UTF-8 bytes (a token may hold part of a character)."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    """A generated token's log-probability in a chat answer, with the most likely alternatives at its place."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(Response):
    """A chat choice's (or chunk's) `logprobs`: one entry per generated token."""

    content: list[TokenLogprobOut]


class TextLogprobs(Response):
    """A text completion's (or chunk's) `logprobs`, OpenAI's legacy shape: per token its text, log-probability
    (None for the first prompt token), the alternatives (the token itself included) and its character offset in the
    choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ChatChoice(Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class Delta(Response):
    """A stream's increment of the assistant message: the role in the first chunk, then content; {} at the end."""

    omit_none: ClassVar[frozenset[str]] = frozenset({"role", "content"})
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Response):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class TextChoice(Response):
    """A /v1/completions choice, whole or one stream chunk of it."""

    index: int
    text: str
    logprobs: TextLogprobs | None = None
    finish_reason: str | None = None


class Completion(Response):
    """What chat and text completions (whole or a stream chunk) share: the request's id, time and model."""

    omit_none: ClassVar[frozenset[str]] = frozenset({"usage"})
    id: str
    created: int
    model: str


class Grounded(Completion):
    """A knowledge-base model's extra fields (absent for other models): `citations`, the passages backing the
    answer (index as in the prompt, document, heading path, start/end offsets, score: the dense similarity to the
    question or null for a passage BM25 alone found, source); `handoff`, null or
    {"reason": no_relevant_passage | unsupported_answer | model_declined} when the reply is the hand-off message."""

    citations: list[dict] | None = None
    handoff: dict | None = None

    @property
    def omit_none(self) -> frozenset[str]:  # type: ignore[override]
        """`usage` when None; `citations` and `handoff` unless this is a knowledge-base answer (citations given:
        then `handoff` null says it was not handed off)."""
        return frozenset({"usage", "citations", "handoff"} if self.citations is None else {"usage"})


class ChatCompletion(Grounded):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(Grounded):
    """One SSE event of a streamed chat completion; the last, with `stream_options.include_usage`, has usage; a
    knowledge-base model's last content chunk has its citations and hand-off flag."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TextCompletion(Completion):
    """A /v1/completions response, or one SSE event of it (usage: whole responses and a stream's last event)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChoice]
    usage: Usage | None = None


class Tokenized(Response):
    tokens: list[int]
    count: int
    max_model_len: int


class Detokenized(Response):
    prompt: str


class TokenizerInfo(Response):
    """GET /tokenizer_info: the special tokens (None when the tokenizer has none), the chat template, the context."""

    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None
    model_max_length: int


class InputUsage(Response):
    """Usage of an encoder request: only input tokens."""

    prompt_tokens: int
    total_tokens: int


class Classification(Response):
    object: Literal["classification"] = "classification"
    index: int
    label: str
    probabilities: dict[str, float]


class Entity(Response):
    """One entity found in a text: its type, its text and character offsets [start, end), its mean score."""

    type: str
    text: str
    start: int
    end: int
    score: float


class TextEntities(Response):
    object: Literal["entities"] = "entities"
    index: int
    entities: list[Entity]


class Embedding(Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32


class EncoderResults(Response):
    """The answer of /v1/classify, /v1/entities and /v1/embeddings: one item per input text, in order."""

    object: Literal["list"] = "list"
    model: str
    usage: InputUsage
    data: list[Classification] | list[TextEntities] | list[Embedding]


class RecommendRequest(Request):
    """POST /v1/recommend: a `user` of the model's data, and/or a `history` of item ids (oldest first), or
    `history_texts` (items described in words, for a text profile); `k` items; `exclude_seen` drops the history."""

    model: str = Field(min_length=1)
    user: str | None = Field(None, max_length=1000)
    history: list[str] | None = Field(None, max_length=10_000)
    history_texts: list[str] | None = Field(None, max_length=1000)
    k: int = Field(10, ge=1, le=1000)
    exclude_seen: bool = True

    @field_validator("user", mode="before")
    @classmethod
    def _user_id(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("history", mode="before")
    @classmethod
    def _item_ids(cls, v):
        if isinstance(v, list):
            return [str(i) if isinstance(i, int) and not isinstance(i, bool) else i for i in v]
        return v


class RecommendedItem(Response):
    rank: int
    item: str
    title: str
    score: float


class Recommendation(Response):
    """The answer of /v1/recommend: the items best first; `strategy` says what answered (the model, `text-profile`
    or `popularity`), `unknown_items` the history ids the catalogue lacks, `latency_ms` the scoring time."""

    object: Literal["recommendation"] = "recommendation"
    model: str
    data: list[RecommendedItem]
    strategy: str
    user_known: bool
    unknown_items: list[str]
    latency_ms: float


class ModelCard(Response):
    """One served model as /v1/models lists it; `tunelab_kind` says which endpoints answer for it, `tunelab_engine`
    what runs it (pytorch, onnxruntime, llama.cpp), `tunelab_precision` what a PyTorch model computes in (bf16 or
    fp32; None for the other engines), `tunelab_version` which registry version (None: not from a registry)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tunelab"
    tunelab_kind: str
    tunelab_engine: str = "pytorch"
    tunelab_precision: str | None = None
    tunelab_version: str | None = None  # a registry model: NAME:VERSION (12 hex characters) now answering


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Status(Response):
    """/health and /ready: `status`, and the ready server's model ids."""

    omit_none: ClassVar[frozenset[str]] = frozenset({"models"})
    status: str
    models: list[str] | None = None
