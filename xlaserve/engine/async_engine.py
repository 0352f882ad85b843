"""The engine for servers: one background thread owns the `LLMEngine` and runs its step loop;
callers on any asyncio event loop add requests and read per-request output streams.

Everything that touches the engine (tokenizing, validating, adding, aborting, stepping) runs on
the engine thread, in the order it was asked for: commands queued while a step runs take effect
before the next step, so an abort frees its pages within one step. Outputs travel back to each
request's event loop with `call_soon_threadsafe`, one callback per loop per step.

A step that raises kills the engine: health callbacks run first, then every in-flight request's
stream raises `EngineDeadError`, and later calls fail at once with it. Nothing ever waits on a
dead engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from xlaserve.engine.intake import PromptType
from xlaserve.engine.llm_engine import LLMEngine
from xlaserve.engine.outputs import RequestOutput
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.errors import InvalidRequestError

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; the engine serves nothing more (restart the process)."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down (draining) or stopped: it takes no new requests."""


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"  # finishing in-flight requests, refusing new ones
    STOPPED = "stopped"
    DEAD = "dead"


class EngineObserver:
    """Hooks the engine thread calls (for metrics). They must not block."""

    def on_request_finished(self, output: RequestOutput) -> None:
        pass

    def on_requests_failed(self, count: int) -> None:
        pass


class RequestStream:
    """The outputs of one request, for `async for` on the event loop that added it.

    Yields cumulative `RequestOutput`s. Only the latest undelivered output is kept (it holds
    everything earlier ones did), so a slow reader skips intermediate ones and memory stays
    bounded. The last one has `finished=True`. Raises `EngineDeadError` if the engine fails.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.loop = loop
        self.finished = False
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def _put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self._error = item
        else:
            self._latest = item
        self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        while self._latest is None and self._error is None:
            self._ready.clear()
            await self._ready.wait()
        if self._latest is not None:
            output, self._latest = self._latest, None
            self.finished = output.finished
            if output.error is not None:  # failed after it was accepted (e.g. its grammar)
                raise InvalidRequestError("structured_outputs", output.error)
            return output
        self.finished = True
        raise self._error


@dataclass
class _Add:
    stream: RequestStream
    prompt: PromptType
    params: SamplingParams
    priority: int
    add_special_tokens: bool
    check_length: bool
    arrival_time: float
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    lora_request: object | None = None  # a LoRARequest


@dataclass
class _Call:
    """Runs `fn()` on the engine thread (what must not race with steps: LoRA registry)."""

    fn: Callable[[], object]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class _Abort:
    request_id: str
    future: concurrent.futures.Future | None = None


@dataclass
class _Stop:
    abort_all: bool


class AsyncEngine:
    """Serves one engine from a background thread (see the module docstring): an `LLMEngine`
    or anything with its interface (add_request / step / abort_request /
    has_unfinished_requests / get_metrics, e.g. the data-parallel engine).

    Read-only model facts (`model_name`, `max_model_len`, `vocab_size`, `dtype`, `tokenizer`,
    `eos_token_ids`) are copied at construction; `metrics()` is a snapshot taken by the engine
    thread after every step.
    """

    def __init__(self, engine: LLMEngine, *, observer: EngineObserver | None = None) -> None:
        self.engine = engine
        self.observer = observer or EngineObserver()  # replaceable before start()
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size
        self.dtype = engine.dtype
        self.tokenizer = engine.tokenizer
        self.eos_token_ids = engine.eos_token_ids
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # state changes vs. enqueueing commands
        self._state = State.NEW
        self._error: EngineDeadError | None = None
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._death_callbacks: list[Callable[[EngineDeadError], None]] = []
        self._metrics = dict(engine.get_metrics(), num_steps=0)
        self._num_steps = 0
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def is_serving(self) -> bool:
        return self._state is State.RUNNING

    @property
    def error(self) -> EngineDeadError | None:
        """Why the engine died, or None."""
        return self._error

    def add_death_callback(self, callback: Callable[[EngineDeadError], None]) -> None:
        """`callback(error)` runs on the engine thread when a step fails, before any stream
        gets the error (so a server can flip its health first)."""
        self._death_callbacks.append(callback)

    def start(self) -> AsyncEngine:
        with self._lock:
            if self._state is not State.NEW:
                return self
            self._state = State.RUNNING
        self._thread = threading.Thread(target=self._run, name="xlaserve-engine", daemon=True)
        self._thread.start()
        return self

    def begin_drain(self) -> None:
        """Refuse new requests from now on; in-flight ones run to completion."""
        with self._lock:
            if self._state is State.RUNNING:
                self._state = State.DRAINING

    def shutdown(self, timeout: float | None = None) -> bool:
        """Drains in-flight requests for up to `timeout` seconds (None: no limit), aborts what
        is left, stops the thread. Blocking; any thread; idempotent. Returns True if no request
        had to be aborted."""
        self.begin_drain()
        with self._lock:
            running = self._thread is not None and self._state is State.DRAINING
            if running:
                self._commands.put(_Stop(abort_all=False))
            elif self._state is State.NEW:
                self._state = State.STOPPED
        if not running:
            if self._thread is not None:
                self._thread.join()
            return True
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return True
        with self._lock:
            self._commands.put(_Stop(abort_all=True))
        self._thread.join()
        return False

    async def shutdown_async(self, timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self.shutdown, timeout)

    # ---- requests --------------------------------------------------------------------------
    async def add_request(
        self,
        prompt: PromptType,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 0,
        add_special_tokens: bool = True,
        check_length: bool = True,
        lora_request=None,
    ) -> RequestStream:
        """Queues a request and returns its output stream once the engine took it.

        `prompt` is text, {"prompt": text}, {"prompt_token_ids": ids} or both keys. With
        `add_special_tokens=False` text is tokenized without BOS (for chat templates). With
        `check_length`, a `max_tokens` that cannot fit after the prompt in `max_model_len` is
        refused instead of being cut short. Raises ValueError (bad input), QueueFullError
        (back-pressure), EngineStoppedError or EngineDeadError. `lora_request`: a
        `LoRARequest` to run it under.
        """
        if request_id is None:
            request_id = f"req-{uuid.uuid4().hex}"
        stream = RequestStream(str(request_id), asyncio.get_running_loop())
        command = _Add(
            stream=stream,
            prompt=prompt,
            params=params or SamplingParams(),
            priority=priority,
            add_special_tokens=add_special_tokens,
            check_length=check_length,
            arrival_time=time.time(),
            lora_request=lora_request,
        )
        self._send(command, refuse_when_draining=True)
        try:
            await asyncio.wrap_future(command.future)
        except asyncio.CancelledError:  # the caller left before the engine took the request
            self.abort_nowait(stream.request_id)
            raise
        return stream

    async def generate(
        self, prompt: PromptType, params: SamplingParams | None = None, **kwargs
    ) -> AsyncIterator[RequestOutput]:
        """`add_request` + iterate its stream; leaving early (break, cancel) aborts it."""
        stream = await self.add_request(prompt, params, **kwargs)
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort_nowait(stream.request_id)

    async def abort(self, request_id: str) -> bool:
        """Aborts a request; True if it was in flight. Its stream ends with finish_reason
        "abort" and its pages are free before the next step."""
        command = _Abort(str(request_id), concurrent.futures.Future())
        self._send(command)
        return await asyncio.wrap_future(command.future)

    def abort_nowait(self, request_id: str) -> None:
        """`abort` without waiting (for cleanup paths); a no-op once the engine stopped."""
        try:
            self._send(_Abort(str(request_id)))
        except (EngineDeadError, EngineStoppedError):
            pass

    async def call(self, fn: Callable[[], object]):
        """fn()'s result, run on the engine thread between steps (its exception is raised)."""
        command = _Call(fn)
        self._send(command)
        return await asyncio.wrap_future(command.future)

    async def add_lora(self, lora_request):
        """Loads a LoRA adapter (`LLMEngine.add_lora`) between steps; its AdapterInfo."""
        return await self.call(lambda: self.engine.add_lora(lora_request))

    async def remove_lora(self, lora_name: str) -> None:
        await self.call(lambda: self.engine.remove_lora(lora_name))

    async def list_loras(self) -> list:
        return await self.call(self.engine.list_loras)

    def metrics(self) -> dict:
        """The engine's counters (`LLMEngine.get_metrics()` plus `num_steps`) as of the last
        step; safe from any thread."""
        return self._metrics

    # ---- the engine thread -----------------------------------------------------------------
    def _send(self, command, *, refuse_when_draining: bool = False) -> None:
        with self._lock:
            if self._state is State.DEAD:
                raise self._error
            if self._state is State.NEW:
                raise EngineStoppedError("the engine is not started (call start())")
            if self._state is State.STOPPED or (
                refuse_when_draining and self._state is State.DRAINING
            ):
                raise EngineStoppedError("the server is shutting down: no new requests")
            self._commands.put(command)

    def _run(self) -> None:
        stopping = False
        try:
            while True:
                busy = self.engine.has_unfinished_requests()
                if stopping and not busy:
                    break
                stop = self._handle_commands(block=not busy)
                if stop is not None:
                    if stop.abort_all:
                        for request_id in list(self._streams):
                            self._abort(request_id)
                        break
                    stopping = True
                if self.engine.has_unfinished_requests():
                    self._deliver(self.engine.step())
                    self._num_steps += 1
                self._metrics = dict(self.engine.get_metrics(), num_steps=self._num_steps)
        except BaseException as e:  # noqa: BLE001 - the loop must report any failure
            self._die(e)
            return
        with self._lock:
            self._state = State.STOPPED
            leftover = self._drain_queue()
        for command in leftover:
            self._refuse(command, EngineStoppedError("the engine stopped"))

    def _handle_commands(self, *, block: bool) -> _Stop | None:
        stop = None
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return None
        while True:
            if isinstance(command, _Add):
                # False: the caller cancelled while waiting, nobody would read the stream.
                if command.future.set_running_or_notify_cancel():
                    self._add(command)
            elif isinstance(command, _Abort):
                found = self._abort(command.request_id)
                _settle(command.future, found)
            elif isinstance(command, _Call):
                try:
                    result = command.fn()
                except Exception as e:  # noqa: BLE001 - the caller gets it
                    _settle(command.future, error=e)
                else:
                    _settle(command.future, result)
            elif isinstance(command, _Stop):
                stop = command if stop is None or command.abort_all else stop
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return stop

    def _add(self, command: _Add) -> None:
        stream = command.stream
        lora = {} if command.lora_request is None else {"lora_request": command.lora_request}
        try:  # tokenized here: the tokenizer is not safe to share between threads
            self.engine.add_request(
                stream.request_id,
                command.prompt,
                command.params,
                arrival_time=command.arrival_time,
                priority=command.priority,
                add_special_tokens=command.add_special_tokens,
                check_length=command.check_length,
                **lora,
            )
        except Exception as e:  # noqa: BLE001 - refused: the caller gets the reason
            command.future.set_exception(e)
            return
        self._streams[stream.request_id] = stream
        command.future.set_result(None)

    def _abort(self, request_id: str) -> bool:
        output = self.engine.abort_request(request_id)
        if output is not None:
            self._deliver([output])
        return output is not None

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if output.finished:
                self._streams.pop(output.request_id, None)
                self.observer.on_request_finished(output)
            if stream is not None:
                by_loop[stream.loop].append((stream, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening
                for stream, output in items:
                    if not output.finished:
                        self._abort(stream.request_id)

    def _die(self, exc: BaseException) -> None:
        logger.exception("engine loop failed; failing %d in-flight requests", len(self._streams))
        error = EngineDeadError(f"the engine failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        with self._lock:
            self._state = State.DEAD
            self._error = error
            leftover = self._drain_queue()
        for callback in self._death_callbacks:
            try:
                callback(error)
            except Exception:  # noqa: BLE001
                logger.exception("death callback failed")
        for command in leftover:
            self._refuse(command, error)
        streams, self._streams = list(self._streams.values()), {}
        self.observer.on_requests_failed(len(streams))
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for stream in streams:
            by_loop[stream.loop].append((stream, error))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:
                pass

    def _drain_queue(self) -> list:
        leftover = []
        while True:
            try:
                leftover.append(self._commands.get_nowait())
            except queue.Empty:
                return leftover

    @staticmethod
    def _refuse(command, error: Exception) -> None:
        if isinstance(command, _Add | _Abort | _Call):
            _settle(command.future, error=error)


def _settle(future: concurrent.futures.Future | None, result=None, *, error=None) -> None:
    """Completes a command's future unless its caller cancelled it (nobody is waiting then).
    `set_running_or_notify_cancel` makes the check and the claim one atomic step."""
    if future is None or not future.set_running_or_notify_cancel():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _put_all(items: list) -> None:
    for stream, item in items:
        stream._put(item)
