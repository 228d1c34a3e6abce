"""An OpenAI-compatible chat server for a (steered) model.

`create_app` builds the FastAPI app: `GET /v1/models`, `POST /v1/chat/completions` (streamed
as server-sent events or not), `GET /health`; the same routes also answer without the `/v1`
prefix, so clients that append either path to a base URL work. Requests are batched by
`refusalkit.batching.Engine`. The steering profile applies to every request unless the
request overrides it in an extra body field:

    "steering": {"scale": 0.5}      # multiply the profile's addition strengths (0 = none)
    "steering": {"enabled": false}  # no hooks at all (ablation off too)

The server holds one model. A request naming another model is answered by that one, as
single-model servers (llama.cpp, LM Studio) do, so clients with a fixed model name still work;
the response's `model` field names the served model (as OpenAI's names the snapshot that
answered), and it carries a `warning` field and an `X-Refusalkit-Warning` header saying so.

Every request is bounded — body size, `max_tokens`, prompt length, `n` and the number of
requests in flight — and every failure is a JSON error in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`, never a crash. With an API key, requests
without `Authorization: Bearer <key>` get 401 (`/health` stays open for probes).
Reported log-probs are those of the model's raw next-token distribution (temperature 1,
before top-p), which is what a judge reading label probabilities needs.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from refusalkit.batching import OFF, Engine, Job, Sampling, request_id
from refusalkit.errors import UserError
from refusalkit.interventions import Profile, steer
from refusalkit.models import LoadedModel
from refusalkit.serve_schema import (  # re-exported: the schema used to live here
    MAX_N,
    MAX_SCALE,
    MAX_STOPS,
    MAX_TOP_LOGPROBS,
    ChatRequest,
    Message,
    Steering,
    TextPart,
    _validation_message,
)

__all__ = ["MAX_N", "MAX_SCALE", "MAX_STOPS", "MAX_TOP_LOGPROBS", "ApiError", "ChatRequest",
           "Message", "Steering", "TextPart", "create_app", "serve_in_thread"]


def model_warning(requested: str | None, served: str, warned: set[str]) -> str | None:
    """The note for a request that names another model (logged once per name)."""
    if not requested or requested == served:
        return None
    if requested not in warned:
        warned.add(requested)
        logging.getLogger("refusalkit.serve").warning(
            "a request named model '%s'; this server answers with '%s'", requested, served)
    return f"this server serves '{served}' only; the request named '{requested}'"


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str,
                 kind: str = "invalid_request_error", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = (
            status, message, code, kind, param)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.code, self.kind, self.param)


def error_response(status: int, message: str, code: str, kind: str = "invalid_request_error",
                   param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def render_prompt(lm: LoadedModel, messages: list[Message]) -> str:
    """The chat as the model sees it (its chat template with the generation prompt)."""
    msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in messages]
    if lm.system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": lm.system_prompt})
    tok = lm.tokenizer
    if not getattr(tok, "chat_template", None):  # base model: plain text, as format_chat does
        return "\n\n".join(m["content"] for m in msgs) + "\n"
    kwargs = {"enable_thinking": lm.reasoning} if lm.reasoning is not None else {}
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kwargs)


# ---------------------------------------------------------------- the app

def create_app(
    lm: LoadedModel,
    profile: Profile | None = None,
    *,
    api_key: str | None = None,
    model_name: str | None = None,
    max_tokens_limit: int = 1024,
    max_prompt_tokens: int = 4096,
    max_concurrency: int = 64,
    max_body_bytes: int = 1_000_000,
    batch_window_ms: float = 10.0,
    max_batch: int = 16,
) -> FastAPI:
    """A FastAPI app serving `lm` (steered by `profile`) with OpenAI's chat API.

    The batching worker starts and stops with the app's lifespan (uvicorn or
    `serve_in_thread` run it). `max_batch=1` serves requests one at a time.
    """
    if profile is not None:
        with steer(lm, profile):  # validates layers and shapes now, not on the first request
            pass
    name = model_name or lm.name
    engine = Engine(lm, profile, max_batch=max_batch, batch_window_ms=batch_window_ms)
    default_max_tokens = min(256, max_tokens_limit)
    context = int(getattr(lm.model.config, "max_position_embeddings", None) or 1 << 30)
    slots = {"used": 0}
    lock = threading.Lock()
    warned: set[str] = set()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="refusalkit", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, str(exc.detail), code)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}",
                              "internal_error", "server_error")

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "invalid_api_key", "authentication_error")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise ApiError(413, f"request body is larger than {max_body_bytes} bytes",
                           "request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_body_bytes:
                raise ApiError(413, f"request body is larger than {max_body_bytes} bytes",
                               "request_too_large")
        return bytes(body)

    def parse(raw: bytes) -> ChatRequest:
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON ({exc})", "invalid_json") from exc
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object", "invalid_request")
        try:
            req = ChatRequest.model_validate(data)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            raise ApiError(400, message, "invalid_request", param=param) from exc
        problem = req.unsupported()
        if problem:
            raise ApiError(400, problem, "unsupported_parameter")
        return req

    def build_job(req: ChatRequest) -> Job:
        max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens
        if max_tokens > max_tokens_limit:
            raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most "
                           f"{max_tokens_limit}", "max_tokens_too_large", param="max_tokens")
        stops = req.stops()
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"at most {MAX_STOPS} stop strings are allowed", "invalid_stop",
                           param="stop")
        key = steering_key(req.steering)
        try:
            text = render_prompt(lm, req.messages)
        except Exception as exc:  # jinja template errors (e.g. unsupported role order)
            raise ApiError(400, f"the chat template rejected these messages: {exc}",
                           "invalid_messages", param="messages") from exc
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ApiError(400, "the messages are empty", "invalid_messages", param="messages")
        if len(ids) > max_prompt_tokens or len(ids) + max_tokens > context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server allows at most "
                           f"{min(max_prompt_tokens, context - max_tokens)} with max_tokens "
                           f"{max_tokens}", "context_length_exceeded", param="messages")
        sampling = Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                            stop=stops, seed=req.seed, logprobs=req.logprobs,
                            top_logprobs=req.top_logprobs or 0)
        return Job(prompt_ids=ids, sampling=sampling, key=key, n=req.n)

    def steering_key(s: Steering | None) -> float | None:
        if s is not None and not s.enabled:
            return OFF
        if profile is None:
            if s is not None and s.scale not in (None, 0.0):
                raise ApiError(400, "this server runs without a steering profile; start it "
                               "with --profile to steer", "no_profile", param="steering")
            return OFF
        return float(profile.scale if s is None or s.scale is None else s.scale)

    def admit(job: Job) -> None:
        with lock:
            if slots["used"] >= max_concurrency:
                raise ApiError(429, f"too many requests in flight (limit {max_concurrency}); "
                               "retry shortly", "too_many_requests", "rate_limit_error")
            slots["used"] += 1

        def release() -> None:
            with lock:
                slots["used"] -= 1

        job.on_done = release
        job.loop = asyncio.get_running_loop()
        job.events = asyncio.Queue()
        engine.submit(job)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = engine.stats
        return {"status": "ok", "model": name, "steering": profile is not None,
                "in_flight": slots["used"], "batches": s.batches, "rows": s.rows,
                "max_rows_in_batch": s.max_rows}

    @app.get("/v1/models")
    @app.get("/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "refusalkit"}]}

    @app.post("/v1/chat/completions", response_model=None)
    @app.post("/chat/completions", response_model=None)
    async def chat(request: Request) -> JSONResponse | StreamingResponse:
        authorize(request)
        req = parse(await read_body(request))
        job = build_job(req)
        admit(job)
        meta = {"id": request_id(), "created": int(time.time()), "model": name}
        steering = {"enabled": job.key is not OFF, "scale": job.key}
        note = model_warning(req.model, name, warned)
        extra = {"warning": note} if note else {}
        headers = {"X-Refusalkit-Warning": note} if note else {}
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _sse(job, meta, include_usage), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        try:
            texts, logprobs, finish = await job.collect()
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        except Exception as exc:
            raise ApiError(500, f"generation failed: {type(exc).__name__}: {exc}",
                           "generation_failed", "server_error") from exc
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": {"content": logprobs[i]} if req.logprobs else None,
                    "finish_reason": finish[i]} for i in range(job.n)]
        return JSONResponse({**meta, "object": "chat.completion", "choices": choices,
                             "usage": job.usage(), "steering": steering, **extra,
                             "system_fingerprint": f"rk-{lm.fingerprint[:12]}"},
                            headers=headers)

    return app


def _sse_line(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _sse(job: Job, meta: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    base = {**meta, "object": "chat.completion.chunk"}
    try:
        for i in range(job.n):
            yield _sse_line({**base, "choices": [{"index": i, "delta": {
                "role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
        try:
            async for ev in job.stream():
                if not (ev.text or ev.logprobs or ev.finish_reason):
                    continue
                delta = {"content": ev.text} if ev.text else {}
                yield _sse_line({**base, "choices": [{
                    "index": ev.index, "delta": delta,
                    "logprobs": {"content": ev.logprobs} if job.sampling.logprobs else None,
                    "finish_reason": ev.finish_reason}]})
        except Exception as exc:  # headers are sent: report in-band, as OpenAI does
            yield _sse_line({"error": {"message": f"generation failed: {exc}",
                                       "type": "server_error", "param": None,
                                       "code": "generation_failed"}})
            return
        if include_usage:
            yield _sse_line({**base, "choices": [], "usage": job.usage()})
        yield _sse_line("[DONE]")
    finally:
        job.cancelled.set()  # no-op when finished; stops decoding if the client went away


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                    timeout: float = 30.0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread; yields "http://HOST:PORT" (port 0
    picks a free one). The OpenAI client wants base_url=<that> + "/v1". Always shut down."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           lifespan="on", access_log=False))
    thread = threading.Thread(target=server.run, name="refusalkit-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise UserError(f"the server did not start on {host}:{port} (port in use?)")
            time.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
