"""Structured outputs in the engine: grammars compiled off the engine thread (cached by backend
and constraint), one matcher per constrained sequence, the token bitmask rows of each step.

The engine holds a constrained request back from scheduling until its grammar is compiled
(`poll`); the rest of the batch keeps stepping meanwhile. A grammar that fails to compile or
takes longer than the timeout fails its request alone.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from xlaserve.structured.backend import CompiledGrammar, GrammarBackend, Matcher, bitmask_width
from xlaserve.structured.params import StructuredOutputsParams

logger = logging.getLogger(__name__)


COMPILE_WORKERS = 2  # a slow grammar does not hold up a quick one submitted after it


@dataclass
class _Compile:
    """One grammar's compile, shared by every request with that constraint."""

    params: StructuredOutputsParams
    future: concurrent.futures.Future
    started: float | None = None  # monotonic time a worker took it (None: still queued)


@dataclass
class _Pending:
    compile: _Compile
    submitted: float
    seq_ids: list[int]

    @property
    def future(self) -> concurrent.futures.Future:
        return self.compile.future


@dataclass
class GrammarStats:
    compiles: int = 0  # grammars compiled (cache misses)
    cache_hits: int = 0
    compile_seconds: float = 0.0
    failures: int = 0
    bitmask_seconds: float = 0.0  # host time filling bitmask rows (on the mask thread)
    # Time the step waited for them after dispatching the forward pass (the forward ran on
    # the device meanwhile).
    bitmask_wait_seconds: float = 0.0


class PendingBitmasks(Mapping):
    """Bitmask rows being filled on the mask thread; reading them waits for the fill."""

    def __init__(self, future: concurrent.futures.Future, stats: GrammarStats) -> None:
        self._future, self._stats = future, stats
        self._rows: dict[int, np.ndarray] | None = None

    def result(self) -> dict[int, np.ndarray]:
        if self._rows is None:
            start = time.perf_counter()
            self._rows = self._future.result()
            self._stats.bitmask_wait_seconds += time.perf_counter() - start
        return self._rows

    def __getitem__(self, seq_id: int) -> np.ndarray:
        return self.result()[seq_id]

    def __iter__(self):
        return iter(self.result())

    def __len__(self) -> int:
        return len(self.result())


class StructuredOutputManager:
    """Owned by one engine thread (compiles run on worker threads of their own).

    The compile timeout counts from when a worker starts the compile; a compile past it fails
    its requests and its worker pool is replaced, so a grammar that never finishes cannot
    starve later ones."""

    def __init__(
        self,
        backend_factory: Callable[[], GrammarBackend],
        *,
        vocab_size: int,
        compile_timeout_s: float = 30.0,
        backend_name: str = "guidance",
    ) -> None:
        self.backend_name = backend_name  # known before the backend is built
        self.width = bitmask_width(vocab_size)
        self.timeout_s = compile_timeout_s
        self._cache: dict[tuple, _Compile] = {}
        self._pool = self._new_pool()
        # The backend wraps the tokenizer (~0.6 s): built in the background from the start,
        # so the first constrained request does not stall the engine thread.
        self._backend_future = self._pool.submit(backend_factory)
        # Bitmasks are filled on a thread of their own while the forward pass runs (the
        # backends release the GIL while they compute masks).
        self._mask_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="xlaserve-bitmask"
        )
        self._pending: dict[str, _Pending] = {}  # request_id -> compile in flight
        self._matchers: dict[int, Matcher] = {}  # seq_id -> matcher
        self.stats = GrammarStats()

    @staticmethod
    def _new_pool() -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(
            COMPILE_WORKERS, thread_name_prefix="xlaserve-grammar"
        )

    @property
    def backend(self) -> GrammarBackend:
        return self._backend_future.result()  # waits only while it is still being built

    # ---- requests ----------------------------------------------------------------------------
    def check(self, params: StructuredOutputsParams) -> None:
        """Fast checks of a constraint (raises InvalidRequestError), on the caller's thread."""
        self.backend.check(params)

    def submit(self, request_id: str, params: StructuredOutputsParams, seq_ids: list[int]) -> None:
        """Starts (or reuses) the compile of the request's grammar."""
        key = (self.backend.name, params.cache_key())
        entry = self._cache.get(key)
        if entry is None or (entry.future.done() and entry.future.exception() is not None):
            entry = _Compile(params, concurrent.futures.Future())
            entry.future = self._pool.submit(self._compile, params, entry)
            self._cache[key] = entry
        else:
            self.stats.cache_hits += 1
        self._pending[request_id] = _Pending(entry, time.monotonic(), list(seq_ids))

    def _compile(self, params: StructuredOutputsParams, entry: _Compile) -> CompiledGrammar:
        entry.started = time.monotonic()
        start = time.perf_counter()
        grammar = self.backend.compile(params)
        self.stats.compiles += 1
        self.stats.compile_seconds += time.perf_counter() - start
        return grammar

    def has_pending(self) -> bool:
        return bool(self._pending)

    def wait(self, timeout: float) -> None:
        """Blocks until a pending compile finishes or `timeout` passes (nothing else to run)."""
        futures = [p.future for p in self._pending.values()]
        concurrent.futures.wait(futures, timeout, concurrent.futures.FIRST_COMPLETED)

    def poll(self, grace_s: float = 0.0) -> tuple[list[str], list[tuple[str, str]]]:
        """(requests whose grammar is ready: their matchers exist now, [(request, error)]).

        A compile submitted less than `grace_s` ago gets the rest of that time to finish, so
        a quick grammar joins this step instead of the next one."""
        fresh = [p for p in self._pending.values() if time.monotonic() - p.submitted < grace_s]
        if fresh:
            left = grace_s - (time.monotonic() - min(p.submitted for p in fresh))
            concurrent.futures.wait([p.future for p in fresh], max(0.0, left))
        ready, failed = [], []
        now = time.monotonic()
        for request_id, p in list(self._pending.items()):
            if not p.future.done():
                started = p.compile.started
                if started is not None and now - started > self.timeout_s:
                    del self._pending[request_id]
                    self.stats.failures += 1
                    self._abandon(p.compile)
                    failed.append((request_id, f"the grammar did not compile within "
                                               f"{self.timeout_s:g} s"))  # fmt: skip
                continue
            del self._pending[request_id]
            try:
                grammar = p.future.result()
                for seq_id in p.seq_ids:
                    self._matchers[seq_id] = grammar.new_matcher()
            except Exception as e:  # noqa: BLE001 - fails this request, never the engine
                self.stats.failures += 1
                for seq_id in p.seq_ids:
                    self._matchers.pop(seq_id, None)
                failed.append((request_id, f"the grammar failed to compile: {e}"))
                continue
            ready.append(request_id)
        return ready, failed

    def _abandon(self, entry: _Compile) -> None:
        """Forgets a compile past its timeout (the next request for that grammar compiles it
        afresh) and gives later compiles a new pool: its worker may never come back."""
        self._cache = {k: v for k, v in self._cache.items() if v is not entry}
        if entry.future.done():
            return
        old, self._pool = self._pool, self._new_pool()
        old.shutdown(wait=False, cancel_futures=True)
        queued = {id(p.compile): p.compile for p in self._pending.values()}
        for waiting in queued.values():  # compiles that had not started move to the new pool
            if waiting.started is None and waiting.future.cancelled():
                waiting.future = self._pool.submit(self._compile, waiting.params, waiting)

    def cancel(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    # ---- sequences ---------------------------------------------------------------------------
    def owns(self, seq_id: int) -> bool:
        return seq_id in self._matchers

    def bitmasks(self, seq_ids: Iterable[int]) -> dict[int, np.ndarray]:
        """The allowed next tokens of each constrained sequence: int32[W] rows."""
        start = time.perf_counter()
        owned = [s for s in seq_ids if s in self._matchers]
        out = np.empty((len(owned), self.width), np.int32)
        if owned:
            self.backend.fill_bitmasks([self._matchers[s] for s in owned], out)
        self.stats.bitmask_seconds += time.perf_counter() - start
        return {seq_id: out[i] for i, seq_id in enumerate(owned)}

    def bitmasks_async(self, seq_ids: list[int]) -> PendingBitmasks:
        """`bitmasks(seq_ids)` filled on the mask thread. Matchers must not advance before
        the result was read (`PendingBitmasks.result()`)."""
        return PendingBitmasks(self._mask_pool.submit(self.bitmasks, seq_ids), self.stats)

    def accept(self, seq_id: int, token: int) -> bool:
        """Advances the sequence's matcher; False if the token broke the constraint."""
        return self._matchers[seq_id].accept(token)

    def is_terminated(self, seq_id: int) -> bool:
        return self._matchers[seq_id].is_terminated()

    def free(self, seq_id: int) -> None:
        self._matchers.pop(seq_id, None)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._mask_pool.shutdown(wait=False, cancel_futures=True)


def resolve_backend_name(name: str) -> str:
    return "guidance" if name == "auto" else name


def make_backend(name: str, tokenizer, *, vocab_size: int, eos_token_ids: tuple[int, ...]):
    """The grammar backend called `name` ("auto" = "guidance")."""
    if name in ("auto", "guidance"):
        from xlaserve.structured.guidance import GuidanceBackend

        return GuidanceBackend(tokenizer, vocab_size=vocab_size, eos_token_ids=eos_token_ids)
    if name == "xgrammar":
        from xlaserve.structured.xgrammar_backend import XGrammarBackend

        return XGrammarBackend(tokenizer, vocab_size=vocab_size, eos_token_ids=eos_token_ids)
    raise ValueError(f"unknown structured outputs backend {name!r}")
