"""OpenAI tool calling on /v1/chat/completions: stream deltas that reassemble to the whole
response, request checks over HTTP (mock engine) with the exact `param`, and the official
`openai` client against a real SmolLM2 server (required / named calls that validate, a named
call streamed and whole alike). Parsers, schemas and templates: tests/tools/test_tools.py."""

import json

import httpx
import jsonschema
import pytest

from tests.serving.helpers import API_KEY, start_mock_server
from tests.tools.test_tools import ADD, TOOLS
from xlaserve.serving.tool_calls import ToolCallFormatter
from xlaserve.tools.parsers import HermesParser, Llama3JsonParser, NamedCall, RequiredCalls


# ---- streaming ------------------------------------------------------------------------------
def stream_pieces(parser, pieces, finish="stop"):
    """(content, calls [(id, name, arguments)], finish_reason, deltas) a client reassembles."""
    fmt = ToolCallFormatter(parser)
    deltas, finish_reason = [], None
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        body, finish_reason = fmt.choice_body(
            0, piece, finish if last else None, stream=True, first=i == 0
        )
        deltas.append(body["delta"])
    content = "".join(d.get("content") or "" for d in deltas)
    calls: dict[int, list] = {}
    for d in deltas:
        for entry in d.get("tool_calls", []):
            if "id" in entry:  # the first delta of a call: id, type and name, once
                assert entry["index"] not in calls and entry["type"] == "function"
                calls[entry["index"]] = [entry["id"], entry["function"]["name"], ""]
            else:
                assert set(entry) == {"index", "function"} and "name" not in entry["function"]
            calls[entry["index"]][2] += entry["function"]["arguments"]
    return content, [tuple(calls[i]) for i in sorted(calls)], finish_reason, deltas


def whole(parser, text, finish="stop"):
    body, finish_reason = ToolCallFormatter(parser).choice_body(
        0, text, finish, stream=False, first=True
    )
    message = body["message"]
    calls = [(c["function"]["name"], c["function"]["arguments"])
             for c in message.get("tool_calls", [])]  # fmt: skip
    return message["content"] or "", calls, finish_reason


STREAM_CASES = [
    (HermesParser(), 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
     '"Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>{"name": "add", "arguments": '
     '{"a": 1, "b": 20}}</tool_call>'),
    (HermesParser(), "No tools needed: 2 < 3 and <tool is fine."),
    (HermesParser(), 'Oops <tool_call>{name: "add", "arguments": {"a": 1}}</tool_call>'),
    (Llama3JsonParser(), '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
     '{"name": "get_weather", "parameters": {"city": "Bern"}}'),
    (Llama3JsonParser(), "Plain answer with <|python_ta in it"),
    (NamedCall("get_weather"), '{"city": "Lima", "unit": "fahrenheit"}'),
    (RequiredCalls(parallel=True), '[{"name": "add", "arguments": {"a": 3, "b": 4}}, '
     '{"name": "get_weather", "arguments": {"city": "Kyiv", "unit": "celsius"}}]'),
]  # fmt: skip


@pytest.mark.parametrize("parser, text", STREAM_CASES, ids=range(len(STREAM_CASES)))
def test_stream_deltas_reassemble_to_the_whole_response(parser, text):
    want = whole(parser, text)
    for size in (1, 2, 3, 5, 8, 13, len(text)):
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        content, calls, finish_reason, deltas = stream_pieces(parser, pieces)
        assert (content, [c[1:] for c in calls], finish_reason) == want, size
        assert len({c[0] for c in calls}) == len(calls)
        assert all(c[0].startswith("call_") and len(c[0]) == 29 for c in calls)
        assert deltas[0]["role"] == "assistant"
        if want[1]:  # text of the calls never leaks into content
            assert "<tool_call>" not in content and "python_tag" not in content


def test_a_call_that_breaks_after_its_name_was_streamed_ends_there():
    text = 'Oops <tool_call>{"name": "add", "arguments": {"a": 1]}</tool_call> more'
    assert whole(HermesParser(), text) == (text, [], "stop")  # whole: plain content
    content, calls, finish_reason, _ = stream_pieces(HermesParser(), list(text))
    assert content == "Oops"  # no repeat of the call's text
    assert [c[1:] for c in calls] == [("add", '{"a": 1')]
    assert finish_reason == "tool_calls"


def test_streamed_call_name_comes_before_its_arguments():
    text = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    _, _, _, deltas = stream_pieces(HermesParser(), list(text))
    entries = [e for d in deltas for e in d.get("tool_calls", [])]
    assert entries[0]["function"] == {"name": "add", "arguments": ""}
    assert len(entries) > 5  # the arguments arrive in fragments, as the model writes them
    assert "".join(e["function"]["arguments"] for e in entries) == '{"a": 1, "b": 2}'


def test_finish_reason_tool_calls_only_when_stopped():
    text = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    assert whole(HermesParser(), text)[2] == "tool_calls"
    assert whole(HermesParser(), "just text")[2] == "stop"
    assert whole(NamedCall("add"), '{"a": 1, "b":', finish="length")[2] == "length"


# ---- request checks over HTTP (mock engine) -------------------------------------------------
@pytest.fixture(scope="module")
def http():
    server, _, _ = start_mock_server()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.endpoints.http_url, headers=headers, timeout=30) as client:
        yield client
    server.stop()


def chat(**kw):
    return {"model": "mock", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            **kw}  # fmt: skip


def named(name):
    return {"type": "function", "function": {"name": name}}


BAD_PARAMS = "tools[0].function.parameters"
HTTP_CASES = [
    ("tools empty", chat(tools=[]), "tools", "non-empty list"),
    ("tools not a list", chat(tools={"type": "function"}), "tools", "tools"),
    ("tool without function", chat(tools=[{"type": "function"}]), "tools", "function"),
    ("tool of another type", chat(tools=[{"type": "retrieval", "function": {"name": "f"}}]),
     "tools", "type"),
    ("tool with an unknown field", chat(tools=[{**ADD, "extra": 1}]), "tools", "'tools.0.extra'"),
    ("bad function name", chat(tools=[{"type": "function", "function": {"name": "a b"}}]),
     "tools", "function.name"),
    ("duplicate names", chat(tools=[ADD, ADD]), "tools", "'add' appears twice"),
    ("parameters not a schema", chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "required": "a"}}}]), "tools", BAD_PARAMS),
    ("parameters of an array", chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "array"}}}]), "tools", "must describe an object"),
    ("tool_choice of an unknown tool", chat(tools=TOOLS, tool_choice=named("sub")),
     "tool_choice", "'sub'"),
    ("tool_choice without tools", chat(tool_choice="required"), "tool_choice",
     "only allowed when tools"),
    ("tool_choice none without tools", chat(tool_choice="none"), "tool_choice",
     "only allowed when tools"),
    ("tool_choice of a bad value", chat(tools=TOOLS, tool_choice="sometimes"), "tool_choice",
     "tool_choice"),
    ("tool_choice auto without a parser", chat(tools=TOOLS), "tool_choice",
     "--tool-call-parser"),
    ("required with response_format", chat(tools=TOOLS, tool_choice="required",
                                           response_format={"type": "json_object"}),
     "tool_choice", "response_format"),
    ("tool message without tool_call_id", chat(messages=[
        {"role": "user", "content": "Hi"}, {"role": "tool", "content": "3"}]),
     "messages", "messages[1]: a tool message needs tool_call_id"),
    ("user message without content", chat(messages=[{"role": "user", "content": None}]),
     "messages", "messages[0]: content is required"),
    ("tool_calls on a user message", chat(messages=[{"role": "user", "content": "x",
        "tool_calls": [{"id": "c", "type": "function",
                        "function": {"name": "f", "arguments": "{}"}}]}]),
     "messages", "only allowed on assistant"),
    ("tool call without arguments", chat(messages=[{"role": "assistant", "content": None,
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]}]),
     "messages", "arguments"),
]  # fmt: skip


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_bad_tool_requests_get_400_naming_the_field(http, case):
    _, body, param, words = case
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert words in error["message"], error
    assert http.post("/v1/chat/completions", json=chat()).status_code == 200


# ---- end to end: the openai client against a SmolLM2 server ----------------------------------
MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
GREEDY = dict(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_completion_tokens=96)
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def oai():
    import openai

    from tests.conftest import ENGINE_KWARGS
    from xlaserve.config import EngineArgs
    from xlaserve.engine.async_engine import AsyncEngine
    from xlaserve.engine.builder import build_replica
    from xlaserve.serving.server import ServerConfig, ServerThread

    engine = AsyncEngine(build_replica(EngineArgs(model=MODEL, **ENGINE_KWARGS)))
    config = ServerConfig(grpc_port=0, http_port=0, tool_call_parser="hermes")
    server = ServerThread(engine, config)
    server.start()
    url = server.endpoints.http_url + "/v1"
    yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
    assert server.stop() == 0


def assert_valid_calls(calls):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


@pytest.mark.slow
def test_required_tool_choice_returns_valid_calls(oai):
    choice = oai.chat.completions.create(tool_choice="required", **GREEDY).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert_valid_calls(choice.message.tool_calls)


@pytest.mark.slow
def test_named_function_streams_the_same_call_as_a_whole_response(oai):
    kwargs = dict(tool_choice={"type": "function", "function": {"name": "get_weather"}}, **GREEDY)
    choice = oai.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert_valid_calls([call])

    chunks = list(oai.chat.completions.create(stream=True, **kwargs))
    entries = [e for c in chunks for ch in c.choices for e in ch.delta.tool_calls or []]
    assert entries[0].function.name == "get_weather" and entries[0].id.startswith("call_")
    assert len(entries) > 2  # the arguments came in several fragments
    assert {e.index for e in entries} == {0}
    assert "".join(e.function.arguments or "" for e in entries) == call.function.arguments
    assert [ch.finish_reason for c in chunks for ch in c.choices][-1] == "tool_calls"
    assert not "".join(ch.delta.content or "" for c in chunks for ch in c.choices)


@pytest.mark.slow
def test_history_with_tool_turns_and_auto_choice(oai):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]  # fmt: skip
    kwargs = {**GREEDY, "messages": history, "max_completion_tokens": 24}
    choice = oai.chat.completions.create(tool_choice="auto", **kwargs).choices[0]
    # A 135M model answers in text; whatever it writes parses into content or valid calls.
    if choice.message.tool_calls:
        assert_valid_calls(choice.message.tool_calls)
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")


@pytest.mark.slow
def test_tool_choice_none_and_unsupported_parameters(oai):
    import openai

    choice = oai.chat.completions.create(**{**GREEDY, "max_completion_tokens": 4},
                                         tool_choice="none").choices[0]  # fmt: skip
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason == "length"
    negated = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}  # fmt: skip
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(**{**GREEDY, "tools": [negated]}, tool_choice="required")
    assert info.value.body["param"] == "tools" and "not" in info.value.body["message"]


def test_the_server_option_names_a_known_parser():
    from xlaserve.cli import build_parser
    from xlaserve.serving.context import ServerConfig

    args = build_parser().parse_args(["serve", "--tool-call-parser", "llama3_json"])
    assert args.tool_call_parser == "llama3_json"
    assert ServerConfig(tool_call_parser="hermes").tool_call_parser == "hermes"
    with pytest.raises(ValueError, match="unknown tool-call parser 'nope'"):
        ServerConfig(tool_call_parser="nope")
