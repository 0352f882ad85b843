"""Bad input over both protocols: each case gets the right status and a message naming the
problem, and the server then still answers a normal request."""

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.serving.helpers import API_KEY, AUTH, start_mock_server
from xlaserve.serving.client import build_request
from xlaserve.serving.proto import jetstream_pb2 as js
from xlaserve.serving.proto import jetstream_pb2_grpc as js_grpc
from xlaserve.serving.proto import xlaserve_pb2 as pb
from xlaserve.serving.proto import xlaserve_pb2_grpc as pb_grpc

BIG = 70 << 10  # over the test server's 64 KiB body/message limit
Code = grpc.StatusCode
NAN = float("nan")


@pytest.fixture(scope="module")
def server():
    server, engine, runner = start_mock_server()
    yield server.endpoints
    server.stop()


def gen(prompt=(1, 2, 3), **kw):
    return build_request(list(prompt) if isinstance(prompt, tuple) else prompt, **kw)


def no_prompt():
    return pb.GenerateRequest(sampling_params=pb.SamplingParams(max_tokens=2))


# (name, method, request or callable, metadata, expected code, words the message must contain)
GRPC_CASES = [
    ("empty text prompt", "Generate", gen(""), AUTH, Code.INVALID_ARGUMENT, "prompt is empty"),
    ("no prompt", "Generate", no_prompt(), AUTH, Code.INVALID_ARGUMENT, "prompt is required"),
    ("empty token ids", "Generate", gen([]), AUTH, Code.INVALID_ARGUMENT, "prompt is empty"),
    ("prompt too long", "Generate", gen([1] * 64), AUTH, Code.INVALID_ARGUMENT, "max_model_len"),
    ("token id too big", "Generate", gen([1, 97]), AUTH, Code.INVALID_ARGUMENT, "vocabulary"),
    ("negative token id", "Generate", gen([-1]), AUTH, Code.INVALID_ARGUMENT, "vocabulary"),
    ("negative temperature", "Generate", gen(temperature=-1.0), AUTH, Code.INVALID_ARGUMENT,
     "temperature"),
    ("NaN temperature", "Generate", gen(temperature=NAN), AUTH, Code.INVALID_ARGUMENT,
     "temperature"),
    ("top_p 0", "Generate", gen(top_p=0.0), AUTH, Code.INVALID_ARGUMENT, "top_p"),
    ("top_p > 1", "Generate", gen(top_p=1.5), AUTH, Code.INVALID_ARGUMENT, "top_p"),
    ("n 0", "Generate", gen(n=0), AUTH, Code.INVALID_ARGUMENT, "n must be >= 1"),
    ("max_tokens 0", "Generate", gen(max_tokens=0), AUTH, Code.INVALID_ARGUMENT, "max_tokens"),
    ("max_tokens huge", "Generate", gen(max_tokens=10**9), AUTH, Code.INVALID_ARGUMENT,
     "max_tokens 1000000000 does not fit"),
    ("top_k -2", "Generate", gen(top_k=-2), AUTH, Code.INVALID_ARGUMENT, "top_k"),
    ("min_p 2", "Generate", gen(min_p=2.0), AUTH, Code.INVALID_ARGUMENT, "min_p"),
    ("presence_penalty 3", "Generate", gen(presence_penalty=3.0), AUTH, Code.INVALID_ARGUMENT,
     "presence_penalty"),
    ("repetition_penalty 0", "Generate", gen(repetition_penalty=0.0), AUTH,
     Code.INVALID_ARGUMENT, "repetition_penalty"),
    ("logprobs 21", "Generate", gen(logprobs=21), AUTH, Code.INVALID_ARGUMENT, "logprobs"),
    ("stop token out of vocab", "Generate", gen(stop_token_ids=[500]), AUTH,
     Code.INVALID_ARGUMENT, "stop_token_ids"),
    ("logit_bias key out of vocab", "Generate", gen(logit_bias={500: 1.0}), AUTH,
     Code.INVALID_ARGUMENT, "logit_bias"),
    ("logit_bias too large", "Generate", gen(logit_bias={1: 1e3}), AUTH, Code.INVALID_ARGUMENT,
     "logit_bias[1]"),
    ("min_tokens > max_tokens", "Generate", gen(min_tokens=5, max_tokens=2), AUTH,
     Code.INVALID_ARGUMENT, "min_tokens"),
    ("empty stop string", "Generate", gen(stop=[""]), AUTH, Code.INVALID_ARGUMENT, "stop"),
    ("unknown model", "Generate", gen(model="gpt-9"), AUTH, Code.NOT_FOUND, "'gpt-9'"),
    ("missing API key", "Generate", gen(), (), Code.UNAUTHENTICATED, "missing API key"),
    ("wrong API key", "Generate", gen(), (("authorization", "Bearer nope"),),
     Code.UNAUTHENTICATED, "invalid API key"),
    ("oversized message", "Generate", gen("x" * BIG), AUTH, Code.RESOURCE_EXHAUSTED, "larger"),
    ("abort without id", "Abort", pb.AbortRequest(), AUTH, Code.INVALID_ARGUMENT, "request_id"),
    ("model info without key", "GetModelInfo", pb.GetModelInfoRequest(), (),
     Code.UNAUTHENTICATED, "API key"),
    ("jetstream session_cache", "Decode",
     js.DecodeRequest(session_cache="x", text_content={"text": "Hi"}), AUTH,
     Code.INVALID_ARGUMENT, "session_cache"),
    ("jetstream no content", "Decode", js.DecodeRequest(max_tokens=2), AUTH,
     Code.INVALID_ARGUMENT, "content is required"),
    ("jetstream negative max_tokens", "Decode",
     js.DecodeRequest(max_tokens=-1, token_content={"token_ids": [1]}), AUTH,
     Code.INVALID_ARGUMENT, "max_tokens"),
    ("jetstream token out of vocab", "Decode",
     js.DecodeRequest(max_tokens=2, token_content={"token_ids": [1000]}), AUTH,
     Code.INVALID_ARGUMENT, "vocabulary"),
    ("jetstream empty text", "Decode", js.DecodeRequest(text_content={"text": ""}), AUTH,
     Code.INVALID_ARGUMENT, "prompt is empty"),
    ("jetstream without key", "Decode",
     js.DecodeRequest(max_tokens=2, token_content={"token_ids": [1]}), (),
     Code.UNAUTHENTICATED, "API key"),
    ("health of an unknown service", "Check", health_pb2.HealthCheckRequest(service="nope"), (),
     Code.NOT_FOUND, "unknown service 'nope'"),
]  # fmt: skip

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
OK_BODY = {"model": "mock", "prompt": [1, 2, 3], "max_tokens": 2}
MSG = [{"role": "user", "content": "Hi"}]


def body(**kw):
    return {**OK_BODY, **kw}


def chat(**kw):
    return {"model": "mock", "messages": MSG, "max_tokens": 2, **kw}


# (name, method, path, json body or raw bytes, headers, status, words in the message)
KEY = {"Authorization": f"Bearer {API_KEY}"}
HTTP_CASES = [
    ("malformed JSON", "POST", COMPLETIONS, b'{"prompt": [1, 2', KEY, 400, "not valid JSON"),
    ("body not an object", "POST", COMPLETIONS, b"[1, 2]", KEY, 400, "JSON object"),
    ("missing prompt", "POST", COMPLETIONS, {"model": "mock"}, KEY, 400, "prompt is required"),
    ("empty prompt", "POST", COMPLETIONS, body(prompt=""), KEY, 400, "prompt is empty"),
    ("empty prompt list", "POST", COMPLETIONS, body(prompt=[]), KEY, 400, "prompt is empty"),
    ("prompt of wrong type", "POST", COMPLETIONS, body(prompt=12), KEY, 400, "prompt must be"),
    ("prompt too long", "POST", COMPLETIONS, body(prompt=[1] * 64), KEY, 400, "max_model_len"),
    ("token ids out of range", "POST", COMPLETIONS, body(prompt=[1, 97]), KEY, 400,
     "vocabulary"),
    ("negative temperature", "POST", COMPLETIONS, body(temperature=-0.5), KEY, 400,
     "temperature"),
    ("NaN temperature", "POST", COMPLETIONS,
     b'{"prompt": [1, 2], "max_tokens": 2, "temperature": NaN}', KEY, 400, "temperature"),
    ("temperature of wrong type", "POST", COMPLETIONS, body(temperature="hot"), KEY, 400,
     "temperature"),
    ("top_p 0", "POST", COMPLETIONS, body(top_p=0), KEY, 400, "top_p"),
    ("top_p > 1", "POST", COMPLETIONS, body(top_p=1.1), KEY, 400, "top_p"),
    ("n 0", "POST", COMPLETIONS, body(n=0), KEY, 400, "n must be >= 1"),
    ("n as a string", "POST", COMPLETIONS, body(n="2"), KEY, 400, "n: "),
    ("max_tokens 0", "POST", COMPLETIONS, body(max_tokens=0), KEY, 400, "max_tokens"),
    ("max_tokens huge", "POST", COMPLETIONS, body(max_tokens=10**9), KEY, 400,
     "max_tokens 1000000000 does not fit"),
    ("max_tokens fractional", "POST", COMPLETIONS, body(max_tokens=1.5), KEY, 400,
     "max_tokens"),
    ("presence_penalty 5", "POST", COMPLETIONS, body(presence_penalty=5), KEY, 400,
     "presence_penalty"),
    ("logprobs 30", "POST", COMPLETIONS, body(logprobs=30), KEY, 400, "logprobs"),
    ("stop of wrong type", "POST", COMPLETIONS, body(stop=5), KEY, 400, "stop"),
    ("logit_bias key not a token", "POST", COMPLETIONS, body(logit_bias={"abc": 1}), KEY, 400,
     "logit_bias"),
    ("echo", "POST", COMPLETIONS, body(echo=True), KEY, 400, "echo"),
    ("best_of", "POST", COMPLETIONS, body(best_of=3), KEY, 400, "best_of"),
    ("stream_options without stream", "POST", COMPLETIONS,
     body(stream_options={"include_usage": True}), KEY, 400, "stream_options"),
    ("unknown field", "POST", COMPLETIONS, body(foo=1), KEY, 400, "'foo'"),
    ("unknown model", "POST", COMPLETIONS, body(model="gpt-9"), KEY, 404, "'gpt-9'"),
    ("missing API key", "POST", COMPLETIONS, body(), {}, 401, "missing API key"),
    ("wrong API key", "POST", COMPLETIONS, body(), {"Authorization": "Bearer x"}, 401,
     "invalid API key"),
    ("metrics without key", "GET", "/metrics", None, {}, 401, "API key"),
    ("oversized body", "POST", COMPLETIONS, body(prompt="x" * BIG), KEY, 413, "larger"),
    ("chat without messages", "POST", CHAT, {"model": "mock"}, KEY, 400,
     "messages is required"),
    ("chat with empty messages", "POST", CHAT, chat(messages=[]), KEY, 400,
     "messages must not be empty"),
    ("chat with a bad role", "POST", CHAT, chat(messages=[{"role": "robot", "content": "x"}]),
     KEY, 400, "messages.0.role"),
    ("chat content of wrong type", "POST", CHAT,
     chat(messages=[{"role": "user", "content": 5}]), KEY, 400, "messages.0.content"),
    ("chat top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=2), KEY, 400,
     "top_logprobs needs logprobs"),
    ("chat top_logprobs 25", "POST", CHAT, chat(logprobs=True, top_logprobs=25), KEY, 400,
     "top_logprobs"),
    ("chat max_completion_tokens 0", "POST", CHAT, chat(max_completion_tokens=0), KEY, 400,
     "max_completion_tokens"),
    ("chat with empty tools", "POST", CHAT, chat(tools=[]), KEY, 400,
     "tools must be a non-empty list"),
    ("unknown route", "GET", "/v1/engines", None, KEY, 404, "/v1/engines"),
    ("wrong method", "GET", COMPLETIONS, None, KEY, 405, "Method Not Allowed"),
]  # fmt: skip


def grpc_call(channel, method, request, metadata):
    if method == "Decode":
        return list(js_grpc.OrchestratorStub(channel).Decode(request, timeout=10,
                                                             metadata=metadata))  # fmt: skip
    if method == "Check":
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
    stub = pb_grpc.XlaServeStub(channel)
    call = getattr(stub, method)(request, timeout=10, metadata=metadata)
    return list(call) if method == "Generate" else call


def assert_grpc_serves(channel):
    responses = grpc_call(channel, "Generate", gen(max_tokens=3), AUTH)
    assert [t for r in responses for s in r.samples for t in s.token_ids] == [6, 12, 24]


def assert_http_serves(http):
    response = http.post(COMPLETIONS, json=body(max_tokens=3, logprobs=0,
                                                return_tokens_as_token_ids=True))  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["logprobs"]["tokens"] == [
        "token_id:6", "token_id:12", "token_id:24"
    ]  # fmt: skip


def test_the_corpus_is_big_enough():
    assert len(GRPC_CASES) + len(HTTP_CASES) >= 40


@pytest.mark.parametrize("case", GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_grpc_bad_input(channel, case):
    name, method, request, metadata, code, words = case
    with pytest.raises(grpc.RpcError) as info:
        grpc_call(channel, method, request, metadata)
    assert info.value.code() == code, info.value.details()
    assert words in info.value.details()
    assert_grpc_serves(channel)


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_http_bad_input(server, http, case):
    name, method, path, content, headers, status, words = case
    kwargs = {"content": content} if isinstance(content, bytes) else {"json": content}
    with httpx.Client(base_url=server.http_url, headers=headers, timeout=30) as client:
        response = client.request(method, path, **({} if content is None else kwargs))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert_http_serves(http)


def test_openai_client_raises_the_matching_errors(server):
    import openai

    client = openai.OpenAI(base_url=server.http_url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="mock", prompt=[1, 2], temperature=-1)
    with pytest.raises(openai.NotFoundError, match="gpt-9"):
        client.completions.create(model="gpt-9", prompt=[1, 2])
    bad_key = openai.OpenAI(base_url=server.http_url + "/v1", api_key="no", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        bad_key.models.list()


def test_refusals_are_counted_by_outcome(server, http):
    def count(outcome):
        text = http.get("/metrics").text
        line = next(x for x in text.splitlines() if f'outcome="{outcome}"' in x)
        return float(line.split()[-1])

    invalid, unauthenticated = count("invalid"), count("unauthenticated")
    assert http.post(COMPLETIONS, json=body(top_p=0)).status_code == 400
    assert httpx.get(server.http_url + "/metrics").status_code == 401
    assert (count("invalid"), count("unauthenticated")) == (invalid + 1, unauthenticated + 1)
