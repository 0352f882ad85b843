"""Load and cancellation over real loopback servers (mock engine, exact tokens): 200 concurrent
streams, cancelled streams and passed deadlines free their pages within a step, and requests
beyond max_waiting_requests are refused with RESOURCE_EXHAUSTED / 503."""

import asyncio
import json

import grpc
import httpx
import pytest

from tests.engine.mock_runner import reference_output
from tests.serving.helpers import API_KEY, pages_all_free, start_mock_server, wait_until
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.serving.client import AsyncXlaServeClient

KEY = {"Authorization": f"Bearer {API_KEY}"}


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def sse_tokens(http: httpx.AsyncClient, prompt, max_tokens, *, stop_after=None):
    """Streams a completion; returns its token ids (or stops reading after `stop_after`)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "logprobs": 0,
            "ignore_eos": True, "return_tokens_as_token_ids": True}  # fmt: skip
    tokens, chunks = [], 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                tokens += [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]
            chunks += 1
            if stop_after is not None and chunks >= stop_after:
                return tokens  # leaving the block closes the connection
    return tokens


def test_200_concurrent_streams_get_their_tokens_and_free_every_page():
    server, engine, runner = start_mock_server(delay=0.002, max_num_seqs=32, num_pages=128)
    prompts = [[i % 96 + 1, i // 96 + 1, 5] for i in range(200)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    expected = [reference_output(p, params, max_model_len=64)[0] for p in prompts]

    async def via_grpc(client, prompt):
        tokens = []
        async for r in client.generate_stream(prompt, max_tokens=8, ignore_eos=True):
            tokens += [t for s in r.samples for t in s.token_ids]
        return tokens

    async def main():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with (
            AsyncXlaServeClient(server.endpoints.grpc_target, api_key=API_KEY, timeout=60) as c,
            httpx.AsyncClient(base_url=server.endpoints.http_url, headers=KEY, limits=limits,
                              timeout=60) as http,
        ):  # fmt: skip
            jobs = [via_grpc(c, p) if i % 2 else sse_tokens(http, p, 8)
                    for i, p in enumerate(prompts)]  # fmt: skip
            return await asyncio.gather(*jobs)

    try:
        results = run(main())
        assert results == expected
        wait_until(lambda: pages_all_free(engine))
        assert runner.max_batch >= 16  # they really ran side by side
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def slow_server():
    """50 ms per step, so streams can be cancelled midway."""
    server, engine, runner = start_mock_server(delay=0.05, max_num_seqs=8)
    yield server, engine, runner
    server.stop()


def test_cancelled_streams_free_their_pages_within_a_step(slow_server):
    server, engine, runner = slow_server
    long = dict(max_tokens=50, ignore_eos=True)

    async def read_some(client, prompt, n):
        got = []
        async for r in client.generate_stream(prompt, **long):
            got.append(r)
            if len(got) >= n:
                return got  # leaving the generator cancels the call

    async def main():
        async with (
            AsyncXlaServeClient(server.endpoints.grpc_target, api_key=API_KEY, timeout=60) as c,
            httpx.AsyncClient(base_url=server.endpoints.http_url, headers=KEY, timeout=60) as h,
        ):
            keeper = c.generate_stream([9], request_id="keeper", **long)
            await keeper.__anext__()
            # Three gRPC and two HTTP streams, each left after two messages.
            await asyncio.gather(
                *(read_some(c, [i + 1], 2) for i in range(3)),
                *(sse_tokens(h, [i + 20], 50, stop_after=2) for i in range(2)),
            )
            cancelled_at = runner.steps
            await asyncio.to_thread(
                wait_until, lambda: engine.metrics()["num_running"] == 1, 5, 0.002
            )
            assert runner.steps - cancelled_at <= 3
            # A deadline that passes aborts too.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.generate([30], timeout=0.3, **long)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.to_thread(
                wait_until, lambda: engine.metrics()["num_running"] == 1, 5, 0.002
            )
            # A non-streaming HTTP client that gives up aborts too.
            with pytest.raises(httpx.ReadTimeout):
                await h.post("/v1/completions", json={"prompt": [31], **long}, timeout=0.3)
            await asyncio.to_thread(
                wait_until, lambda: engine.metrics()["num_running"] == 1, 5, 0.002
            )
            # Abort by id: the keeper's stream ends with finish_reason "abort".
            assert await c.abort("keeper")
            rest = [r async for r in keeper]
            assert rest[-1].finished and rest[-1].samples[0].finish_reason == "abort"

    run(main())
    wait_until(lambda: pages_all_free(engine), timeout=5)
    metrics = httpx.get(server.endpoints.http_url + "/metrics", headers=KEY).text
    assert 'xlaserve_requests_total{outcome="abort"} 8.0' in metrics


def test_back_pressure_beyond_max_waiting_requests():
    server, engine, runner = start_mock_server(delay=0.02, max_num_seqs=1, max_waiting_requests=2)
    long = dict(max_tokens=40, ignore_eos=True)

    async def main():
        async with (
            AsyncXlaServeClient(server.endpoints.grpc_target, api_key=API_KEY, timeout=60) as c,
            httpx.AsyncClient(base_url=server.endpoints.http_url, headers=KEY, timeout=60) as h,
        ):
            running = c.generate_stream([1], **long)
            await running.__anext__()
            waiting = [asyncio.create_task(c.generate([i + 2], **long)) for i in range(2)]
            await asyncio.to_thread(wait_until, lambda: engine.metrics()["num_waiting"] == 2)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.generate([5], **long)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_waiting_requests" in info.value.details()
            response = await h.post("/v1/completions", json={"prompt": [5], "max_tokens": 2})
            assert response.status_code == 503
            assert "overloaded" in response.json()["error"]["message"]
            await running.aclose()
            results = await asyncio.gather(*waiting)
            assert all(len(r.token_ids) == 40 for r in results)

    try:
        run(main())
        wait_until(lambda: pages_all_free(engine))
    finally:
        server.stop()
