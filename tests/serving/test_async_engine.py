"""AsyncEngine over the hand-checkable mock runner: exact tokens, concurrency, abort, refusal,
draining shutdown, and a failing step that errors every stream instead of hanging."""

import asyncio

import pytest

from tests.engine.mock_runner import reference_output
from tests.serving.helpers import controlled_mock_engine, pages_all_free, wait_until
from xlaserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineStoppedError, State
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.engine.scheduler import QueueFullError


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def final(engine: AsyncEngine, prompt, params, **kw):
    last = None
    async for out in engine.generate(prompt, params, **kw):
        last = out
    return last


def test_tokens_follow_the_mock_rule_and_pages_come_back():
    engine = AsyncEngine(controlled_mock_engine(max_num_seqs=4)).start()

    async def main():
        # [1, 2, 3] -> 6, 12, 24, 48 (sum of everything so far, mod 97).
        out = await final(engine, {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4))
        assert out.outputs[0].token_ids == [6, 12, 24, 48]
        assert out.finished and out.outputs[0].finish_reason == "length"
        # 30 requests at once through 4 sequence slots: each gets the tokens it gets alone.
        prompts = [[i % 90 + 1, 2, i % 7] for i in range(30)]
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        outs = await asyncio.gather(*(final(engine, {"prompt_token_ids": p}, params)
                                      for p in prompts))  # fmt: skip
        for p, o in zip(prompts, outs, strict=True):
            assert o.outputs[0].token_ids == reference_output(p, params, max_model_len=64)[0]

    run(main())
    wait_until(lambda: pages_all_free(engine))
    assert engine.shutdown(5)
    assert engine.state is State.STOPPED


def test_refusals_name_the_problem_and_the_engine_goes_on():
    engine = AsyncEngine(controlled_mock_engine(max_num_seqs=1, max_waiting_requests=1)).start()
    engine.engine.runner.delay = 0.02

    async def main():
        with pytest.raises(ValueError, match="vocabulary"):
            await engine.add_request({"prompt_token_ids": [97]})
        with pytest.raises(ValueError, match="max_tokens 100 does not fit.*max_model_len is 64"):
            await engine.add_request("Hello", SamplingParams(max_tokens=100))
        # check_length=False: cut at max_model_len instead (JetStream's behaviour).
        stream = await engine.add_request(
            "Hello", SamplingParams(max_tokens=100, ignore_eos=True), check_length=False
        )
        running = [o async for o in stream][-1]
        assert len(running.outputs[0].token_ids) == 64 - 5
        assert running.outputs[0].finish_reason == "length"
        long = SamplingParams(max_tokens=40, ignore_eos=True)
        first = await engine.add_request({"prompt_token_ids": [1]}, long)
        await first.__anext__()  # running now; the next one waits
        await engine.add_request({"prompt_token_ids": [2]}, long)
        with pytest.raises(QueueFullError, match="max_waiting_requests"):
            await engine.add_request({"prompt_token_ids": [3]}, long)
        assert await engine.abort(first.request_id)
        assert not await engine.abort("no-such-request")
        rest = [o async for o in first]
        assert rest[-1].outputs[0].finish_reason == "abort"
        params = SamplingParams(max_tokens=2)
        out = await final(engine, "Hi", params)  # "Hi" = [41, 74] -> 115 % 97 = 18, then 36
        assert out.outputs[0].token_ids == [18, 36]
        assert out.outputs[0].text == "1C"  # chr(18 + 31), chr(36 + 31)

    run(main())
    assert engine.shutdown(5) is True


def test_leaving_a_stream_early_aborts_its_request():
    engine = AsyncEngine(controlled_mock_engine(delay=0.01)).start()

    async def main():
        params = SamplingParams(max_tokens=50, ignore_eos=True)
        async for out in engine.generate({"prompt_token_ids": [1, 2]}, params):
            if len(out.outputs[0].token_ids) >= 2:
                break

    run(main())
    wait_until(lambda: pages_all_free(engine), timeout=2)
    assert engine.engine.runner.steps < 20  # not run to its 50 tokens
    engine.shutdown(5)


def test_shutdown_drains_in_flight_requests_and_refuses_new_ones():
    engine = AsyncEngine(controlled_mock_engine(delay=0.01)).start()

    async def main():
        stream = await engine.add_request(
            {"prompt_token_ids": [1]}, SamplingParams(max_tokens=20, ignore_eos=True)
        )
        drained = asyncio.create_task(engine.shutdown_async(10))
        await asyncio.sleep(0.05)
        with pytest.raises(EngineStoppedError, match="shutting down"):
            await engine.add_request({"prompt_token_ids": [1]})
        outs = [o async for o in stream]
        assert len(outs[-1].outputs[0].token_ids) == 20
        assert await drained is True

    run(main())
    assert engine.state is State.STOPPED


def test_shutdown_timeout_aborts_what_is_left():
    engine = AsyncEngine(controlled_mock_engine(delay=0.02)).start()

    async def main():
        stream = await engine.add_request(
            {"prompt_token_ids": [1]}, SamplingParams(max_tokens=50, ignore_eos=True)
        )
        assert await engine.shutdown_async(0.1) is False
        outs = [o async for o in stream]
        assert outs[-1].outputs[0].finish_reason == "abort"

    run(main())


def test_a_failing_step_errors_every_stream_and_later_calls():
    engine = AsyncEngine(controlled_mock_engine(delay=0.01))
    deaths = []
    engine.add_death_callback(deaths.append)
    engine.start()

    async def main():
        params = SamplingParams(max_tokens=50, ignore_eos=True)
        streams = [await engine.add_request({"prompt_token_ids": [i + 1]}, params)
                   for i in range(3)]  # fmt: skip
        await streams[0].__anext__()
        engine.engine.runner.fail.set()
        for stream in streams:
            with pytest.raises(EngineDeadError, match="injected fault"):
                async for _ in stream:
                    pass
        with pytest.raises(EngineDeadError):
            await engine.add_request({"prompt_token_ids": [1]})

    run(main())
    assert engine.state is State.DEAD and not engine.is_serving
    assert len(deaths) == 1 and "injected fault" in str(deaths[0])
    assert engine.shutdown(1) is True  # returns at once on a dead engine


def test_a_caller_that_leaves_while_its_request_is_added_leaves_nothing_running():
    # Steps take 100 ms, so each add waits in the command queue while a step runs.
    engine = AsyncEngine(controlled_mock_engine(delay=0.1)).start()

    async def main():
        params = SamplingParams(max_tokens=30, ignore_eos=True)
        first = await engine.add_request({"prompt_token_ids": [1]}, params)
        await first.__anext__()
        for wait in (0.0, 0.03):  # cancelled at once, or while a step runs
            task = asyncio.create_task(engine.add_request({"prompt_token_ids": [2]}, params))
            await asyncio.sleep(wait)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await engine.abort(first.request_id)

    run(main())
    wait_until(lambda: pages_all_free(engine), timeout=3)
    assert engine.is_serving
    assert engine.shutdown(5)
