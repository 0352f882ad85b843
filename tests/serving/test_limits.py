"""Server limits over HTTP, gRPC and JetStream: samples (n / num_samples) above --max-n and
max_tokens above --max-tokens-cap are refused by field; requests that do not say get their
protocol's default (HTTP: vLLM's; gRPC / JetStream: --max-tokens-default); the server keeps
serving. And fairness: a 1-token request is not starved by a request with many samples.

The mock engine (tests/engine/mock_runner.py): max_model_len 64, next token = sum of all tokens
so far % 97, so prompt [1, 2, 3] gives 6, 12, 24, 48, 96, 95, ... (doubling mod 97, never the
eos 0) and prompt [5] gives 5. The chat template turns [user "Hi"] into 21 tokens."""

import threading

import grpc
import httpx
import pytest

from tests.serving.helpers import AUTH, start_mock_server, wait_until
from tests.serving.test_bad_inputs import (
    CHAT,
    COMPLETIONS,
    KEY,
    assert_grpc_serves,
    assert_http_serves,
    body,
    chat,
    gen,
    grpc_call,
)
from xlaserve.serving.context import ServerConfig
from xlaserve.serving.proto import jetstream_pb2 as js

LIMITS = dict(max_n=4, max_tokens_default=5, max_tokens_cap=20)
DOUBLING = [6, 12, 24, 48, 96, 95, 93, 89, 81, 65, 33, 66, 35, 70, 43, 86, 75, 53, 9, 18]


def doubling(count: int) -> list[int]:
    """The mock's tokens after prompt [1, 2, 3]."""
    out, total = [], 6
    for _ in range(count):
        out.append(total % 97)
        total += total % 97
    return out


@pytest.fixture(scope="module")
def server():
    server, _, _ = start_mock_server(config=LIMITS)
    yield server.endpoints
    server.stop()


def test_doubling_is_the_mock_rule():
    assert doubling(20) == DOUBLING


# ---------------------------------------------------------------- refusals

N_MESSAGE = "{} must be <= 4 (this server's --max-n), got 5"
CAP_MESSAGE = "{} must be <= 20 (this server's --max-tokens-cap), got 21"

# (name, path, body, param, message)
HTTP_REFUSALS = [
    ("completions n", COMPLETIONS, body(n=5), "n", N_MESSAGE.format("n")),
    ("chat n", CHAT, chat(n=5), "n", N_MESSAGE.format("n")),
    ("completions max_tokens", COMPLETIONS, body(max_tokens=21), "max_tokens",
     CAP_MESSAGE.format("max_tokens")),
    ("chat max_tokens", CHAT, chat(max_tokens=21), "max_tokens",
     CAP_MESSAGE.format("max_tokens")),
    ("chat max_completion_tokens", CHAT, chat(max_tokens=None, max_completion_tokens=21),
     "max_completion_tokens", CAP_MESSAGE.format("max_completion_tokens")),
    ("streamed completions n", COMPLETIONS, body(n=5, stream=True), "n", N_MESSAGE.format("n")),
]  # fmt: skip


@pytest.mark.parametrize("case", HTTP_REFUSALS, ids=[c[0] for c in HTTP_REFUSALS])
def test_http_refuses_beyond_the_limits(http, case):
    _, path, json, param, message = case
    response = http.post(path, json=json)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {
        "message": message,
        "type": "invalid_request_error",
        "param": param,
        "code": None,
    }
    assert_http_serves(http)


# (name, method, request, message)
GRPC_REFUSALS = [
    ("Generate n", "Generate", gen(n=5, max_tokens=2), N_MESSAGE.format("n")),
    ("Generate max_tokens", "Generate", gen(max_tokens=21), CAP_MESSAGE.format("max_tokens")),
    ("Decode num_samples", "Decode",
     js.DecodeRequest(num_samples=5, max_tokens=2, token_content={"token_ids": [1, 2, 3]}),
     N_MESSAGE.format("num_samples")),
    ("Decode max_tokens", "Decode",
     js.DecodeRequest(max_tokens=21, token_content={"token_ids": [1, 2, 3]}),
     CAP_MESSAGE.format("max_tokens")),
]  # fmt: skip


@pytest.mark.parametrize("case", GRPC_REFUSALS, ids=[c[0] for c in GRPC_REFUSALS])
def test_grpc_refuses_beyond_the_limits(channel, case):
    _, method, request, message = case
    with pytest.raises(grpc.RpcError) as info:
        grpc_call(channel, method, request, AUTH)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == message
    assert_grpc_serves(channel)


def test_the_limits_themselves_are_accepted(http, channel):
    response = http.post(COMPLETIONS, json=body(n=4, max_tokens=20))
    assert response.status_code == 200, response.text
    assert [c["text"] for c in response.json()["choices"]] == [
        response.json()["choices"][0]["text"]
    ] * 4
    assert response.json()["usage"]["completion_tokens"] == 4 * 20
    responses = grpc_call(channel, "Generate", gen(n=4, max_tokens=20), AUTH)
    tokens = [[] for _ in range(4)]
    for r in responses:
        for s in r.samples:
            tokens[s.index].extend(s.token_ids)
    assert tokens == [DOUBLING] * 4
    request = js.DecodeRequest(num_samples=4, max_tokens=20, token_content={"token_ids": [1, 2, 3]})
    samples = [[] for _ in range(4)]
    for r in grpc_call(channel, "Decode", request, AUTH):
        for i, s in enumerate(r.stream_content.samples):
            samples[i].extend(s.token_ids)
    assert samples == [DOUBLING] * 4


# ---------------------------------------------------------------- defaults


def completion_tokens(http, path: str, json: dict) -> tuple[int, str]:
    response = http.post(path, json=json)
    assert response.status_code == 200, response.text
    data = response.json()
    return data["usage"]["completion_tokens"], data["choices"][0]["finish_reason"]


def test_http_defaults(http):
    no_max = {k: v for k, v in body().items() if k != "max_tokens"}
    # completions: OpenAI's and vLLM's 16 (below the cap of 20)
    assert completion_tokens(http, COMPLETIONS, no_max) == (16, "length")
    # an explicit null: as much as fits, here limited by the cap
    assert completion_tokens(http, COMPLETIONS, {**no_max, "max_tokens": None}) == (20, "length")
    # chat: as much as fits (43 after the 21-token prompt), limited by the cap
    no_max_chat = {k: v for k, v in chat().items() if k != "max_tokens"}
    assert completion_tokens(http, CHAT, no_max_chat) == (20, "length")


def test_a_capped_default_that_does_not_fit_is_cut_not_refused(http):
    # "user: " + 30 characters + " | assistant:" = 49 tokens: room for 15, below the cap of 20.
    messages = [{"role": "user", "content": "x" * 30}]
    request = {"model": "mock", "messages": messages, "ignore_eos": True}
    assert completion_tokens(http, CHAT, request) == (15, "length")
    # The same ask made explicitly is refused as before: it does not fit.
    response = http.post(CHAT, json={**request, "max_tokens": 20})
    assert response.status_code == 400 and "does not fit" in response.text


def test_grpc_and_jetstream_default_to_max_tokens_default(channel):
    responses = grpc_call(channel, "Generate", gen(), AUTH)  # no sampling settings
    assert [t for r in responses for s in r.samples for t in s.token_ids] == DOUBLING[:5]
    assert responses[-1].samples[0].finish_reason == "length"
    for request in (
        js.DecodeRequest(token_content={"token_ids": [1, 2, 3]}),  # max_tokens unset (0)
        js.DecodeRequest(max_tokens=0, num_samples=0, token_content={"token_ids": [1, 2, 3]}),
    ):
        responses = grpc_call(channel, "Decode", request, AUTH)
        assert [t for r in responses for t in r.stream_content.samples[0].token_ids] == (
            DOUBLING[:5]
        )


def test_built_in_defaults():
    config = ServerConfig()
    assert (config.max_n, config.max_tokens_default, config.max_tokens_cap) == (16, 256, None)
    for bad in (dict(max_n=0), dict(max_tokens_default=0), dict(max_tokens_cap=0),
                dict(max_n=True), dict(max_tokens_cap=2.5)):  # fmt: skip
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be an int >= 1"):
            ServerConfig(**bad)


def test_default_server_limits():
    # Without options: n up to 16; gRPC without sampling settings runs to max_model_len (256 >
    # the 61 tokens of room are cut, not refused); HTTP chat runs as far as fits.
    server, _, _ = start_mock_server()
    try:
        endpoints = server.endpoints
        with httpx.Client(base_url=endpoints.http_url, headers=KEY, timeout=30) as http:
            assert http.post(COMPLETIONS, json=body(n=16)).status_code == 200
            response = http.post(COMPLETIONS, json=body(n=17))
            assert response.status_code == 400
            assert response.json()["error"]["message"] == (
                "n must be <= 16 (this server's --max-n), got 17"
            )
            no_max_chat = {k: v for k, v in chat().items() if k != "max_tokens"}
            count, _ = completion_tokens(http, CHAT, {**no_max_chat, "ignore_eos": True})
            assert count == 64 - 21
        with grpc.insecure_channel(endpoints.grpc_target) as channel:
            responses = grpc_call(channel, "Generate", gen(), AUTH)
            assert [t for r in responses for s in r.samples for t in s.token_ids] == doubling(61)
            assert responses[-1].samples[0].finish_reason == "length"
    finally:
        server.stop()


def test_serve_flags_reach_the_config():
    from xlaserve.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--max-n", "8", "--max-tokens-default", "100", "--max-tokens-cap", "500"]
    )
    assert (args.max_n, args.max_tokens_default, args.max_tokens_cap) == (8, 100, 500)
    args = build_parser().parse_args(["serve"])
    assert (args.max_n, args.max_tokens_default, args.max_tokens_cap) == (16, 256, None)


# ---------------------------------------------------------------- fairness


def test_a_small_request_finishes_while_a_big_one_runs():
    # 8 slots, 10 ms per step. "big" asks 64 samples of 20 tokens: 8 waves of ~21 steps, ~170
    # steps. Once it fills every slot, "small" (1 token) arrives. It must take the next slot that
    # frees (within one wave, <= 21 steps), not wait behind big's 56 waiting samples (~150).
    server, _, runner = start_mock_server(delay=0.01, config=dict(max_n=64))
    try:
        endpoints = server.endpoints
        big_result = {}

        def run_big():
            with httpx.Client(base_url=endpoints.http_url, headers=KEY, timeout=60) as client:
                big_result["response"] = client.post(
                    COMPLETIONS,
                    json=body(n=64, max_tokens=20, logprobs=0, return_tokens_as_token_ids=True),
                )
                big_result["steps"] = runner.steps

        thread = threading.Thread(target=run_big)
        thread.start()
        wait_until(lambda: runner.max_batch == 8)
        with httpx.Client(base_url=endpoints.http_url, headers=KEY, timeout=60) as http:
            start = runner.steps
            response = http.post(
                COMPLETIONS,
                json=body(prompt=[5], max_tokens=1, logprobs=0, return_tokens_as_token_ids=True),
            )
            small_steps = runner.steps - start
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["logprobs"]["tokens"] == ["token_id:5"]
        assert small_steps <= 25, small_steps
        assert thread.is_alive(), "big finished first: the test proves nothing"
        thread.join(60)
        big = big_result["response"]
        assert big.status_code == 200, big.text
        choices = big.json()["choices"]
        assert len(choices) == 64 and big.json()["usage"]["completion_tokens"] == 64 * 20
        want = [f"token_id:{t}" for t in DOUBLING]  # every sample as when alone
        assert all(c["logprobs"]["tokens"] == want for c in choices)
        assert big_result["steps"] - start > 100
    finally:
        server.stop()
