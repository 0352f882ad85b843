"""Soak: 1,000 concurrent streams over HTTP and gRPC against one loopback server (mock engine),
twice, with disconnects, cancels, passed deadlines and bad requests mixed in. Afterwards every
page is free, every accepted request either completed with exactly the tokens it gets alone or
was aborted, the server still answers, and memory (RSS) is flat between the two rounds."""

import asyncio
import random
from pathlib import Path

import grpc
import httpx
import pytest

from tests.engine.mock_runner import reference_output
from tests.serving.helpers import API_KEY, pages_all_free, start_mock_server, wait_until
from tests.serving.test_concurrency import sse_tokens
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.serving.client import AsyncXlaServeClient

KEY = {"Authorization": f"Bearer {API_KEY}"}
NUM_STREAMS = 1000
MAX_TOKENS = 6  # streams that run to the end
LONG = 40  # streams that are cut off: long enough to be in flight when they are
RSS_GROWTH_BOUND = 64 << 20  # bytes between the end of round 1 and the end of round 2
# What each stream does: (share, action).
ACTIONS = [(0.3, "http"), (0.3, "grpc"), (0.1, "http_disconnect"), (0.1, "grpc_cancel"),
           (0.1, "grpc_deadline"), (0.05, "http_bad"), (0.05, "grpc_bad")]  # fmt: skip


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def plan(seed: int) -> list[tuple[str, list[int]]]:
    rng = random.Random(seed)
    shares, names = zip(*((s, n) for s, n in ACTIONS), strict=True)
    return [
        (rng.choices(names, shares)[0], [rng.randrange(1, 97) for _ in range(rng.randrange(1, 5))])
        for _ in range(NUM_STREAMS)
    ]


async def one(action: str, prompt: list[int], client, http) -> tuple[str, object]:
    """(what happened, tokens received) for one stream."""
    if action == "http":
        return action, await sse_tokens(http, prompt, MAX_TOKENS)
    if action == "http_disconnect":
        return action, await sse_tokens(http, prompt, LONG, stop_after=1)
    if action == "http_bad":
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": -1}
        response = await http.post("/v1/completions", json=body)
        return action, (response.status_code, response.json()["error"]["param"])
    kwargs = dict(max_tokens=MAX_TOKENS if action == "grpc" else LONG, ignore_eos=True)
    if action == "grpc_bad":
        try:
            await client.generate(prompt, top_p=0.0, **kwargs)
        except grpc.aio.AioRpcError as e:
            return action, e.code()
        return action, "accepted"
    tokens = []
    try:
        timeout = 0.05 if action == "grpc_deadline" else None
        async for reply in client.generate_stream(prompt, timeout=timeout, **kwargs):
            tokens += [t for s in reply.samples for t in s.token_ids]
            if action == "grpc_cancel":
                break  # leaving the stream cancels the call
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
        return "deadline_passed", tokens
    return action, tokens


@pytest.mark.slow
def test_1000_streams_twice_with_faults_leave_nothing_behind():
    # 2 ms per step keeps the cut-off streams in flight when they are cut.
    server, engine, runner = start_mock_server(delay=0.002, max_num_seqs=32, num_pages=512)

    async def round_(seed: int):
        limits = httpx.Limits(max_connections=NUM_STREAMS, max_keepalive_connections=200)
        async with (
            AsyncXlaServeClient(server.endpoints.grpc_target, api_key=API_KEY, timeout=300) as c,
            httpx.AsyncClient(base_url=server.endpoints.http_url, headers=KEY, limits=limits,
                              timeout=300) as http,
        ):  # fmt: skip
            streams = plan(seed)
            results = await asyncio.gather(*(one(a, p, c, http) for a, p in streams))
        return streams, results

    def check(streams, results) -> None:
        for (action, prompt), (outcome, got) in zip(streams, results, strict=True):
            length = MAX_TOKENS if action in ("http", "grpc") else LONG
            params = SamplingParams(max_tokens=length, ignore_eos=True)
            solo = reference_output(prompt, params, max_model_len=64)[0]
            if outcome in ("http", "grpc", "grpc_deadline"):
                assert got == solo, (action, prompt)  # completed: exactly its solo tokens
            elif outcome in ("http_disconnect", "grpc_cancel", "deadline_passed"):
                assert got == solo[: len(got)], (action, prompt)  # a prefix, then aborted
            elif outcome == "http_bad":
                assert got == (400, "temperature")
            else:
                assert got == grpc.StatusCode.INVALID_ARGUMENT, got
        wait_until(lambda: pages_all_free(engine), timeout=30)

    try:
        first = asyncio.run(round_(1))
        check(*first)
        after_first = rss_bytes()
        second = asyncio.run(round_(2))
        check(*second)
        growth = rss_bytes() - after_first
        assert growth < RSS_GROWTH_BOUND, f"RSS grew {growth >> 20} MiB in the second round"
        # Still serving, with its pages back.
        response = httpx.post(server.endpoints.http_url + "/v1/completions", headers=KEY,
                              json={"prompt": [5], "max_tokens": 2}, timeout=30)  # fmt: skip
        assert response.status_code == 200
        m = engine.metrics()
        assert m["num_running"] == m["num_waiting"] == 0
        aborted = [o for r in (first, second) for o, got in r[1]
                   if o in ("http_disconnect", "grpc_cancel", "deadline_passed")
                   and len(got) < LONG]  # fmt: skip
        assert len(aborted) > 100  # the cut-offs really cut requests in flight
    finally:
        assert server.stop() == 0
