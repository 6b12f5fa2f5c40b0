"""The FastAPI application: OpenAI's chat and completions endpoints over one guarded engine (`Engine`).

`build_app(config, make_llm)` returns the app. The model loads on a thread once the server is
up (so `/health` answers 503 meanwhile), is warmed up (both compiled steps and the
classifier), and is then driven by its `AsyncEngine`. A request is checked against the
operator's limits, then templated, tokenized and given its guard here (the templating on a
worker thread), so a bad one is answered at once and nothing of it reaches the engine; a good
one is added to the engine and its events become the response (or the server-sent events of a
stream). Only text the guard released leaves this module. If the engine dies, `watch_engine`
stops the server; a failed write to a required audit log stops every guarded answer.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import uuid
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from oc_engine.async_llm import EngineDead
from oc_engine.engine.interface import AsyncEngine, Engine
from oc_engine.errors import OcEngineError
from oc_engine.outputs import Finished, Refused, TextReleased, refusal_piece
from oc_engine.server.audit import AuditLog
from oc_engine.server.config import ServerConfig
from oc_engine.server.console import SETTINGS_PATH as CONSOLE_SETTINGS
from oc_engine.server.console import add_console
from oc_engine.server.guard_policy import GuardOverrideRefused, request_guard
from oc_engine.server.metrics import CONTENT_TYPE, ServerMetrics
from oc_engine.server.protocol import ChatCompletionRequest, CompletionRequest
from oc_engine.server.responses import ResponseBuilder, event_json, finish_reason, guard_json

log = logging.getLogger("oc_engine.server")


class APIError(Exception):
    """An OpenAI-style error response."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
             503: "service_unavailable"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class ServerState:
    """What the routes share: the engine once it is ready, the metrics and the audit log."""

    def __init__(self, config: ServerConfig, make_llm: Callable[[], Engine]):
        self.config, self.make_llm = config, make_llm
        self.metrics = ServerMetrics(config.model_name)
        self.audit = AuditLog(config.audit_log, max_bytes=config.audit_max_bytes, backups=config.audit_backups) \
            if config.audit_log else None
        self.llm: Engine | None = None
        self.engine: AsyncEngine | None = None
        self.ready = threading.Event()
        self.stopping = False
        self.load_error: str | None = None
        self.fatal: str | None = None  # why the engine stopped while serving: the process exits non-zero
        self.on_fatal: Callable[[], None] = lambda: None  # set by the runner: stop the server
        self.exiting: Callable[[], bool] = lambda: False  # set by the runner: a signal asked it to stop

    def load(self) -> None:
        """Load, warm up and start the engine (on a thread: the server answers meanwhile)."""
        try:
            llm = self.llm = self.make_llm()
            llm.warm_up()
            if self.stopping:
                return  # the server stopped while the model loaded
            observers = (self.metrics.observe,) + ((self.audit.observe,) if self.audit else ())
            self.engine = llm.async_engine(observers)
            self.engine.start()
            self.metrics.track(self.engine)
            self.ready.set()
            log.info("ready: %s", self.config.model_name)
        except BaseException as exc:  # noqa: BLE001 - the server cannot serve: say why and stop
            self.load_error = str(exc) if isinstance(exc, OcEngineError) else f"{type(exc).__name__}: {exc}"
            log.error("the model could not be loaded: %s", self.load_error)
            self.on_fatal()

    def close(self) -> None:
        self.stopping = True
        if self.engine is not None:
            self.engine.shutdown()
        if self.llm is not None:
            self.llm.close()
        if self.audit is not None:
            self.audit.close()

    def unavailable(self) -> str | None:
        """Why no request can be served now, or None (for /health and every request)."""
        if self.fatal is not None:
            return self.fatal
        if self.audit_failed():
            return f"the audit log cannot be written ({self.audit.failed}) and --audit-required is set"
        if self.stopping or self.exiting():
            return "the server is shutting down"
        if not self.ready.is_set() or self.engine is None:
            return self.load_error or "the model is still loading"
        if not self.engine.alive:
            return f"the engine stopped: {self.engine.error!r}"
        return None

    def audit_failed(self) -> bool:
        """A write to the audit log failed and the operator requires it: guarded text stops."""
        return self.config.audit_required and self.audit is not None and self.audit.failed is not None

    async def watch_engine(self, every_s: float = 0.2) -> None:
        """A dead engine thread stops the server (and the process exits non-zero), so that a
        supervisor restarts it instead of a server that answers 503 forever. The requests in
        flight got the error from the engine itself."""
        while True:
            await asyncio.sleep(every_s)
            engine = self.engine
            if engine is not None and not engine.alive and not self.stopping and not self.exiting():
                self.fatal = f"the engine stopped: {engine.error!r}"
                log.error("%s; the server stops", self.fatal)
                self.on_fatal()
                return

    def engine_or_503(self) -> AsyncEngine:
        reason = self.unavailable()
        if reason is not None:
            raise APIError(503, reason)
        return self.engine


class RequestLimits:
    """ASGI middleware: past `limit_concurrency` requests in progress (a stream counts until it
    ends; /health and /metrics neither count nor are refused) a new one gets a 503 in OpenAI's format at once, before any work (uvicorn's own limit
    answers plain text). It is counted, not audited: it is refused before its key is read, and
    a flood of them must not fill the disk. A body sent without a Content-Length (chunked) is
    counted as it is read: past `max_body_bytes` reading it fails with a 413 (a Content-Length
    over it is refused sooner, in `request_ids`)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        self.max_bytes, self.max_open = state.config.max_body_bytes, state.config.limit_concurrency
        self.open = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in ("/health", "/metrics"):
            return await self.app(scope, receive, send)  # a busy server is still a healthy one
        if self.open >= self.max_open:
            error = APIError(503, f"the server has {self.open} requests in progress (its --limit-concurrency); "
                                  "retry later", code="too_many_requests_in_progress")
            self.state.metrics.rejected(error.status)
            return await JSONResponse(error.body(), status_code=503)(scope, receive, send)
        self.open += 1
        try:
            await self._app_counting_body(scope, receive, send)
        finally:
            self.open -= 1

    async def _app_counting_body(self, scope, receive, send):
        read = 0

        async def counted():
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_bytes:
                    raise StarletteHTTPException(413, f"the request body is over {self.max_bytes} bytes "
                                                      "(this server's --max-body-bytes)")
            return message
        return await self.app(scope, counted, send)


def build_app(config: ServerConfig, make_llm: Callable[[], Engine]) -> FastAPI:
    state = ServerState(config, make_llm)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, name="oc-engine-load", daemon=True).start()
        watchers = [asyncio.ensure_future(state.watch_engine()), asyncio.ensure_future(state.metrics.watch_loop())]
        try:
            yield
        finally:
            for watcher in watchers:
                watcher.cancel()
            await asyncio.to_thread(state.close)

    # No /docs, /redoc or /openapi.json: an unauthenticated map of the API is no use to a client
    # of OpenAI's and a help to a scanner (docs/serve.md documents the routes).
    app = FastAPI(title="oc-engine", summary="Guarded, OpenAI-compatible generation", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.oc = state
    app.add_middleware(RequestLimits, state=state)

    @app.middleware("http")
    async def request_ids(request: Request, call_next):
        prefix = {"/v1/chat/completions": "chatcmpl-", "/v1/completions": "cmpl-"}.get(request.url.path, "req-")
        request.state.request_id = prefix + uuid.uuid4().hex
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            return _error_response(request, APIError(413, f"the request body is over {config.max_body_bytes} "
                                                          "bytes (this server's --max-body-bytes)",
                                                     code="request_too_large"))
        path = request.url.path
        guarded_path = path.startswith("/v1/") or path == CONSOLE_SETTINGS or (path == "/metrics"
                                                                                and not config.metrics_public)
        if guarded_path and config.api_key is not None:
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), config.api_key.encode()):
                return _error_response(request, APIError(401, "missing or invalid API key (Authorization: "
                                                              "Bearer <key>)", code="invalid_api_key"))
        response = await call_next(request)
        response.headers["x-request-id"] = request.state.request_id
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error_response(request, APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error_response(request, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        """A bug, not the request's fault: OpenAI's format, audited; the traceback goes to the log
        (Starlette logs it after this answer), never to the client."""
        log.error("request %s failed", getattr(request.state, "request_id", "?"), exc_info=exc)
        return _error_response(request, APIError(500, "internal server error; the server log has the details "
                                                      f"under this request's id ({type(exc).__name__})"))

    @app.get("/health")
    async def health():
        reason = state.unavailable()
        if reason is not None:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "oc-engine"}]}

    if config.console:
        add_console(app, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _serve(state, request, body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _serve(state, request, body, chat=False)

    return app


# -- one request ------------------------------------------------------------------------
async def _serve(state: ServerState, request: Request, body, chat: bool):
    engine = state.engine_or_503()
    config, llm, rid = state.config, state.llm, request.state.request_id
    if body.model is not None and body.model != config.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {config.model_name!r}",
                       param="model", code="model_not_found")
    unsupported = body.unsupported()
    if unsupported:
        raise APIError(400, f"{unsupported}: not supported by oc-engine", param=unsupported, code="unsupported")
    _check_limits(config, body, chat)

    trace = _wants_trace(config, body)

    def prepare():
        prompt = body.conversation() if chat else _completion_prompt(llm, body.single_prompt())
        guard = request_guard(llm.guard_config, body.oc_engine, stream=body.stream,
                              has_classifier=llm.classifier is not None, allow_override=config.allow_guard_override)
        params = body.sampling_params(asked if asked is not None else config.max_tokens_limit or llm.max_model_len)
        return llm.prepare_request(prompt, params, request_id=rid, stream=body.stream, guard=guard, trace=trace)

    asked = body.requested_tokens()
    try:
        # Templating and tokenization take seconds for a long prompt: off the event loop, so
        # /health and every other request are answered meanwhile.
        seq = await asyncio.to_thread(prepare)
    except GuardOverrideRefused as exc:
        raise APIError(403, str(exc), param="oc_engine", code="guard_override_not_allowed") from None
    except OcEngineError as exc:
        raise APIError(400, str(exc)) from None
    room = llm.max_model_len - len(seq.prompt_ids)
    if asked is not None and asked > room:
        raise APIError(400, f"this model's maximum context length is {llm.max_model_len} tokens; the prompt has "
                            f"{len(seq.prompt_ids)} and max_tokens asks for {asked} more", param="max_tokens",
                       code="context_length_exceeded")
    if engine.outstanding >= llm.capacity + config.max_waiting:
        raise APIError(429, f"the server is at capacity ({engine.outstanding} requests running or waiting); "
                            "retry later", code="queue_full")
    builder = ResponseBuilder(rid, config.model_name, chat, details=config.guard_details)
    try:
        handle = engine.add(seq)
    except EngineDead as exc:  # it stopped since `engine_or_503`
        raise APIError(503, str(exc)) from None
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_sse(state, handle, builder, include_usage), media_type="text/event-stream",
                                 headers={"x-request-id": rid, "cache-control": "no-cache"})
    completion = await _until_finished(engine, handle, request)
    if completion is None:  # the client left; its request was cancelled
        return Response(status_code=499)
    _check_audit(state, handle.seq)
    return JSONResponse(builder.full(completion))


def _wants_trace(config: ServerConfig, body) -> bool:
    """`oc_engine.trace`: the probe's score per token in a stream's chunks, a guard detail."""
    if body.oc_engine is None or not body.oc_engine.trace:
        return False
    if not config.guard_details:
        raise APIError(403, "oc_engine.trace: this server does not send the guard's details; start it with "
                            "--guard-details to allow that", param="oc_engine", code="guard_details_not_allowed")
    if not body.stream:
        raise APIError(400, "oc_engine.trace: only a streamed request (stream: true) gets a trace", param="oc_engine")
    return True


def _check_audit(state: ServerState, seq) -> None:
    """Fail closed on the audit log: no guarded text leaves once a required write has failed
    (the observer that failed ran before this request's events reached its handler)."""
    if seq.guard is not None and state.audit_failed():
        raise APIError(503, state.unavailable() or "the audit log cannot be written", code="audit_unavailable")


def _check_limits(config: ServerConfig, body, chat: bool) -> None:
    """The operator's limits on what a request may ask, checked before any work on it."""
    texts = [m.text() for m in body.messages] if chat else \
        ([body.prompt] if isinstance(body.prompt, str) else [p for p in body.prompt if isinstance(p, str)])
    if chat and len(body.messages) > config.max_messages:
        raise APIError(400, f"messages: at most {config.max_messages}, got {len(body.messages)}", param="messages",
                       code="too_many_messages")
    if not chat and isinstance(body.prompt, list) and len(body.prompt) > config.max_message_chars:
        raise APIError(400, f"prompt: at most {config.max_message_chars} token ids", param="prompt",
                       code="prompt_too_long")
    longest = max((len(t) for t in texts), default=0)
    if longest > config.max_message_chars:
        raise APIError(400, f"{'a message' if chat else 'the prompt'} has {longest} characters, over "
                            f"{config.max_message_chars}", param="messages" if chat else "prompt",
                       code="message_too_long")
    asked = body.requested_tokens()
    if config.max_tokens_limit is not None and asked is not None and asked > config.max_tokens_limit:
        raise APIError(400, f"max_tokens: at most {config.max_tokens_limit} on this server, got {asked}",
                       param="max_tokens", code="max_tokens_too_large")
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(len(stop) > config.max_stop_chars for stop in stops):
        raise APIError(400, f"stop: a stop sequence may have at most {config.max_stop_chars} characters",
                       param="stop", code="stop_too_long")


def _completion_prompt(llm, prompt: str | list[int]) -> list[int]:
    """The legacy endpoint takes raw text, never the chat template: its token ids."""
    if isinstance(prompt, str):
        return list(llm.tokenizer(prompt)["input_ids"])
    vocab = min(len(llm.tokenizer), llm.vocab_size)  # an id past the embedding would crash the step
    if any(not 0 <= t < vocab for t in prompt):
        raise OcEngineError(f"prompt: token ids must be in [0, {vocab})")
    return prompt


async def _until_finished(engine: AsyncEngine, handle, request: Request):
    """The completion, or None if the client disconnected first (then the request is cancelled)."""
    async def collect():
        async for events in engine.events(handle):
            for event in events:
                if isinstance(event, Finished):
                    return event.completion

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    result, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            result.cancel()  # leaving `events` cancels the request in the engine
            await asyncio.gather(result, return_exceptions=True)
    if result.cancelled():
        return None
    try:
        return result.result()
    except EngineDead as exc:
        raise APIError(503, str(exc)) from None


async def _sse(state: ServerState, handle, builder: ResponseBuilder, include_usage: bool):
    """Server-sent events: text chunks as the guard releases text, a chunk per pause and verdict
    (`oc_engine`, no text; with the guard's details only), the refusal as the last content of a
    blocked answer, the finish chunk (with the guard's report), the usage if asked, then [DONE]."""
    def data(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    yield data(builder.chunk("", include_usage=include_usage))
    shown = ""
    try:
        async for events in state.engine.events(handle):
            _check_audit(state, handle.seq)
            text = ""
            for event in events:
                if isinstance(event, (TextReleased, Refused)):
                    piece = event.text if isinstance(event, TextReleased) else refusal_piece(shown + text, event.text)
                    text += piece
                    continue
                shown += text
                if text:
                    yield data(builder.chunk(text, include_usage=include_usage))
                    text = ""
                if isinstance(event, Finished):
                    completion = event.completion
                    yield data(builder.chunk(finish=finish_reason(completion), include_usage=include_usage,
                                             oc_engine=guard_json(completion, builder.details)))
                    if include_usage:
                        yield data(builder.usage_chunk(completion))
                elif builder.details and (detail := event_json(event)) is not None:
                    yield data(builder.chunk(include_usage=include_usage, oc_engine=detail))
            if text:
                shown += text
                yield data(builder.chunk(text, include_usage=include_usage))
    except (EngineDead, APIError) as exc:  # the headers are sent: the error is the stream's last chunk
        error = exc if isinstance(exc, APIError) else APIError(503, str(exc))
        state.metrics.rejected(error.status)
        if state.audit is not None:
            state.audit.error(builder.id, error.status, error.message)
        yield data(error.body())
    yield "data: [DONE]\n\n"


def _error_response(request: Request, exc: APIError) -> JSONResponse:
    state: ServerState = request.app.state.oc
    request_id = getattr(request.state, "request_id", None) or "req-" + uuid.uuid4().hex
    state.metrics.rejected(exc.status)
    # Requests without a valid key are counted (above), not logged: else anyone could fill the disk.
    if state.audit is not None and request.url.path.startswith("/v1/") and exc.status != 401:
        state.audit.error(request_id, exc.status, exc.message)
    return JSONResponse(exc.body(), status_code=exc.status, headers={"x-request-id": request_id})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line for the first problem, naming the field (OpenAI's `param`)."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if first.get("type") == "extra_forbidden":
        return f"unrecognized request argument supplied: {field}", field
    if field == "n":
        return "n: only n=1 is supported (one choice per request)", "n"
    if field and field.startswith("messages") and len(errors) > 1 and loc[-1] in ("str", "list[TextPart]"):
        field = ".".join(loc[:-1])  # a union's branch names say nothing to a client
        return f"{field}: content must be a string or a list of text parts", field
    return f"{field}: {first.get('msg', 'invalid')}" if field else first.get("msg", "invalid request body"), field
