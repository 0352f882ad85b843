"""Grammars compile off the engine thread (mock engine, a fake grammar backend; fast and
device-free): the rest of the batch keeps stepping meanwhile, a compile that fails or times out
fails its request alone, stuck compiles do not starve later ones, compiled grammars are cached.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tests.engine.mock_runner import VOCAB_SIZE, mock_engine, reference_output
from tests.serving.helpers import char_tokenizer
from xlaserve import SamplingParams
from xlaserve.engine.async_engine import AsyncEngine
from xlaserve.errors import InvalidRequestError
from xlaserve.structured.manager import StructuredOutputManager

FAKE_LENGTH = 3  # tokens after which a fake grammar is complete


class FakeMatcher:
    """Allows every token (the mock runner ignores masks anyway); complete after FAKE_LENGTH."""

    def __init__(self) -> None:
        self.accepted: list[int] = []

    def fill_bitmask(self, row) -> None:
        row[:] = -1

    def accept(self, token: int) -> bool:
        self.accepted.append(token)
        return True

    def is_terminated(self) -> bool:
        return len(self.accepted) >= FAKE_LENGTH


class FakeGrammar:
    def new_matcher(self) -> FakeMatcher:
        return FakeMatcher()


class FakeBackend:
    """Takes regexes as instructions: "block" waits for `release`, "boom" raises, "sleep:S"
    sleeps S seconds; anything else compiles at once."""

    name = "fake"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.blocked = threading.Event()  # a "block" compile has started
        self.compiled: list[str] = []  # regexes, in the order their compiles finished
        self.threads: set[threading.Thread] = set()

    def check(self, params) -> None:
        if params.kind != "regex":
            raise InvalidRequestError("structured_outputs", "the fake backend takes regexes")

    def fill_bitmasks(self, matchers, out) -> None:
        for i, matcher in enumerate(matchers):
            matcher.fill_bitmask(out[i])

    def compile(self, params) -> FakeGrammar:
        self.threads.add(threading.current_thread())
        if params.regex == "block":
            self.blocked.set()
            assert self.release.wait(10), "the test never released the compile"
        elif params.regex == "boom":
            raise InvalidRequestError("structured_outputs", "boom: cannot compile this")
        elif params.regex.startswith("sleep:"):
            time.sleep(float(params.regex.split(":")[1]))
        self.compiled.append(params.regex)
        return FakeGrammar()


@pytest.fixture
def fake():
    """make(compile_timeout_s=5.0) -> (an engine over the mock runner with the fake grammar
    backend, the backend); blocked compiles are released and engines shut down afterwards."""
    made = []

    def make(compile_timeout_s: float = 5.0):
        backend = FakeBackend()
        manager = StructuredOutputManager(
            lambda: backend, vocab_size=VOCAB_SIZE, compile_timeout_s=compile_timeout_s
        )
        made.append((mock_engine(tokenizer=char_tokenizer(), structured=manager), backend))
        return made[-1]

    yield make
    for engine, backend in made:
        backend.release.set()
        engine.shutdown()


def constrained(regex: str, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 10)
    return SamplingParams(structured_outputs={"regex": regex}, **kw)


def ids(*tokens: int) -> dict:
    return {"prompt_token_ids": list(tokens)}


def run(engine, until=None, max_steps: int = 500) -> dict:
    """Steps until `until(finished)` (default: nothing left); {request_id: final output}."""
    finished = {}
    for _ in range(max_steps):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if until(finished) if until else not engine.has_unfinished_requests():
            return finished
    raise AssertionError(f"not done after {max_steps} steps; finished: {sorted(finished)}")


def mock_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens)
    return reference_output(prompt, params, max_model_len=64, eos_token_ids=(0,))[0]


def assert_pages_back(engine) -> None:
    m = engine.get_metrics()
    assert m["kv_pages_free"] == m["kv_pages_total"]
    assert m["num_running"] == m["num_waiting"] == 0


def test_other_requests_keep_stepping_while_a_grammar_compiles(fake):
    engine, backend = fake()
    held = engine.add_request("held", ids(1, 2, 3), constrained("block"))
    others = [engine.add_request(None, ids(4, i), SamplingParams(max_tokens=5)) for i in (1, 2)]
    assert backend.blocked.wait(5)
    done = run(engine, until=lambda f: all(r in f for r in others))
    for rid, i in zip(others, (1, 2), strict=True):
        assert done[rid].outputs[0].token_ids == mock_tokens([4, i], 5)
    assert held not in done
    seq = engine.requests[held].seqs[0]
    assert seq.num_computed_tokens == 0 and not seq.output_token_ids  # never scheduled
    assert threading.current_thread() not in backend.threads  # not compiled on this thread
    backend.release.set()
    out = run(engine)[held]
    # The fake grammar is complete after FAKE_LENGTH tokens: "stop", mock tokens 6, 12, 24.
    assert out.outputs[0].token_ids == mock_tokens([1, 2, 3], FAKE_LENGTH) == [6, 12, 24]
    assert out.outputs[0].finish_reason == "stop" and out.error is None
    assert_pages_back(engine)


def test_aborting_a_request_while_its_grammar_compiles(fake):
    engine, backend = fake()
    held = engine.add_request(None, ids(1, 2, 3), constrained("block"))
    assert backend.blocked.wait(5)
    engine.step()
    out = engine.abort_request(held)
    assert out.finished and out.outputs[0].finish_reason == "abort" and out.error is None
    backend.release.set()  # the compile finishes for nobody
    later = engine.add_request(None, ids(5), SamplingParams(max_tokens=3))
    assert run(engine)[later].outputs[0].token_ids == mock_tokens([5], 3)
    assert not engine.structured.has_pending()
    assert_pages_back(engine)


def test_a_failed_compile_fails_that_request_alone(fake):
    engine, backend = fake()
    bad = engine.add_request(None, ids(1, 2, 3), constrained("boom", n=2))
    plain = engine.add_request(None, ids(7, 8), SamplingParams(max_tokens=4))
    good = engine.add_request(None, ids(9), constrained("fine"))
    done = run(engine)
    assert "boom: cannot compile this" in done[bad].error
    assert [c.finish_reason for c in done[bad].outputs] == ["abort", "abort"]
    assert all(not c.token_ids for c in done[bad].outputs)
    assert done[plain].outputs[0].token_ids == mock_tokens([7, 8], 4)
    assert done[good].outputs[0].token_ids == mock_tokens([9], FAKE_LENGTH)
    assert done[plain].error is done[good].error is None
    assert engine.structured.stats.failures == 1
    assert_pages_back(engine)
    # The engine keeps serving constrained requests.
    again = engine.add_request(None, ids(2), constrained("fine again"))
    assert run(engine)[again].outputs[0].finish_reason == "stop"


def test_a_compile_past_the_timeout_fails_that_request_alone(fake):
    engine, backend = fake(compile_timeout_s=0.3)
    stuck = engine.add_request(None, ids(1, 2, 3), constrained("block"))
    plain = engine.add_request(None, ids(7, 8), SamplingParams(max_tokens=4))
    done = run(engine)
    assert not backend.compiled  # failed while its compile was still running
    assert "did not compile within 0.3 s" in done[stuck].error
    assert done[stuck].outputs[0].finish_reason == "abort"
    assert done[plain].outputs[0].token_ids == mock_tokens([7, 8], 4)
    assert done[plain].error is None
    assert_pages_back(engine)
    # Once the stuck compile is over, constrained requests are served again.
    backend.release.set()
    deadline = time.monotonic() + 5
    while not backend.compiled and time.monotonic() < deadline:
        time.sleep(0.01)
    later = engine.add_request(None, ids(2), constrained("quick"))
    assert run(engine)[later].outputs[0].finish_reason == "stop"


def test_a_slow_compile_does_not_time_out_a_quick_one_behind_it(fake):
    engine, _ = fake(compile_timeout_s=0.3)
    slow = engine.add_request(None, ids(1, 2, 3), constrained("sleep:1.0"))
    quick = engine.add_request(None, ids(4), constrained("quick"))
    done = run(engine)
    assert done[slow].error is not None
    assert done[quick].error is None, done[quick].error
    assert done[quick].outputs[0].finish_reason == "stop"


def test_the_same_constraint_compiles_once(fake):
    engine, backend = fake()
    first = engine.add_request(None, ids(1), constrained("block"))
    second = engine.add_request(None, ids(2), constrained("block"))  # while the first compiles
    assert backend.blocked.wait(5)
    backend.release.set()
    done = run(engine)
    assert [done[r].outputs[0].finish_reason for r in (first, second)] == ["stop", "stop"]
    stats = engine.structured.stats
    assert (stats.compiles, stats.cache_hits) == (1, 1)
    third = engine.add_request(None, ids(3), constrained("block"))  # compiled already
    other = engine.add_request(None, ids(3), constrained("block", max_tokens=5))  # same key
    tweaked = engine.add_request(None, ids(3), constrained("block?"))  # another grammar
    done = run(engine)
    assert all(done[r].outputs[0].finish_reason == "stop" for r in (third, other, tweaked))
    assert (stats.compiles, stats.cache_hits) == (2, 3)
    assert backend.compiled == ["block", "block?"]


def test_async_stream_of_a_failed_request_raises_invalid_request(fake):
    engine, _ = fake()
    async_engine = AsyncEngine(engine).start()

    async def main():
        stream = await async_engine.add_request(ids(1, 2, 3), constrained("boom"))
        with pytest.raises(InvalidRequestError, match="boom: cannot compile") as e:
            async for _ in stream:
                pass
        assert e.value.param == "structured_outputs"
        outputs = [o async for o in async_engine.generate(ids(7, 8), SamplingParams(max_tokens=4))]
        assert outputs[-1].outputs[0].token_ids == mock_tokens([7, 8], 4)

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        assert async_engine.shutdown(5)


def test_compiles_that_never_finish_do_not_starve_later_grammars(fake):
    # Both compile workers get stuck ("block" waits for the test, "sleep:3" sleeps): each
    # request fails at the timeout, and a grammar submitted behind them still compiles.
    engine, backend = fake(compile_timeout_s=0.3)
    stuck = [engine.add_request(None, ids(1), constrained(r)) for r in ("block", "sleep:3")]
    quick = engine.add_request(None, ids(2), constrained("quick"))
    start = time.monotonic()
    done = run(engine)
    assert all("did not compile within 0.3 s" in done[r].error for r in stuck)
    assert done[quick].error is None and done[quick].outputs[0].finish_reason == "stop"
    assert time.monotonic() - start < 2.5  # it did not wait for the sleeping compile
    assert_pages_back(engine)
