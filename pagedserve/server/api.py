"""The FastAPI app: OpenAI routes, /health, /metrics, /tokenize, /detokenize, /version.

Every error leaves as OpenAI error JSON `{"error": {"message", "type", "param",
"code"}}` with the status its exception class names (see errors.py); schema
errors are 400, unknown routes 404, anything unexpected 500 with the
traceback in the log only. The HTTP side starts at once; /health answers 503
until the engine process and the tokenizer are loaded.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from dataclasses import dataclass, field

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from pagedserve import __version__
from pagedserve.answer_cache.cache import AnswerCache
from pagedserve.answer_cache.config import AnswerCacheConfig
from pagedserve.answer_cache.middleware import AnswerCacheMiddleware
from pagedserve.config import EngineConfig
from pagedserve.engine.async_engine import AsyncEngine
from pagedserve.errors import InvalidRequestError, NotReadyError, PagedServeError
from pagedserve.server.metrics import CONTENT_TYPE, ServerMetrics
from pagedserve.server.serving import OpenAIServing, error_response, json_response
from pagedserve.server.tool_calling import ToolOptions

log = logging.getLogger("pagedserve.server")

MAX_BODY_BYTES = 16 << 20


class AuthenticationError(PagedServeError):
    status = 401
    type = "authentication_error"


class RequestTooLargeError(InvalidRequestError):
    status = 413


class ClientGoneError(PagedServeError):
    status = 499  # nginx's "client closed request": the answer goes nowhere
    type = "invalid_request_error"


class HTTPError(PagedServeError):
    """Routing errors from Starlette (404 unknown path, 405 wrong method), in OpenAI's shape."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.type = "not_found_error" if status == 404 else "invalid_request_error"


@dataclass
class ServerOptions:
    served_model_names: list[str]
    api_key: str | None = None
    max_queue_len: int | None = None
    log_requests: bool = True
    host: str = "127.0.0.1"
    port: int = 8000
    answer_cache: AnswerCacheConfig | None = None  # exact-match replay of deterministic requests
    trust_request_chat_template: bool = False  # vLLM's --trust-request-chat-template
    chat_template: str | None = None  # --chat-template: replaces the tokenizer's (or the built-in) template
    tools: ToolOptions = field(default_factory=ToolOptions)  # --enable-auto-tool-choice, --tool-call-parser


async def read_body(request: Request) -> bytes:
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > MAX_BODY_BYTES:
        raise RequestTooLargeError(f"the request body has {int(cl)} bytes; the limit is {MAX_BODY_BYTES}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise RequestTooLargeError(f"the request body exceeds the limit of {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # gone mid-body, or its HTTP broke (uvicorn answered 400): nobody to answer
        raise ClientGoneError("the client went away before sending the whole body") from None
    return b"".join(chunks)


def build_app(config: EngineConfig, opts: ServerOptions, on_fatal=None) -> FastAPI:
    """The app owns its AsyncEngine: started on lifespan start-up, stopped (drained first by uvicorn) on shutdown."""
    metrics = ServerMetrics(opts.served_model_names[0])
    engine = AsyncEngine(config, observer=metrics, log_level=logging.getLogger().getEffectiveLevel())
    serving = OpenAIServing(engine, metrics, opts.served_model_names, opts.max_queue_len, opts.log_requests,
                            opts.tools, opts.trust_request_chat_template)
    app = FastAPI(title="pagedserve", version=__version__, docs_url=None, redoc_url=None,
                  lifespan=_lifespan)
    app.state.config, app.state.opts, app.state.on_fatal = config, opts, on_fatal
    app.state.engine, app.state.serving, app.state.metrics = engine, serving, metrics
    if opts.answer_cache is not None and opts.answer_cache.enabled:  # keys hold the Authorization header and API key: a hit implies auth passed
        app.add_middleware(AnswerCacheMiddleware, cache=AnswerCache(opts.answer_cache, metrics.registry))
    _add_error_handlers(app)
    app.include_router(routes)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    st = app.state
    st.engine.start()
    task = asyncio.create_task(_load(st.engine, st.serving, st.metrics, st.config, st.opts, st.on_fatal))
    yield
    task.cancel()
    st.metrics.engine_up.set(0)
    await st.engine.shutdown()
    log.info("engine stopped")


async def _load(engine: AsyncEngine, serving: OpenAIServing, metrics: ServerMetrics, config: EngineConfig,
                opts: ServerOptions, on_fatal) -> None:
    """The engine process and the tokenizer load side by side; the server is ready when both are."""
    from pagedserve.model.loader import load_tokenizer

    t0 = time.time()
    try:
        tok_task = asyncio.create_task(asyncio.to_thread(load_tokenizer, config.model, config.tokenizer))
        info = await engine.wait_ready()
        tok = await tok_task
        if opts.chat_template is not None:
            tok.chat_template = opts.chat_template
        serving.set_tokenizer(tok)
    except Exception as e:  # noqa: BLE001 - a server that cannot load its model exits non-zero
        log.error("start-up failed: %s", e)
        if on_fatal is not None:
            on_fatal(e)
        return
    metrics.kv_blocks.set(info["num_kv_blocks"])
    if info.get("experts"):
        metrics.set_expert_layout(info["experts"])
        log.info("mixture of experts: %s", info["experts"]["layout"])
    metrics.engine_up.set(1)
    log.info("ready in %.1fs: model %s (%s) on %s, dtype %s, max_model_len %d, KV cache %d blocks x %d tokens "
             "= %d tokens, max_num_seqs %d, max_num_batched_tokens %d, engine pid %d; listening on http://%s:%d",
             time.time() - t0, opts.served_model_names[0], info["model_dir"], info["device"], info["dtype"],
             info["max_model_len"], info["num_kv_blocks"], info["block_size"],
             info["num_kv_blocks"] * info["block_size"], info["max_num_seqs"], info["max_num_batched_tokens"],
             info["pid"], opts.host, opts.port)


# -- errors ------------------------------------------------------------------------
def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI error JSON; the unexpected ones with their traceback in the log only."""

    @app.exception_handler(PagedServeError)
    async def _paged_error(request: Request, e: PagedServeError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return error_response(InvalidRequestError(f"invalid request: {e.errors()[:1]}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = {404: f"no route {request.url.path}", 405: f"method {request.method} is not allowed on "
               f"{request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(HTTPError(e.status_code, msg))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        err = PagedServeError(f"internal server error ({type(e).__name__}); see the server log")
        return error_response(err)


def check_auth(request: Request) -> None:
    api_key = request.app.state.opts.api_key
    if api_key is None:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        request.app.state.metrics.rejected("unauthorized")
        raise AuthenticationError("invalid or missing API key: send 'Authorization: Bearer <key>'")


routes = APIRouter()


# -- OpenAI routes --------------------------------------------------------------------
@routes.post("/v1/completions")
async def completions(request: Request):
    check_auth(request)
    return await request.app.state.serving.completions(await read_body(request), request)


@routes.post("/v1/chat/completions")
async def chat_completions(request: Request):
    check_auth(request)
    return await request.app.state.serving.chat(await read_body(request), request)


@routes.api_route("/v1/models", methods=["GET", "HEAD"])
async def models(request: Request):
    check_auth(request)
    st = request.app.state
    info = st.engine.info
    data = [{"id": name, "object": "model", "created": st.serving.created, "owned_by": "pagedserve",
             "root": info.get("model_dir", st.config.model), "parent": None,
             "max_model_len": info.get("max_model_len", st.config.max_model_len)}
            for name in st.opts.served_model_names]
    return json_response({"object": "list", "data": data})


# -- operations -------------------------------------------------------------------------
@routes.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request):
    engine, serving = request.app.state.engine, request.app.state.serving
    if serving.ready:
        return json_response({"status": "ok", "model": serving.model_name, "engine_pid": engine.pid})
    if engine.state == "dead":
        return error_response(NotReadyError(f"the engine process died: {engine.error}" +
                                            (f"; restart #{engine.restarts + 1} under way" if engine.restarting
                                             else "")))
    return error_response(NotReadyError("the model is still loading" if engine.state in ("created", "loading")
                                        else "the server is shutting down"))


@routes.api_route("/metrics", methods=["GET", "HEAD"])
async def metrics_endpoint(request: Request):
    st = request.app.state
    st.metrics.engine_up.set(1 if st.serving.ready else 0)
    return Response(st.metrics.render(), media_type=CONTENT_TYPE)


@routes.api_route("/version", methods=["GET", "HEAD"])
async def version():
    return json_response({"version": __version__})


@routes.post("/tokenize")
async def tokenize(request: Request):
    check_auth(request)  # tokenizing is work a client can size: same key as /v1/*
    return await request.app.state.serving.tokenize(await read_body(request))


@routes.post("/detokenize")
async def detokenize(request: Request):
    check_auth(request)
    return await request.app.state.serving.detokenize(await read_body(request))


def default_served_name(model: str | None) -> str:
    from pagedserve.model.default_model import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME if model in (None, "default") else str(model).rstrip("/")


def serve(engine_kwargs: dict, opts: ServerOptions, *, shutdown_timeout: float = 30.0,
          access_log: bool = False) -> int:
    """Resolve the model, build the app and run uvicorn until SIGTERM/SIGINT; returns the exit code."""
    import signal

    import uvicorn

    from pagedserve.model.loader import resolve_model_dir

    model = engine_kwargs.get("model")
    model_dir = resolve_model_dir(model)  # a bad path fails here, as one line, before anything starts
    config = EngineConfig.from_kwargs(**{**engine_kwargs, "model": str(model_dir), "serving": True,
                                         "served_model_name": opts.served_model_names[0]})
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(e: BaseException) -> None:
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = build_app(config, opts, on_fatal)
    from pagedserve.http_limits import uvicorn_kwargs

    uv_config = uvicorn.Config(app, host=opts.host, port=opts.port, log_config=None, access_log=access_log,
                               timeout_graceful_shutdown=shutdown_timeout, lifespan="on",
                               timeout_keep_alive=30, **uvicorn_kwargs())
    server = uvicorn.Server(uv_config)
    # uvicorn re-raises the signal that stopped it once it is done; a no-op handler makes a drained
    # SIGTERM/SIGINT shutdown exit 0 instead of dying from the re-raised signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    log.info("pagedserve %s (pid %d) starting: %s", __version__, os.getpid(), model_dir)
    server.run()
    if failed:
        from pagedserve.errors import ConfigError

        e = failed[0]
        raise e if isinstance(e, PagedServeError) else ConfigError(str(e))
    if not server.started:
        return 1
    return 0
