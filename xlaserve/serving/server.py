"""Runs the gRPC and HTTP servers together over one `AsyncEngine`, on one event loop.

Exit codes of `serve`: 0 after a graceful shutdown (SIGTERM/SIGINT or the `shutdown` event:
health turns NOT_SERVING, new requests are refused with UNAVAILABLE / 503, in-flight ones get
`drain_timeout_s` to finish); 1 when the engine failed (health turns NOT_SERVING at once,
in-flight requests fail, and after `failure_exit_delay_s` the servers stop) so that a
supervisor restarts the process instead of it hanging.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from xlaserve.engine.async_engine import AsyncEngine
from xlaserve.serving.context import ServerConfig, ServingContext
from xlaserve.serving.grpc_server import start_grpc_server
from xlaserve.serving.http_server import start_http_server

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

    @property
    def grpc_target(self) -> str:
        return f"{self._host()}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self._host()}:{self.http_port}"

    def _host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host


async def serve(
    engine: AsyncEngine,
    config: ServerConfig,
    *,
    on_ready: Callable[[Endpoints], None] | None = None,
    shutdown: asyncio.Event | None = None,
    handle_signals: bool = False,
) -> int:
    """Starts the engine and both servers, runs until `shutdown` is set (or SIGTERM/SIGINT with
    `handle_signals`) or the engine fails; returns the process exit code."""
    loop = asyncio.get_running_loop()
    shutdown = shutdown or asyncio.Event()
    ctx = ServingContext(engine, config)
    engine.observer = ctx.metrics
    engine.add_death_callback(lambda error: loop.call_soon_threadsafe(ctx.on_engine_death, error))
    engine.start()
    grpc_server = http = None
    code = EXIT_OK
    try:
        grpc_port = http_port = None
        if config.grpc_port is not None:
            grpc_server, grpc_port = await start_grpc_server(ctx, config.host, config.grpc_port)
        if config.http_port is not None:
            http = await start_http_server(ctx, config.host, config.http_port)
            http_port = http[2]
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, shutdown.set)
        if on_ready is not None:
            on_ready(Endpoints(config.host, grpc_port, http_port))
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
        await engine.shutdown_async(0)
    return code


class ServerThread:
    """`serve` on a background thread with its own event loop (tests, embedding):

    with ServerThread(AsyncEngine(engine), ServerConfig(grpc_port=0, http_port=0)) as s:
        client = XlaServeClient(s.endpoints.grpc_target)
    """

    def __init__(self, engine: AsyncEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.endpoints: Endpoints | None = None
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="xlaserve-server", daemon=True)

    def _main(self) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._shutdown = asyncio.Event()
            return await serve(
                self.engine, self.config, on_ready=self._on_ready, shutdown=self._shutdown
            )

        try:
            self.exit_code = asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - handed to the thread that waits
            self.error = e
        finally:
            self._ready.set()

    def _on_ready(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        self._ready.set()

    def start(self, timeout: float = 60.0) -> Endpoints:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the servers did not start within {timeout}s")
        if self.endpoints is None:
            raise RuntimeError("the servers failed to start") from self.error
        return self.endpoints

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
    """What `xlaserve serve` runs: loads the model, serves until a signal or an engine failure,
    returns the exit code."""
    from xlaserve.engine.builder import build_engine

    engine = AsyncEngine(build_engine(engine_args))

    def ready(endpoints: Endpoints) -> None:
        parts = []
        if endpoints.grpc_port is not None:
            parts.append(f"gRPC on {endpoints.grpc_target}")
        if endpoints.http_port is not None:
            parts.append(f"HTTP on {endpoints.http_url}")
        auth = "API key required" if config.api_key else "no API key"
        print(f"xlaserve serving {engine.model_name!r}: {', '.join(parts)} ({auth})", flush=True)

    try:
        return asyncio.run(serve(engine, config, on_ready=ready, handle_signals=True))
    finally:
        engine.engine.shutdown()  # releases multi-host followers
