"""The OpenAI-compatible HTTP server (FastAPI, served by uvicorn on the shared event loop).

Routes: POST /v1/completions, POST /v1/chat/completions (JSON or SSE streams), POST
/v1/embeddings, /v1/score and /v1/rerank (pooling models, xlaserve/pooling/), GET /v1/models,
GET /health (readiness, no API key: 200 once the engine serves, 503 {"status": "starting"} while
it loads and warms up, 503 NOT_SERVING while draining or failed), GET /health/live and /livez
(liveness, no API key: 200 whenever the process answers), GET /metrics (Prometheus). Every
error has OpenAI's body {"error": {"message", "type", "param", "code"}}, whose `param` names
the field the client sent (`client_param`: max_completion_tokens, response_format, guided_json,
...). A client that disconnects aborts its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import uuid
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from xlaserve.engine.async_engine import EngineDeadError, RequestStream
from xlaserve.engine.outputs import RequestOutput
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.errors import InvalidRequestError
from xlaserve.pooling.http_routes import add_pooling_routes
from xlaserve.serving.context import STARTING, ServingContext
from xlaserve.serving.deltas import DeltaTracker, Usage
from xlaserve.serving.errors import Kind, ServingError, classify, failed_in_flight
from xlaserve.serving.limits import COMPLETIONS_DEFAULT_MAX_TOKENS, limited
from xlaserve.serving.metrics import CONTENT_TYPE
from xlaserve.serving.openai_format import SSE_DONE, ResponseFormatter, sse
from xlaserve.serving.openai_protocol import ChatCompletionRequest, CompletionRequest, parse_body
from xlaserve.serving.tool_calls import plan_tools

logger = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/health/live", "/livez"})


def error_response(error: ServingError) -> JSONResponse:
    return JSONResponse(error.openai_body(), status_code=error.kind.http_status)


class GuardMiddleware:
    """API key (Bearer) on every path but /health, and a cap on request body size (413)."""

    def __init__(self, app, ctx: ServingContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"] not in PUBLIC_PATHS and not self.ctx.authorized(
            headers.get("authorization")
        ):
            missing = "authorization" not in headers
            error = ServingError(
                Kind.UNAUTHENTICATED,
                "missing API key: send the header 'Authorization: Bearer <key>'"
                if missing
                else "invalid API key",
                code="invalid_api_key",
            )
            self.ctx.metrics.refused("unauthenticated")
            return await error_response(error)(scope, receive, send)
        limit = self.ctx.config.max_body_bytes
        too_large = ServingError(
            Kind.TOO_LARGE,
            f"request body is larger than the limit of {limit} bytes",
            code="request_too_large",
        )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            self.ctx.metrics.refused("invalid")
            return await error_response(too_large)(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # Read the body here (so a chunked body is capped too), then replay it to the app.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                self.ctx.metrics.refused("invalid")
                return await error_response(too_large)(scope, receive, send)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replay_receive, send)


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several request streams as they come."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((i, output, None))
        except Exception as e:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((i, None, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        pending = len(streams)
        while pending:
            i, output, error = await queue.get()
            if error is not None:
                raise error
            pending -= output.finished
            yield i, output
    finally:
        for task in tasks:
            task.cancel()


@contextlib.contextmanager
def named_as_sent(req):
    """Errors raised inside name the request field the client sent, not the engine's name for
    it (max_tokens -> max_completion_tokens, structured_outputs -> response_format, ...)."""
    try:
        yield
    except ServingError as e:
        e.param = req.client_param(e.param)
        raise


def _grammar_backend(ctx: ServingContext) -> str | None:
    """The name of the engine's grammar backend ("guidance", "xgrammar"), which a request's
    guided_decoding_backend may repeat; None where the engine does not say."""
    return ctx.engine.engine.structured_outputs_backend


class OpenAIRoutes:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def _submit_all(self, prompts, params, base_id: str, priority: int, **kw):
        streams = []
        try:
            for i, prompt in enumerate(prompts):
                streams.append(
                    await self.ctx.submit(
                        prompt, params, request_id=f"{base_id}-{i}", priority=priority, **kw
                    )
                )
        except BaseException:
            self._abort_unfinished(streams)
            raise
        return streams

    def _abort_unfinished(self, streams: list[RequestStream]) -> None:
        for stream in streams:
            if not stream.finished:
                self.ctx.engine.abort_nowait(stream.request_id)

    async def completions(self, request: Request):
        req = parse_body(await request.body(), CompletionRequest)
        lora = self.ctx.check_model(req.model)
        prompts = req.prompts()
        with named_as_sent(req):
            params, check_length = self._params(req)
            fmt = ResponseFormatter(
                "completion",
                f"cmpl-{uuid.uuid4().hex}",
                self.ctx.model_name if lora is None else lora.lora_name,
                n=params.n,
                top_logprobs=req.logprobs or 0,
                tokens_as_ids=req.return_tokens_as_token_ids,
            )
            streams = await self._submit_all(
                prompts, params, fmt.id, req.priority, check_length=check_length,
                lora_request=lora,
            )  # fmt: skip
            return await self._respond(request, req, fmt, streams)

    async def chat_completions(self, request: Request):
        req = parse_body(await request.body(), ChatCompletionRequest)
        lora = self.ctx.check_model(req.model)
        with named_as_sent(req):
            params, check_length = self._params(req)
            try:  # tools: their constraint set on params (required / named calls)
                tools = plan_tools(req, params, self.ctx.config.tool_call_parser)
            except ValueError as e:
                raise classify(e) from e
            fmt = ResponseFormatter(
                "chat",
                f"chatcmpl-{uuid.uuid4().hex}",
                self.ctx.model_name if lora is None else lora.lora_name,
                n=params.n,
                top_logprobs=req.top_logprobs or 0,
                tokens_as_ids=req.return_tokens_as_token_ids,
                tool_calls=tools.formatter() if tools is not None else None,
            )
            # The engine's intake applies the chat template (on the engine thread, like all
            # tokenizing), as for LLM.chat.
            messages = {"messages": [m.as_template_dict() for m in req.messages]}
            if tools is not None:
                messages["tools"] = tools.tools
            streams = await self._submit_all(
                [messages], params, fmt.id, req.priority, check_length=check_length,
                lora_request=lora,
            )  # fmt: skip
            return await self._respond(request, req, fmt, streams)

    def _params(self, req) -> tuple[SamplingParams, bool]:
        """The request's sampling params within the server's limits (serving/limits.py), and
        whether a max_tokens that does not fit after the prompt is refused (False: a default
        the server chose, cut at max_model_len)."""
        config = self.ctx.config
        if isinstance(req, CompletionRequest) and "max_tokens" not in req.model_fields_set:
            asked, default = None, COMPLETIONS_DEFAULT_MAX_TOKENS
        else:
            asked, default = None, None  # set below from the params (chat: either field)
        try:
            params = req.sampling_params(structured_backend=_grammar_backend(self.ctx))
            if default is None:
                asked = params.max_tokens
            params = limited(
                params,
                max_n=config.max_n,
                asked=asked,
                default=default,
                cap=config.max_tokens_cap,
                max_tokens_param=req.client_param("max_tokens"),
            )
        except ValueError as e:
            raise classify(e) from e
        return params, asked is not None or default is not None

    async def _respond(self, request: Request, req, fmt, streams):
        if req.stream:
            return StreamingResponse(
                self._events(req, fmt, streams),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        collect = asyncio.create_task(self._final_outputs(streams))
        disconnect = asyncio.create_task(_wait_disconnect(request))
        gone = True  # also when this handler itself is cancelled
        try:
            await asyncio.wait((collect, disconnect), return_when=asyncio.FIRST_COMPLETED)
            gone = not collect.done()
        finally:
            disconnect.cancel()
            if gone:  # the client went away: stop its requests
                collect.cancel()
                self._abort_unfinished(streams)
        if gone:  # not an error: nobody is left to answer (499: nginx's "client closed")
            logger.info("client disconnected from %s: request %s aborted", request.url.path, fmt.id)
            return Response(status_code=499)
        try:
            finals = collect.result()
        except EngineDeadError as e:
            raise failed_in_flight(e) from e
        except InvalidRequestError as e:  # failed after it was accepted (its grammar)
            self._abort_unfinished(streams)
            raise classify(e) from e
        choices, usage = [], Usage(0, 0, 0)
        for i, output in enumerate(finals):
            usage = usage + Usage.of(output)
            for d in DeltaTracker().update(output):
                choices.append(fmt.choice(i, d, stream=False, first=True))
        choices.sort(key=lambda c: c["index"])
        return JSONResponse(fmt.response(choices, usage))

    async def _final_outputs(self, streams: list[RequestStream]) -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(streams)
        async for i, output in _merged(streams):
            if output.finished:
                finals[i] = output
        return finals

    async def _events(self, req, fmt: ResponseFormatter, streams):
        include_usage = req.include_usage
        trackers = [DeltaTracker() for _ in streams]
        started: set[int] = set()
        usage = {}
        try:
            async for i, output in _merged(streams):
                for d in trackers[i].update(output):
                    index = fmt.choice_index(i, d.index)
                    choice = fmt.choice(i, d, stream=True, first=index not in started)
                    started.add(index)
                    yield fmt.chunk([choice], with_usage_field=include_usage)
                if output.finished:
                    usage[i] = Usage.of(output)
            if include_usage:
                total = sum(usage.values(), Usage(0, 0, 0))
                yield fmt.chunk([], total, with_usage_field=True)
            yield SSE_DONE
        except EngineDeadError as e:
            yield sse(failed_in_flight(e).openai_body())
        except InvalidRequestError as e:  # failed after it was accepted (its grammar)
            error = classify(e)
            error.param = req.client_param(error.param)
            yield sse(error.openai_body())
        finally:
            self._abort_unfinished(streams)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _json_object(body: bytes) -> dict:
    try:
        value = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ServingError(Kind.INVALID, f"the request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ServingError(Kind.INVALID, "the request body must be a JSON object")
    return value


def build_app(ctx: ServingContext) -> GuardMiddleware:
    """The ASGI app: FastAPI routes behind the API-key and body-size guard."""
    app = FastAPI(title="xlaserve", docs_url=None, redoc_url=None, openapi_url=None)
    routes = OpenAIRoutes(ctx)

    @app.exception_handler(ServingError)
    async def serving_error(request, exc: ServingError):
        if exc.code != "engine_failed":  # refused before it started (failures count apart)
            ctx.count_refusal(exc)
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = {404: Kind.NOT_FOUND, 401: Kind.UNAUTHENTICATED}.get(exc.status_code, Kind.INVALID)
        body = ServingError(kind, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(body.openai_body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        logger.exception("internal error in %s", request.url.path)
        return error_response(ServingError(Kind.INTERNAL, f"internal error: {exc}"))

    @app.get("/health")
    async def health():
        """Readiness: 200 once the engine serves; 503 while starting, draining or failed."""
        if ctx.healthy:
            return {"status": "SERVING"}
        if ctx.starting:
            return JSONResponse({"status": "starting", "reason": STARTING}, status_code=503)
        error = ctx.engine.error if ctx.has_engine else None
        reason = str(error) if error else "the server is shutting down"
        return JSONResponse({"status": "NOT_SERVING", "reason": reason}, status_code=503)

    @app.get("/health/live")
    @app.get("/livez")
    async def live():
        """Liveness: 200 whenever this process answers HTTP (starting included)."""
        return {"status": "ALIVE"}

    @app.get("/v1/models")
    async def models():
        card = {
            "id": ctx.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "xlaserve",
            "max_model_len": ctx.engine.max_model_len,
        }
        adapters = [
            {"id": a.name, "object": "model", "created": 0, "owned_by": "xlaserve",
             "root": a.path, "parent": ctx.model_name,
             "max_model_len": ctx.engine.max_model_len}
            for a in ctx.adapters.values()
        ]  # fmt: skip
        return {"object": "list", "data": [card, *adapters]}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        """vLLM's runtime loading: {"lora_name", "lora_path"} (needs the runtime flag)."""
        body = _json_object(await request.body())
        info = await ctx.load_adapter(body.get("lora_name"), body.get("lora_path"))
        return Response(f"Success: LoRA adapter {info.name!r} added successfully.",
                        media_type="text/plain")  # fmt: skip

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        """{"lora_name"} (vLLM's body; a lora_int_id beside it is not needed)."""
        body = _json_object(await request.body())
        await ctx.unload_adapter(body.get("lora_name"))
        return Response(f"Success: LoRA adapter {body['lora_name']!r} removed successfully.",
                        media_type="text/plain")  # fmt: skip

    @app.get("/metrics")
    async def metrics():
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    app.post("/v1/completions")(routes.completions)
    app.post("/v1/chat/completions")(routes.chat_completions)
    add_pooling_routes(app, ctx)  # /v1/embeddings, /v1/score, /v1/rerank
    return GuardMiddleware(app, ctx)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handling: `serve` owns signals and shutdown order."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass


async def start_http_server(ctx: ServingContext, host: str, port: int):
    """Starts uvicorn on the running loop; returns (server, task, bound port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(
            e.errno, f"cannot bind the HTTP server to {host}:{port} (--http-port): {e.strerror}"
        ) from e
    sock.listen(2048)
    sock.setblocking(False)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        build_app(ctx),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=30,
    )
    server = _Uvicorn(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises the start-up error
            raise OSError(f"the HTTP server on {host}:{port} exited during start-up")
        await asyncio.sleep(0.01)
    logger.info("HTTP server on %s:%d", host, bound)
    return server, task, bound
