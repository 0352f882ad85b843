"""Runs the gRPC and HTTP servers together over one `AsyncEngine`, on one event loop.

Exit codes of `serve`: 0 after a graceful shutdown (SIGTERM/SIGINT or the `shutdown` event:
health turns NOT_SERVING, new requests are refused with UNAVAILABLE / 503, in-flight ones get
`drain_timeout_s` to finish); 1 when the engine failed (health turns NOT_SERVING at once,
in-flight requests fail, and after `failure_exit_delay_s` the servers stop) so that a
supervisor restarts the process instead of it hanging.

Start-up order: both ports are bound first (a port in use fails at once, naming it), then the
engine is built and warmed up on a worker thread while the servers answer: HTTP `/health` 503
{"status": "starting"}, `/health/live` and `/livez` 200, gRPC health NOT_SERVING, and every
request 503 / UNAVAILABLE "the server is starting". Once the engine is ready, health turns
SERVING and requests are taken.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from xlaserve.engine.async_engine import AsyncEngine
from xlaserve.serving.context import ServerConfig, ServingContext
from xlaserve.serving.grpc_server import start_grpc_server
from xlaserve.serving.http_server import start_http_server
from xlaserve.serving.jetstream_listener import start_jetstream_server

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ENGINE_FAILED = 1

__all__ = ["EXIT_ENGINE_FAILED", "EXIT_OK", "Endpoints", "ServerConfig", "ServerThread",
           "run_server", "serve"]  # fmt: skip


@dataclass(frozen=True)
class Endpoints:
    host: str
    grpc_port: int | None
    http_port: int | None
    jetstream_port: int | None = None  # the JetStream-only gRPC listener (--jetstream-port)

    @property
    def grpc_target(self) -> str:
        return f"{self._host()}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self._host()}:{self.http_port}"

    def _host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host


EngineOrBuilder = AsyncEngine | Callable[[], AsyncEngine]


async def serve(
    engine: EngineOrBuilder,
    config: ServerConfig,
    *,
    on_ready: Callable[[Endpoints], None] | None = None,
    on_listening: Callable[[Endpoints], None] | None = None,
    shutdown: asyncio.Event | None = None,
    handle_signals: bool = False,
) -> int:
    """Binds both servers, then builds (when given a builder: it runs on a worker thread while
    the servers answer "starting") and starts the engine; runs until `shutdown` is set (or
    SIGTERM/SIGINT with `handle_signals`) or the engine fails; returns the process exit code.
    `on_listening` is called once the ports are bound, `on_ready` once requests are taken. An
    exception from the builder is raised after the servers stopped."""
    loop = asyncio.get_running_loop()
    shutdown = shutdown or asyncio.Event()
    build = None if isinstance(engine, AsyncEngine) else engine
    ctx = ServingContext(None, config)
    started: AsyncEngine | None = None
    grpc_server = http = jetstream_server = None
    code = EXIT_OK
    try:
        grpc_port = http_port = None
        if config.grpc_port is not None:
            grpc_server, grpc_port = await start_grpc_server(ctx, config.host, config.grpc_port)
        if config.http_port is not None:
            http = await start_http_server(ctx, config.host, config.http_port)
            http_port = http[2]
        jetstream_port = None
        if config.jetstream_port is not None:
            jetstream_server, jetstream_port = await start_jetstream_server(
                ctx, config.host, config.jetstream_port
            )
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, shutdown.set)
        endpoints = Endpoints(config.host, grpc_port, http_port, jetstream_port)
        if on_listening is not None:
            on_listening(endpoints)
        if build is not None:
            engine = await _build_engine(build, shutdown)
            if engine is None:  # shut down while starting
                return EXIT_OK
        engine.observer = ctx.metrics
        engine.add_death_callback(
            lambda error: loop.call_soon_threadsafe(ctx.on_engine_death, error)
        )
        started = engine.start()
        await _load_lora_modules(engine, config.lora_modules)
        ctx.attach(engine)
        if on_ready is not None:
            on_ready(endpoints)
        stop_wait = asyncio.ensure_future(shutdown.wait())
        fail_wait = asyncio.ensure_future(ctx.failed.wait())
        await asyncio.wait((stop_wait, fail_wait), return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        fail_wait.cancel()
        if not ctx.failed.is_set():
            logger.info("shutting down: draining in-flight requests")
            ctx.begin_drain()
            drain = asyncio.ensure_future(engine.shutdown_async(config.drain_timeout_s))
            fail_wait = asyncio.ensure_future(ctx.failed.wait())
            await asyncio.wait((drain, fail_wait), return_when=asyncio.FIRST_COMPLETED)
            fail_wait.cancel()
            if not drain.done():  # the engine failed while draining
                await drain
        if ctx.failed.is_set():
            code = EXIT_ENGINE_FAILED
            logger.error(
                "engine failed; reporting NOT_SERVING for %.1fs, then exiting with status %d",
                config.failure_exit_delay_s,
                code,
            )
            await asyncio.sleep(config.failure_exit_delay_s)
    finally:
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if http is not None:
            server, task, _ = http
            server.should_exit = True
            await task
        if grpc_server is not None:
            await grpc_server.stop(grace=2.0)
        if jetstream_server is not None:
            await jetstream_server.stop(grace=2.0)
        if started is not None:
            await started.shutdown_async(0)
    return code


async def _load_lora_modules(engine: AsyncEngine, modules) -> None:
    """`--lora-modules`: adapters served from start-up (ids after any already loaded)."""
    if not modules:
        return
    from xlaserve.lora.request import LoRARequest

    first = 1 + max((a.lora_int_id for a in await engine.list_loras()), default=0)
    for i, (name, path) in enumerate(modules, first):
        await engine.add_lora(LoRARequest(name, i, path))
        logger.info("LoRA adapter %r loaded from %s", name, path)


async def _build_engine(build: Callable[[], AsyncEngine], shutdown: asyncio.Event):
    """Runs `build` on a daemon thread (loading and warm-up block for a while); its engine, or
    None when `shutdown` is set first (the thread is left to finish or die with the process)."""
    loop = asyncio.get_running_loop()
    built: asyncio.Future = loop.create_future()

    def settle(result, error) -> None:
        if not built.done():
            built.set_exception(error) if error is not None else built.set_result(result)

    def run() -> None:
        result = error = None
        try:
            result = build()
        except BaseException as e:  # noqa: BLE001 - raised on the loop's side
            error = e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop already closed (shut down while starting)
            pass

    threading.Thread(target=run, name="xlaserve-build", daemon=True).start()
    stop_wait = asyncio.ensure_future(shutdown.wait())
    try:
        await asyncio.wait((built, stop_wait), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_wait.cancel()
    if not built.done():
        logger.info("shut down while starting")
        return None
    return built.result()


class ServerThread:
    """`serve` on a background thread with its own event loop (tests, embedding):

    with ServerThread(AsyncEngine(engine), ServerConfig(grpc_port=0, http_port=0)) as s:
        client = XlaServeClient(s.endpoints.grpc_target)

    `engine` may be a builder (`() -> AsyncEngine`), run while the servers answer "starting";
    `start(wait_ready=False)` returns as soon as the ports are bound.
    """

    def __init__(self, engine: EngineOrBuilder, config: ServerConfig) -> None:
        self.engine = engine if isinstance(engine, AsyncEngine) else None  # set once built
        self._engine_or_builder = engine
        self.config = config
        self.endpoints: Endpoints | None = None
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Event | None = None
        self._listening = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="xlaserve-server", daemon=True)

    def _main(self) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._shutdown = asyncio.Event()
            engine = self._engine_or_builder
            if not isinstance(engine, AsyncEngine):
                engine = self._built(engine)
            return await serve(
                engine,
                self.config,
                on_listening=self._on_listening,
                on_ready=self._on_ready,
                shutdown=self._shutdown,
            )

        try:
            self.exit_code = asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - handed to the thread that waits
            self.error = e
        finally:
            self._listening.set()
            self._ready.set()

    def _built(self, build: Callable[[], AsyncEngine]) -> Callable[[], AsyncEngine]:
        def run() -> AsyncEngine:
            self.engine = build()
            return self.engine

        return run

    def _on_listening(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        self._listening.set()

    def _on_ready(self, endpoints: Endpoints) -> None:
        self._ready.set()

    def start(self, timeout: float = 60.0, *, wait_ready: bool = True) -> Endpoints:
        """Starts the servers; returns their endpoints once the engine is ready (or, with
        `wait_ready=False`, once the ports are bound; `wait_ready()` waits for the rest)."""
        self._thread.start()
        event = self._ready if wait_ready else self._listening
        if not event.wait(timeout):
            raise TimeoutError(f"the servers did not start within {timeout}s")
        if self.endpoints is None or (wait_ready and self.error is not None):
            raise RuntimeError("the servers failed to start") from self.error
        return self.endpoints

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Waits until the engine is ready and requests are taken."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the engine was not ready within {timeout}s")
        if self.error is not None:
            raise RuntimeError("the engine failed to start") from self.error

    def stop(self, timeout: float = 60.0) -> int | None:
        """Graceful shutdown; returns the exit code."""
        if self._loop is not None and self._thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self._shutdown.set)
            except RuntimeError:  # the loop already closed
                pass
        return self.wait(timeout)

    def wait(self, timeout: float | None = None) -> int | None:
        """Waits for the servers to exit by themselves; the exit code (None: still running)."""
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.exit_code

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_server(engine_args, config: ServerConfig) -> int:
    """What `xlaserve serve` runs: binds the ports (an `OSError` naming a port in use comes at
    once), loads and warms up the model while health answers "starting", serves until a signal
    or an engine failure, returns the exit code."""
    import time

    from xlaserve.engine.builder import build_engine

    built: list[AsyncEngine] = []
    t0 = time.perf_counter()

    def build() -> AsyncEngine:
        built.append(AsyncEngine(build_engine(engine_args)))
        return built[0]

    def where(endpoints: Endpoints) -> str:
        parts = []
        if endpoints.grpc_port is not None:
            parts.append(f"gRPC on {endpoints.grpc_target}")
        if endpoints.http_port is not None:
            parts.append(f"HTTP on {endpoints.http_url}")
        if endpoints.jetstream_port is not None:
            parts.append(f"JetStream gRPC on {endpoints._host()}:{endpoints.jetstream_port}")
        return ", ".join(parts)

    def listening(endpoints: Endpoints) -> None:
        print(f"xlaserve starting: {where(endpoints)}; loading {engine_args.model!r} "
              "(/health answers 503 until the model is loaded and warmed up)",
              file=sys.stderr, flush=True)  # fmt: skip

    def ready(endpoints: Endpoints) -> None:
        auth = "API key required" if config.api_key else "no API key"
        print(f"xlaserve serving {built[0].model_name!r}: {where(endpoints)} ({auth}); "
              f"ready after {time.perf_counter() - t0:.1f}s", flush=True)  # fmt: skip

    try:
        return asyncio.run(
            serve(build, config, on_listening=listening, on_ready=ready, handle_signals=True)
        )
    finally:
        if built:
            built[0].engine.shutdown()  # releases multi-host followers
