"""The intake's typed errors reach clients by field: `InvalidRequestError(param, message)` becomes
HTTP 400 with OpenAI's `param` and gRPC INVALID_ARGUMENT, and the engine keeps serving.

The mock engine (tests/engine/mock_runner.py): vocab 97, max_model_len 64, char tokenizer whose
chat template turns [user "Hi"] into "user: Hi | assistant:" (21 tokens)."""

import grpc
import httpx
import pytest

from tests.serving.helpers import AUTH, CHAT_TEMPLATE, char_tokenizer, start_mock_server
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
from xlaserve.errors import InvalidRequestError
from xlaserve.serving.errors import Kind, ServingError, classify


@pytest.fixture(scope="module")
def server():
    server, _, _ = start_mock_server()
    yield server.endpoints
    server.stop()


def refused(http, path: str, json: dict) -> dict:
    """The OpenAI error object of a request that must be refused with 400."""
    response = http.post(path, json=json)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", None)
    return error


# (name, request fields (HTTP body; the gRPC request takes the same), the param both name).
# Token ids: the vocabulary is [0, 97). Lengths: a prompt of 3 leaves room for 61 tokens.
ENGINE_CASES = [
    ("prompt too long", dict(prompt=[1] * 64), "prompt"),
    ("max_tokens does not fit after the prompt", dict(prompt=[1, 2, 3], max_tokens=62),
     "max_tokens"),
    ("prompt token id outside the vocabulary", dict(prompt=[1, 97]), "prompt"),
    ("temperature -1", dict(temperature=-1.0), "temperature"),
    ("top_p 0", dict(top_p=0.0), "top_p"),
    ("logprobs 21", dict(logprobs=21), "logprobs"),
    ("stop_token_ids out of vocab", dict(stop_token_ids=[97]), "stop_token_ids"),
    ("logit_bias key out of vocab", dict(logit_bias={97: 1.0}), "logit_bias"),
    ("logit_bias value out of range", dict(logit_bias={1: 100.5}), "logit_bias"),
]  # fmt: skip


def http_body(fields: dict) -> dict:
    if "logit_bias" in fields:  # JSON object keys are strings
        fields = {**fields, "logit_bias": {str(k): v for k, v in fields["logit_bias"].items()}}
    return body(**fields)


def grpc_request(fields: dict):
    fields = dict(fields)
    return gen(tuple(fields.pop("prompt", (1, 2, 3))), **fields)


@pytest.mark.parametrize("case", ENGINE_CASES, ids=[c[0] for c in ENGINE_CASES])
def test_http_400_names_the_param_and_grpc_gives_invalid_argument(http, channel, case):
    _, fields, param = case
    error = refused(http, COMPLETIONS, http_body(fields))
    assert error["param"] == param, error
    with pytest.raises(grpc.RpcError) as info:
        grpc_call(channel, "Generate", grpc_request(fields), AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # gRPC carries no param; the same typed error gives the same message on both protocols.
    assert info.value.details() == error["message"]
    assert_http_serves(http)
    assert_grpc_serves(channel)


def test_length_limits_are_exact(http, channel):
    # The last prompt length and max_tokens that fit are served; one more is refused above.
    ok = [body(prompt=[1] * 63, max_tokens=1), body(prompt=[1, 2, 3], max_tokens=61)]
    for request in ok:
        response = http.post(COMPLETIONS, json=request)
        assert response.status_code == 200, response.text
    result = grpc_call(channel, "Generate", gen((1,) * 63, max_tokens=1), AUTH)
    assert [t for r in result for s in r.samples for t in s.token_ids] == [63]  # 63 * 1


def test_chat_errors_name_their_param(http):
    # "user: Hi | assistant:" is 21 tokens, leaving room for 43.
    assert refused(http, CHAT, chat(max_tokens=44))["param"] == "max_tokens"
    assert http.post(CHAT, json=chat(max_tokens=43)).status_code == 200
    # The same limit sent as OpenAI's newer field is named as the client sent it.
    error = refused(http, CHAT, chat(max_tokens=None, max_completion_tokens=44))
    assert error["param"] == "max_completion_tokens" and "does not fit" in error["message"]
    # The HTTP layer checks OpenAI's top_logprobs itself and names it.
    error = refused(http, CHAT, chat(logprobs=True, top_logprobs=21))
    assert error["param"] == "top_logprobs"
    assert error["message"] == "top_logprobs must be in [0, 20], got 21"
    assert refused(http, CHAT, chat(temperature=-1))["param"] == "temperature"
    assert refused(http, CHAT, chat(stop_token_ids=[97]))["param"] == "stop_token_ids"
    assert_http_serves(http)


def tokenizer_with_template(template: str | None):
    tok = char_tokenizer()
    tok.chat_template = template
    return tok


@pytest.mark.parametrize(
    "template, message",
    [
        (None, "this model has no chat template"),
        ("{% for m in messages %}{{ m['content'] }", "the chat template failed: "),
        # Renders, then fails: an undefined callable.
        ("{{ no_such_function() }}" + CHAT_TEMPLATE, "the chat template failed: "),
    ],
    ids=["no template", "template syntax error", "template fails when rendered"],
)
def test_chat_without_a_working_template_is_refused_by_messages(template, message):
    server, _, _ = start_mock_server(tokenizer=tokenizer_with_template(template))
    try:
        with httpx.Client(base_url=server.endpoints.http_url, headers=KEY, timeout=30) as http:
            error = refused(http, CHAT, chat())
            assert error["param"] == "messages"
            assert error["message"].startswith(message), error["message"]
            assert_http_serves(http)  # completions still work on the same engine
            with grpc.insecure_channel(server.endpoints.grpc_target) as channel:
                assert_grpc_serves(channel)
    finally:
        assert server.stop() == 0


# ---- classify reads the attribute, never the message ----------------------------------------
def test_classify_takes_param_from_the_attribute():
    error = classify(InvalidRequestError("seed", "temperature is what the message says"))
    assert (error.kind, error.param, error.message) == (
        Kind.INVALID, "seed", "temperature is what the message says"
    )  # fmt: skip
    assert error.openai_body()["error"]["param"] == "seed"
    assert error.kind.http_status == 400
    assert error.kind.grpc_code == grpc.StatusCode.INVALID_ARGUMENT


def test_classify_gives_no_param_for_untyped_or_unnamed_errors():
    plain = classify(ValueError("temperature must be >= 0"))
    assert (plain.kind, plain.param) == (Kind.INVALID, None)
    unnamed = classify(InvalidRequestError(None, "temperature and top_p disagree"))
    assert (unnamed.kind, unnamed.param) == (Kind.INVALID, None)
    assert isinstance(InvalidRequestError("x", "y"), ValueError)
    same = ServingError(Kind.INVALID, "m", param="top_p")
    assert classify(same) is same
