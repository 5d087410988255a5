"""The HTTP layer: OpenAI's completions and chat completions (streamed as server-sent events), models,
health, Prometheus metrics and the chat page, on Starlette. It parses and checks requests, renders
prompts and text; the scheduler (`scheduler.py`) owns the model.

Errors are OpenAI's JSON shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status for
anything the client can fix. Extensions to OpenAI's request body (llama.cpp's and vLLM's names):
`cache_prompt` (false: neither reuse nor store prefixes for this request), `return_token_ids` (the
prompt's and the answer's token ids in each choice) and `ignore_eos` (generate `max_tokens` tokens).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from quintet.chat import ROLES
from quintet.serve.metrics import Metrics
from quintet.serve.prompts import ChatRenderer, TextStream
from quintet.serve.scheduler import DoneEvent, QueueFull, Request, Sampling, Scheduler, TokenEvent
from quintet.tokenizer import TextTokenizer

STATIC = Path(__file__).parent / "static"
MAX_STOPS = 4
MAX_LOGPROBS = 5
DRAIN_LIMIT = 64 * 2**20  # a body larger than this is not even read to the end


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, **kw):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = kw.get("type") or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = kw.get("headers")


def error_response(err: APIError) -> JSONResponse:
    body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


@dataclass
class ServeState:
    """What the handlers share: the model's name, tokenizer and scheduler, and the server's limits."""

    model_id: str
    tokenizer: TextTokenizer
    scheduler: Scheduler
    metrics: Metrics
    max_context: int
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    default_max_tokens: int = 512

    def __post_init__(self) -> None:
        self.chat = ChatRenderer(self.tokenizer)
        self.created = int(time.time())


# ------------------------------------------------------------------------------------------------ parsing
_MISSING = object()


def _get(body: dict, name: str, kinds: tuple, default=_MISSING, what: str = ""):
    value = body.get(name, default)
    if value is _MISSING:
        raise APIError(400, f"'{name}' is required", param=name, code="missing_required_parameter")
    if value is None or value is default:
        return value
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = what or " or ".join(k.__name__ for k in kinds)
        raise APIError(400, f"'{name}' = {value!r}: expected {names}", param=name, code="invalid_type")
    return value


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = _get(body, name, (int, float), default, "a number")
    value = default if value is None else float(value)
    if value < lo or value > hi or (lo_open and value == lo):
        side = "(" if lo_open else "["
        raise APIError(400, f"'{name}' = {value!r}: must be in {side}{lo:g}, {hi:g}]", param=name)
    return value


def _sampling(body: dict, prompt_len: int, state: ServeState, max_tokens_names: tuple[str, ...]) -> Sampling:
    n = _get(body, "n", (int,), 1)
    if n not in (None, 1):
        raise APIError(400, f"'n' = {n!r}: only n = 1 is supported", param="n")
    room = state.max_context - prompt_len
    if room < 1:
        raise APIError(
            400,
            f"the prompt is {prompt_len} tokens: the context is {state.max_context} tokens (--max-context), "
            "with room for at least one new token",
            param="messages" if "messages" in body else "prompt",
            code="context_length_exceeded",
        )
    max_tokens = None
    for name in max_tokens_names:
        value = _get(body, name, (int,), None, "an integer")
        if value is not None:
            if value < 1:
                raise APIError(400, f"'{name}' = {value}: must be at least 1", param=name)
            if value > room:
                raise APIError(
                    400,
                    f"'{name}' = {value}: the prompt ({prompt_len} tokens) plus {value} new tokens exceed "
                    f"the context of {state.max_context} tokens; at most {room}",
                    param=name,
                    code="context_length_exceeded",
                )
            max_tokens = value
            break
    if max_tokens is None:
        max_tokens = min(room, 16 if "prompt" in body else state.default_max_tokens)
    seed = _get(body, "seed", (int,), None, "an integer")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=seed,
    )


def _stops(body: dict) -> list[str]:
    stop = _get(body, "stop", (str, list), None, "a string or a list of strings")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
        raise APIError(400, f"'stop': at most {MAX_STOPS} strings", param="stop")
    return stops


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = bool(_get(body, "stream", (bool,), False, "a boolean"))
    options = _get(body, "stream_options", (dict,), None, "an object") or {}
    usage = _get(options, "include_usage", (bool,), False, "a boolean")
    return stream, bool(usage)


def _completion_prompt(body: dict, state: ServeState) -> list[int]:
    prompt = _get(body, "prompt", (str, list), what="a string, a list of token ids or a list of one string")
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        elif prompt and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise APIError(
                400, "'prompt': one prompt per request (a string or a list of token ids)", "prompt"
            )
    if isinstance(prompt, str):
        ids = state.tokenizer.encode(prompt)
    else:
        vocab = state.tokenizer.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt):
            raise APIError(400, f"'prompt': token ids must be integers in [0, {vocab})", param="prompt")
        ids = list(prompt)
    if not ids:
        raise APIError(400, "'prompt' is empty: give at least one token", param="prompt")
    return ids


def _messages(body: dict) -> list[dict[str, str]]:
    messages = _get(body, "messages", (list,), what="a list of messages")
    if not messages:
        raise APIError(400, "'messages' is empty: give at least one message", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(
                400, f"'messages[{i}]': expected an object with role and content", f"messages[{i}]"
            )
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise APIError(
                400, f"'messages[{i}].role' = {role!r}: one of {', '.join(ROLES)}", f"messages[{i}]"
            )
        if isinstance(content, list):  # OpenAI's content parts: text only
            parts = [
                p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content
            ]
            if None in parts or not all(isinstance(p, str) for p in parts):
                raise APIError(
                    400, f"'messages[{i}].content': only text parts are supported", f"messages[{i}]"
                )
            content = "".join(parts)
        if not isinstance(content, str):
            raise APIError(400, f"'messages[{i}].content': expected a string", f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return out


async def _read_json(request: HTTPRequest, limit: int) -> dict:
    length = request.headers.get("content-length")
    too_big = length is not None and length.isdigit() and int(length) > limit
    size, chunks = 0, []
    if not too_big or int(length) <= DRAIN_LIMIT:
        async for chunk in request.stream():  # read to the end, so the client sees the answer
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > DRAIN_LIMIT:
                break
    if too_big or size > limit:
        raise APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _check_model(body: dict, state: ServeState) -> None:
    model = _get(body, "model", (str,), what="a string")
    if model != state.model_id:
        raise APIError(
            404, f"the model '{model}' does not exist; this server serves '{state.model_id}'", "model",
            code="model_not_found",
        )  # fmt: skip


def _check_key(request: HTTPRequest, state: ServeState) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        what = "no API key" if not header else "a wrong API key"
        raise APIError(401, f"{what}: send 'Authorization: Bearer KEY'", code="invalid_api_key")


# ------------------------------------------------------------------------------------------------ a run
class Run:
    """One request in the scheduler, its events handed to the event loop through a queue."""

    def __init__(
        self,
        state: ServeState,
        prompt: list[int],
        sampling: Sampling,
        boundaries=(),
        cache=True,
        ignore_eos=False,
    ):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.state = state
        self.done = False
        self.request = Request(
            prompt, sampling, lambda e: loop.call_soon_threadsafe(self.queue.put_nowait, e), boundaries,
            cache_prompt=cache, ignore_eos=ignore_eos, id=uuid.uuid4().hex[:24],
        )  # fmt: skip
        try:
            state.scheduler.submit(self.request)
        except QueueFull as err:
            raise APIError(429, f"the server is busy: {err}", code="rate_limit_exceeded",
                           type="rate_limit_error", headers={"Retry-After": "1"}) from None  # fmt: skip
        state.metrics.inc("quintet_serve_prompt_tokens_total", len(prompt))

    async def events(self):
        try:
            while True:
                event = await self.queue.get()
                if isinstance(event, DoneEvent):
                    self.done = True
                    if event.finish_reason == "error":
                        raise APIError(500, "the model failed; see the server's log", code="model_error")
                    if event.finish_reason == "shutdown":
                        raise APIError(503, "the server is shutting down", code="shutting_down")
                yield event
                if self.done:
                    return
        finally:
            if not self.done:
                self.cancel()

    def cancel(self) -> None:
        self.state.scheduler.cancel(self.request)


async def _watch_disconnect(request: HTTPRequest, run: Run) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            run.cancel()
            return


def _usage(prompt: int, completion: int, cached: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Generation:
    """Text, token ids and logprobs of a run, with stop strings applied."""

    def __init__(self, state: ServeState, stops: list[str], logprobs: bool):
        self.state, self.text = state, TextStream(state.tokenizer, stops)
        self.tokens: list[int] = []
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.want_logprobs = logprobs
        self.chars = 0
        self.finish_reason: str | None = None
        self.cached = 0

    def push(self, event: TokenEvent) -> str:
        self.tokens.append(event.token)
        piece = self.text.push(event.token)
        if self.want_logprobs:
            decode = self.state.tokenizer.decode
            self.logprobs["tokens"].append(decode([event.token]))
            self.logprobs["token_logprobs"].append(event.logprob)
            top = event.top_logprobs or []
            self.logprobs["top_logprobs"].append({decode([t]): lp for t, lp in top})
            self.logprobs["text_offset"].append(self.chars)
        self.chars += len(piece)
        if self.text.stopped:
            self.finish_reason = "stop"
        return piece

    def finish(self, event: DoneEvent) -> str:
        self.cached = event.cached_tokens
        if self.finish_reason is None:
            self.finish_reason = "stop" if event.finish_reason == "stop" else "length"
        return self.text.flush() if not self.text.stopped else ""


async def _generate(
    request: HTTPRequest, state: ServeState, body: dict, prompt: list[int], boundaries: tuple, chat: bool
) -> Response:
    sampling = _sampling(
        body, len(prompt), state, ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    )
    stops = _stops(body)
    stream, include_usage = _stream_options(body)
    logprobs = None
    if chat:
        if _get(body, "logprobs", (bool,), False, "a boolean"):
            raise APIError(400, "'logprobs' is supported on /v1/completions only", param="logprobs")
    else:
        logprobs = _get(body, "logprobs", (int,), None, "an integer")
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"'logprobs' = {logprobs}: must be in [0, {MAX_LOGPROBS}]", param="logprobs")
        if _get(body, "echo", (bool,), False, "a boolean"):
            raise APIError(400, "'echo' is not supported", param="echo")
    sampling.logprobs = logprobs
    token_ids = bool(_get(body, "return_token_ids", (bool,), False, "a boolean"))
    cache = bool(_get(body, "cache_prompt", (bool,), True, "a boolean"))
    ignore_eos = bool(_get(body, "ignore_eos", (bool,), False, "a boolean"))
    gen = Generation(state, stops, logprobs is not None)
    run = Run(state, prompt, sampling, boundaries, cache, ignore_eos)
    rid = ("chatcmpl-" if chat else "cmpl-") + run.request.id
    kind = "chat.completion" if chat else "text_completion"
    created = int(time.time())
    head = {"id": rid, "object": kind + (".chunk" if chat and stream else ""), "created": created,
            "model": state.model_id}  # fmt: skip

    def choice(text: str, finish, final: bool = False) -> dict:
        c: dict = {"index": 0}
        if chat:
            c["delta" if stream else "message"] = (
                {"content": text} if stream else {"role": "assistant", "content": text}
            )
        else:
            c["text"] = text
            c["logprobs"] = (gen.logprobs if final else None) if logprobs is not None else None
        c["finish_reason"] = finish
        if token_ids and final:
            c["token_ids"], c["prompt_token_ids"] = gen.tokens, prompt
        return c

    if not stream:
        watcher = asyncio.create_task(_watch_disconnect(request, run))
        parts = []
        try:
            async for event in run.events():
                if isinstance(event, TokenEvent):
                    parts.append(gen.push(event))
                    if gen.text.stopped:
                        run.cancel()
                        break
                else:
                    parts.append(gen.finish(event))
        finally:
            watcher.cancel()
        gen.finish_reason = gen.finish_reason or "length"
        out = {**head, "choices": [choice("".join(parts), gen.finish_reason, final=True)],
               "usage": _usage(len(prompt), len(gen.tokens), run.request.cached_tokens)}  # fmt: skip
        return JSONResponse(out)

    async def chunks():
        watcher = asyncio.create_task(_watch_disconnect(request, run))  # frees the slot even while queued
        try:
            async for piece in sse_events():
                yield piece
        finally:
            watcher.cancel()

    async def sse_events():
        if chat:
            yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})  # fmt: skip
        try:
            async for event in run.events():
                if isinstance(event, TokenEvent):
                    piece = gen.push(event)
                    if piece:
                        c = choice(piece, None)
                        if logprobs is not None:
                            c["logprobs"] = {k: v[-1:] for k, v in gen.logprobs.items()}
                        yield _sse({**head, "choices": [c]})
                    if gen.text.stopped:
                        run.cancel()
                        break
                else:
                    tail = gen.finish(event)
                    if tail:
                        yield _sse({**head, "choices": [choice(tail, None)]})
            final = choice("", gen.finish_reason or "length", final=True)
            if chat:
                final["delta"] = {}
            else:
                final["logprobs"] = None
            yield _sse({**head, "choices": [final]})
            if include_usage:
                usage = _usage(len(prompt), len(gen.tokens), run.request.cached_tokens)
                yield _sse({**head, "choices": [], "usage": usage})
        except APIError as err:
            yield _sse({"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}})
        yield "data: [DONE]\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ------------------------------------------------------------------------------------------------ routes
def create_app(state: ServeState) -> Starlette:
    """The ASGI app over a started scheduler (the caller starts and stops it)."""

    async def completions(request: HTTPRequest) -> Response:
        _check_key(request, state)
        body = await _read_json(request, state.max_body_bytes)
        _check_model(body, state)
        prompt = _completion_prompt(body, state)
        return await _generate(request, state, body, prompt, (), chat=False)

    async def chat_completions(request: HTTPRequest) -> Response:
        _check_key(request, state)
        body = await _read_json(request, state.max_body_bytes)
        _check_model(body, state)
        try:
            prompt, boundaries = state.chat.render(_messages(body))
        except ValueError as err:  # the template itself refused (raise_exception) or could not render
            raise APIError(400, f"the chat template refused the messages: {err}", param="messages") from None
        return await _generate(request, state, body, prompt, boundaries, chat=True)

    async def models(request: HTTPRequest) -> Response:
        _check_key(request, state)
        data = [{"id": state.model_id, "object": "model", "created": state.created, "owned_by": "quintet",
                 "max_model_len": state.max_context}]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    async def health(request: HTTPRequest) -> Response:
        if state.scheduler.error is not None:
            return JSONResponse({"status": "error", "error": str(state.scheduler.error)}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(request: HTTPRequest) -> Response:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    async def page(request: HTTPRequest) -> Response:
        html = (STATIC / "chat.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL_ID}}", json.dumps(state.model_id)))

    async def api_error(request: HTTPRequest, err: APIError) -> Response:
        return error_response(err)

    async def http_error(request: HTTPRequest, err: HTTPException) -> Response:
        return error_response(
            APIError(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None)
        )

    async def server_error(request: HTTPRequest, err: Exception) -> Response:
        return error_response(APIError(500, f"internal error: {type(err).__name__}: {err}"))

    routes = [
        Route("/", page),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    handlers = {APIError: api_error, HTTPException: http_error, Exception: server_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    return CountRequests(app, state.metrics)


class CountRequests:
    """ASGI middleware: counts answered requests by path and status (`quintet_serve_requests_total`)."""

    PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/"}

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.PATHS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.inc("quintet_serve_requests_total", endpoint=path, status=str(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)
