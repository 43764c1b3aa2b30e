"""The OpenAI-compatible HTTP API (FastAPI): routes parse, call the service, format.

    POST   /v1/completions            text completion (stream: SSE)
    POST   /v1/chat/completions       chat with the tokenizer's template (stream: SSE)
    GET    /v1/models[/{id}]          base + every adapter of the served base
    GET    /v1/adapters[/{ref}]       registry records          (?kind=&tag=)
    POST   /v1/adapters               upload raw safetensors    (?name=&version=&tag=&description=)
    DELETE /v1/adapters/{ref}         remove a version, or every version of a name
    POST   /v1/fuse                   fuse a mixture into a new registry adapter
    GET    /health, /metrics          liveness; Prometheus text

Every generation response carries ``X-Specfuse-Mixture``: the mixture that served it
(with ``model: "auto"``, the one routing chose for each prompt).

Errors: one handler maps error classes to status codes and an OpenAI error body
``{"error": {"message", "type", "param", "code"}}``; the OpenAPI document lists every
status a route answers. With an API key (as vLLM's ``--api-key``), every ``/v1`` route
and ``/metrics`` need ``Authorization: Bearer KEY``; ``public_reads`` opens the GET routes
(models, adapters, metrics) again; ``/health`` is always open.

Before a route sees a body, :class:`Edge` bounds it: size (413), one framing (not both
Content-Length and chunked), and for JSON bodies depth, digits and valid Unicode
(:mod:`adapters_zoo.jsonsafe`): nothing a client sends can reach a parser that would
turn it into a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_zoo import jsonsafe
from adapters_zoo.errors import (
    AdapterExists,
    AdapterFormatError,
    AdapterNotFound,
    DeltaOutOfBounds,
    IncompatibleAdapter,
    IntegrityError,
    InvalidConfig,
    InvalidMixture,
    InvalidRequest,
    NumericalFailure,
    PayloadTooLarge,
    RegistryError,
    ServerBusy,
    ServiceUnavailable,
    SpecfuseError,
    Unauthorized,
)
from fusion.mixture import mixture_label
from serving.schemas import (
    ChatRequest,
    CompletionRequest,
    ErrorResponse,
    FuseRequest,
    Job,
    chunk_body,
    completion_body,
    error_body,
    new_id,
    usage_chunk,
)
from serving.services import Service

# Most specific first: the first class an error is an instance of decides.
ERROR_STATUS: list[tuple[type[Exception], int, str, str]] = [
    (PayloadTooLarge, 413, "invalid_request_error", "payload_too_large"),
    (InvalidRequest, 400, "invalid_request_error", "invalid_value"),
    (jsonsafe.BadJSON, 400, "invalid_request_error", "invalid_json"),
    (DeltaOutOfBounds, 400, "invalid_request_error", "delta_out_of_bounds"),
    (NumericalFailure, 500, "server_error", "numerical_error"),
    (InvalidMixture, 400, "invalid_request_error", "invalid_mixture"),
    (AdapterNotFound, 404, "invalid_request_error", "model_not_found"),
    (Unauthorized, 401, "authentication_error", "invalid_api_key"),
    (ServerBusy, 429, "rate_limit_error", "queue_full"),
    (ServiceUnavailable, 503, "server_error", "unavailable"),
    (AdapterExists, 409, "invalid_request_error", "adapter_exists"),
    (IntegrityError, 500, "server_error", "integrity_error"),
    (IncompatibleAdapter, 400, "invalid_request_error", "incompatible_adapter"),
    (AdapterFormatError, 400, "invalid_request_error", "invalid_adapter"),
    (InvalidConfig, 400, "invalid_request_error", "invalid_value"),
    (RegistryError, 400, "invalid_request_error", "registry_error"),
    (SpecfuseError, 400, "invalid_request_error", None),
]


def error_response(exc: Exception) -> JSONResponse:
    """The one place an exception becomes a status code and an OpenAI error body."""
    if isinstance(exc, RequestValidationError):
        errors = exc.errors()
        not_json = [e for e in errors if e.get("type") == "json_invalid"
                    or (tuple(e.get("loc", ())) == ("body",) and e.get("type") == "model_attributes_type")]
        if not_json:
            return JSONResponse(error_body("the body is not a valid JSON object", "invalid_request_error", None,
                                           "invalid_json"), 400)
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                            for e in errors[:5])
        return JSONResponse(error_body(message, "invalid_request_error", ".".join(loc) or None,
                                       "invalid_schema"), 422)
    if isinstance(exc, StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, None), exc.status_code)
    for cls, status, err_type, code in ERROR_STATUS:
        if isinstance(exc, cls):
            headers = {"Retry-After": "1"} if status in (429, 503) else None
            return JSONResponse(error_body(str(exc), err_type, getattr(exc, "param", None), code), status,
                                headers=headers)
    return JSONResponse(error_body(f"internal error ({type(exc).__name__})", "server_error", None, None), 500)


class Edge:
    """ASGI middleware: body bounds (size, framing, JSON depth / digits / Unicode) before anything parses; metrics."""

    def __init__(self, app, service: Service):
        self.app = app
        self.service = service

    @staticmethod
    def _is_upload(scope) -> bool:
        return scope["method"] == "POST" and scope["path"] == "/v1/adapters"  # raw safetensors, not JSON

    def _limit(self, scope) -> int:
        limits = self.service.limits
        return limits.max_upload_bytes if self._is_upload(scope) else limits.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status: dict[str, Any] = {}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            receive = await self._bounded_body(scope, receive)
        except (InvalidRequest, jsonsafe.BadJSON) as err:
            await error_response(err)(scope, receive, send_status)
        else:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            metrics = self.service.metrics
            metrics.requests.inc(endpoint=endpoint, status=str(status.get("code", 499)))
            metrics.latency.observe(time.perf_counter() - start, endpoint=endpoint)

    async def _bounded_body(self, scope, receive):
        """Read the whole body (at most the limit), check it, then replay it; disconnects still get through."""
        limit = self._limit(scope)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and b"transfer-encoding" in headers:  # request smuggling's raw material
            raise InvalidRequest("a request may carry Content-Length or Transfer-Encoding, not both")
        if declared is not None and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
            raise PayloadTooLarge(f"the body is {declared[:20].decode()} bytes, at most {limit} are accepted")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                pending = message
                break
            size += len(message.get("body", b""))
            if size > limit:
                raise PayloadTooLarge(f"the body is over {limit} bytes")
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                pending = None
                break
        body = b"".join(chunks)
        if body and not self._is_upload(scope):
            jsonsafe.loads(body, what="the body")  # depth, digits, lone surrogates: a 400 here, never a 500
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return pending if pending is not None else await receive()

        return replay


ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 413, 422, 429, 503)}
GENERATED = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                   "description": "a completion, or its server-sent events when stream is true"}}


def create_app(service: Service, api_key: str | None = None, public_reads: bool = False) -> FastAPI:
    """The app; with ``api_key`` every /v1 route and /metrics need it (GETs too unless ``public_reads``)."""

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise Unauthorized("a valid 'Authorization: Bearer <key>' header is required")

    guarded = [Depends(require_key)]
    read = [] if public_reads else guarded

    def errors(*statuses: int) -> dict:
        codes = {400, 413, 422} | ({401} if api_key else set()) | set(statuses)
        return {code: ERRORS[code] for code in sorted(codes)}

    app = FastAPI(title="specfuse", version="0.1.0", docs_url=None, redoc_url=None)
    for exc_class in (Exception, SpecfuseError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(exc_class, lambda request, exc: error_response(exc))
    app.add_middleware(Edge, service=service)
    app.state.service = service

    @app.post("/v1/completions", dependencies=guarded, responses={**GENERATED, **errors(404, 429, 503)})
    async def completions(body: CompletionRequest, request: Request):
        return await _generate(service, body.to_job(service.limits.default_completion_tokens), request)

    @app.post("/v1/chat/completions", dependencies=guarded, responses={**GENERATED, **errors(404, 429, 503)})
    async def chat_completions(body: ChatRequest, request: Request):
        return await _generate(service, body.to_job(service.limits.default_chat_tokens), request)

    @app.get("/v1/models", dependencies=read, responses=errors())
    async def models():
        return {"object": "list", "data": await run_in_threadpool(service.admin.models)}

    @app.get("/v1/models/{model_id}", dependencies=read, responses=errors(404))
    async def model(model_id: str):
        return await run_in_threadpool(service.admin.model, model_id)

    @app.get("/v1/adapters", dependencies=read, responses=errors())
    async def list_adapters(kind: str | None = None, tag: str | None = None):
        return {"object": "list", "data": await run_in_threadpool(service.admin.adapters, kind, tag)}

    @app.get("/v1/adapters/{ref}", dependencies=read, responses=errors(404))
    async def show_adapter(ref: str):
        return await run_in_threadpool(service.admin.adapter, ref)

    @app.post("/v1/adapters", dependencies=guarded, status_code=201, responses=errors(404, 409))
    async def upload_adapter(request: Request, name: str, version: str | None = None,
                             tag: list[str] = Query(default=[]), description: str = ""):
        data = await request.body()
        return await run_in_threadpool(service.admin.upload, data, name, version, tag, description)

    @app.delete("/v1/adapters/{ref}", dependencies=guarded, responses=errors(404))
    async def delete_adapter(ref: str):
        return {"deleted": await run_in_threadpool(service.admin.remove, ref)}

    @app.post("/v1/fuse", dependencies=guarded, status_code=201, responses=errors(404, 409))
    async def fuse(body: FuseRequest):
        return await run_in_threadpool(service.admin.fuse, body.mixture, body.method, body.params, body.project,
                                       body.name, body.version, body.tags, body.description)

    @app.get("/health", responses={503: {"description": "the engine is stopped"}})
    async def health():
        info = service.health()
        return JSONResponse(info, status_code=200 if info["status"] == "ok" else 503)

    @app.get("/metrics", dependencies=read, response_class=PlainTextResponse, responses=errors())
    async def metrics():
        return PlainTextResponse(service.metrics.render(), media_type=PROMETHEUS_TEXT)

    return app


PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"  # the Prometheus text exposition format


async def _generate(service: Service, job: Job, request: Request):
    prompts, mixture = await run_in_threadpool(service.prepare, job)
    generation = service.start(prompts, job.params, job.n, mixture)  # ServerBusy here: a 429, not a broken stream
    rid = new_id(job.endpoint)
    headers = {MIXTURE_HEADER: mixture_header(mixture)}
    if job.stream:
        return StreamingResponse(_sse(generation, rid, job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **headers})
    count = len(prompts) * job.n
    texts, reasons = [""] * count, ["stop"] * count
    prompt_tokens = completion_tokens = 0
    try:
        async for index, event in generation.events(request.is_disconnected):
            if event.kind == "error":
                raise event.error or ServiceUnavailable("generation failed")
            texts[index] += event.text
            if event.kind == "done":
                reasons[index] = event.finish_reason
                prompt_tokens += event.prompt_tokens
                completion_tokens += event.completion_tokens
    finally:
        generation.cancel()
    choices = list(zip(texts, reasons))
    return JSONResponse(completion_body(rid, job.endpoint, job.model, choices, prompt_tokens, completion_tokens),
                        headers=headers)


MIXTURE_HEADER = "X-Specfuse-Mixture"
MAX_HEADER_CHARS = 2048


def mixture_header(mixture) -> str:
    """What served the request: ``base``, ``name@version:weight,…``; per prompt, ``;``-separated, for auto."""
    mixtures = mixture if isinstance(mixture, list) else [mixture]
    text = ";".join(mixture_label(m) for m in mixtures)
    return text if len(text) <= MAX_HEADER_CHARS else text[: MAX_HEADER_CHARS - 3] + "..."


async def _sse(generation, rid: str, job: Job):
    def data(obj: dict) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    prompt_tokens = completion_tokens = 0
    try:
        if job.endpoint == "chat":
            for index in range(generation.count):
                yield data(chunk_body(rid, job.endpoint, job.model, index, "", None, role=True))
        async for index, event in generation.events():
            if event.kind == "error":
                yield data(json.loads(error_response(event.error or ServiceUnavailable("failed")).body))
                return
            if event.text:
                yield data(chunk_body(rid, job.endpoint, job.model, index, event.text, None))
            if event.kind == "done":
                prompt_tokens += event.prompt_tokens
                completion_tokens += event.completion_tokens
                yield data(chunk_body(rid, job.endpoint, job.model, index, None, event.finish_reason))
        if job.include_usage:
            yield data(usage_chunk(rid, job.endpoint, job.model, prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
    except asyncio.CancelledError:
        generation.cancel()
        raise
    finally:
        generation.cancel()
