"""Request bodies at the HTTP edge (pydantic), and the OpenAI-shaped response bodies.

Unknown fields are rejected (``extra="forbid"``: a typo is a 422, never silently
ignored) and nothing is coerced (``strict``: ``"max_tokens": "10"`` or ``"stream": "yes"``
is a 422, not 10 or true; an integer is still a valid float). OpenAI fields this server
accepts but does not implement take only their neutral value (``echo=false``,
``logprobs=null``, penalties 0, ...): anything else is a 400 naming the field. Inside,
requests become plain dataclasses (``to_job``) so the services never see pydantic.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters_zoo.errors import InvalidRequest
from serving.generation import SamplingParams
from serving.preparation import Job

MAX_PROMPTS = 32  # prompts in one completion request
MAX_N = 8  # choices per prompt
MIN_TEMPERATURE = 1e-3  # below it (but not 0) logits / T overflows to inf: ask for 0, greedy, instead


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorDetail(_Strict):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Strict):
    """Every 4xx/5xx body: OpenAI's error shape."""

    error: ErrorDetail


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    """Fields both endpoints share (OpenAI's plus the mixture extras)."""

    model: str = Field(max_length=16384)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None  # accepted, unused
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # specfuse: the mixture as a weight map, and how to fuse it
    adapters: dict[str, Any] | str | None = Field(default=None, description="{name: weight}, or 'auto' / "
                                                   "{'auto': {routing options}} (serving.routing)")
    fusion_method: str | None = Field(default=None, min_length=1, max_length=64)
    fusion_params: dict[str, Any] | None = None
    ignore_eos: bool = False  # vLLM's extra: generate max_tokens tokens regardless of eos

    def _check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise InvalidRequest(f"{name} is not supported (only 0)", param=name)
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported", param="logit_bias")
        if self.temperature is not None and 0 < self.temperature < MIN_TEMPERATURE:
            raise InvalidRequest(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got "
                                 f"{self.temperature:g}", param="temperature")
        if not 1 <= self.n <= MAX_N:
            raise InvalidRequest(f"n must be in [1, {MAX_N}], got {self.n}", param="n")

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def to_job(self, default_max_tokens: int = 16) -> Job:
        self._check_unsupported()
        if self.echo:
            raise InvalidRequest("echo is not supported", param="echo")
        if self.logprobs is not None:
            raise InvalidRequest("logprobs are not supported", param="logprobs")
        if self.best_of not in (None, 1):
            raise InvalidRequest("best_of is not supported", param="best_of")
        if self.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix")
        p = self.prompt
        prompts: list[str | list[int]]
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = list(p)
        if not prompts or any(len(q) == 0 for q in prompts):
            raise InvalidRequest("prompt is empty: give text or token ids", param="prompt")
        if len(prompts) > MAX_PROMPTS:
            raise InvalidRequest(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt")
        return Job("completion", self.model, prompts, None, self.sampling(default_max_tokens), self.n, self.stream,
                   bool(self.stream_options and self.stream_options.include_usage), self.adapters,
                   self.fusion_method, self.fusion_params)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None

    def to_job(self, default_max_tokens: int = 256) -> Job:
        self._check_unsupported()
        if self.logprobs or self.top_logprobs:
            raise InvalidRequest("logprobs are not supported", param="logprobs")
        if self.response_format and self.response_format.get("type") != "text":
            raise InvalidRequest("only response_format type 'text' is supported", param="response_format")
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        messages = [{"role": m.role, "content": m.text()} for m in self.messages]
        return Job("chat", self.model, [], messages, self.sampling(default_max_tokens), self.n, self.stream,
                   bool(self.stream_options and self.stream_options.include_usage), self.adapters,
                   self.fusion_method, self.fusion_params)


class FuseRequest(_Strict):
    mixture: str | dict[str, Any] = Field(description="'a:0.7,b:0.3' or {'a': 0.7, 'b': 0.3}")
    method: str = Field(default="linear", min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)
    project: bool = False
    name: str
    version: str | None = None
    tags: list[str] = Field(default_factory=list, max_length=32)
    description: str = ""


# --------------------------------------------------------------------------- responses


def new_id(endpoint: str) -> str:
    return ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, endpoint: str, model: str, choices: list[tuple[str, str]],
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """``choices``: (text, finish_reason) in choice order."""
    if endpoint == "chat":
        items = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                  "logprobs": None} for i, (text, reason) in enumerate(choices)]
        kind = "chat.completion"
    else:
        items = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                 for i, (text, reason) in enumerate(choices)]
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": items,
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(rid: str, endpoint: str, model: str, index: int, text: str | None, finish_reason: str | None,
               role: bool = False) -> dict[str, Any]:
    if endpoint == "chat":
        delta: dict[str, str] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(rid: str, endpoint: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    kind = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def error_body(message: str, err_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}
