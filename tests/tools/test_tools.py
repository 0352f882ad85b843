"""Tool calling apart from any protocol: the tool-call parsers (hermes, llama3_json and the
readers of constrained output), the schemas that enforce required / named calls, and the chat
template with its fallback for templates without tools."""

import json

import jsonschema
import pytest

from tests.serving.helpers import CHAT_TEMPLATE, char_tokenizer
from xlaserve.errors import InvalidRequestError
from xlaserve.tools import schema
from xlaserve.tools.parsers import (
    HermesParser,
    Llama3JsonParser,
    NamedCall,
    RequiredCalls,
    get_parser,
)
from xlaserve.tools.template import (
    TOOLS_PREAMBLE,
    fallback_messages,
    template_inputs,
    template_supports_tools,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
TOOLS = [WEATHER, ADD]


def calls_of(extraction):
    return [(c.name, json.loads(c.arguments)) for c in extraction.calls]


# ---- hermes ---------------------------------------------------------------------------------
def test_hermes_single_call():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    result = HermesParser().parse(text)
    assert result.valid and result.content == ""
    assert calls_of(result) == [("get_weather", {"city": "Paris"})]
    assert result.calls[0].arguments == '{"city": "Paris"}'  # the model's own JSON text


def test_hermes_multiple_calls_with_surrounding_text():
    text = (
        "Let me look.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n'
        '</tool_call>\n<tool_call>{"name": "add", "parameters": {"a": 1, "b": 2}}</tool_call>'
        " Done."
    )
    result = HermesParser().parse(text)
    assert result.content == "Let me look.\n\n Done."
    assert calls_of(result) == [
        ("get_weather", {"city": "Oslo", "unit": "celsius"}),
        ("add", {"a": 1, "b": 2}),
    ]


def test_hermes_unclosed_last_call_counts_when_its_json_is_complete():
    result = HermesParser().parse('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n')
    assert calls_of(result) == [("add", {"a": 1})]


def test_hermes_no_arguments_means_an_empty_object():
    assert HermesParser().parse('<tool_call>{"name": "now"}</tool_call>').calls[0].arguments == "{}"


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name": "add", "arguments": {"a": 1]}</tool_call>',  # bad JSON
        '<tool_call>{"arguments": {"a": 1}}</tool_call>',  # no name
        '<tool_call>{"name": 5, "arguments": {}}</tool_call>',  # name not a string
        '<tool_call>{"name": "add", "arguments": "a=1"}</tool_call>',  # arguments not an object
        '<tool_call>{"name": "add", "arguments": {"a": 1',  # cut short
        "<tool_call>add(1, 2)</tool_call>",  # not JSON
        '<tool_call>{"name": "add"} trailing</tool_call>',
        'ok <tool_call>{"name": "add"}</tool_call> <tool_call>{"name": </tool_call>',
    ],
)
def test_hermes_malformed_calls_are_plain_content(text):
    result = HermesParser().parse(text)
    assert not result.valid and result.calls == [] and result.content == text


def test_hermes_text_without_calls_is_content_unchanged():
    text = '  The answer is {"a": 1} and <tool> is not a marker.\n'
    result = HermesParser().parse(text)
    assert result.valid and result.content == text and result.calls == []


# ---- llama3_json ----------------------------------------------------------------------------
def test_llama3_json_single_call_with_parameters():
    result = Llama3JsonParser().parse('{"name": "add", "parameters": {"a": 1, "b": 2}}')
    assert result.content == "" and calls_of(result) == [("add", {"a": 1, "b": 2})]


def test_llama3_json_python_tag_and_several_calls():
    text = (
        'Calling.<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
        '{"name": "get_weather", "arguments": {"city": "Rome"}}'
    )
    result = Llama3JsonParser().parse(text)
    assert result.content == "Calling."
    assert calls_of(result) == [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Rome"})]


def test_llama3_json_text_after_the_calls_is_content():
    result = Llama3JsonParser().parse('{"name": "add", "parameters": {}}\nThat is all.')
    assert result.content == "That is all." and calls_of(result) == [("add", {})]


@pytest.mark.parametrize(
    "text",
    [
        "The capital of France is Paris.",
        'I would call {"name": "add"} here',  # JSON inside text is not a call
    ],
)
def test_llama3_json_plain_text_is_content(text):
    result = Llama3JsonParser().parse(text)
    assert result.valid and result.content == text and result.calls == []


@pytest.mark.parametrize(
    "text",
    [
        '{"answer": 4}',  # an object that is not a call
        '{"name": "add", "parameters": {"a": 1}',  # cut short
        '{"name": "add", "parameters": [1, 2]}',
        "<|python_tag|>brave_search.call(query='x')",  # built-in tools are not parsed
    ],
)
def test_llama3_json_malformed_calls_are_plain_content(text):
    result = Llama3JsonParser().parse(text)
    assert not result.valid and result.calls == [] and result.content == text


def test_unknown_parser_names_the_choices():
    with pytest.raises(ValueError, match="hermes"):
        get_parser("mistral_v9")


# ---- constrained outputs --------------------------------------------------------------------
def test_required_calls_array_and_single_object():
    text = '[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", ' \
        '"arguments": {"city": "Nice", "unit": "celsius"}}]'  # fmt: skip
    assert calls_of(RequiredCalls(parallel=True).parse(text)) == [
        ("add", {"a": 1, "b": 2}),
        ("get_weather", {"city": "Nice", "unit": "celsius"}),
    ]
    one = RequiredCalls(parallel=False).parse('{"name": "add", "arguments": {"a": 1, "b": 2}}')
    assert calls_of(one) == [("add", {"a": 1, "b": 2})]


def test_length_cut_constrained_output_keeps_what_is_there():
    cut = '[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_we'
    assert calls_of(RequiredCalls(parallel=True).parse(cut)) == [("add", {"a": 1, "b": 2})]
    partial = NamedCall("add").parse('{"a": 1, "b"')
    assert [(c.name, c.arguments, c.complete) for c in partial.calls] == [
        ("add", '{"a": 1, "b"', False)
    ]


# ---- schemas --------------------------------------------------------------------------------
def test_named_schema_is_the_tool_parameters():
    assert schema.named_schema(TOOLS, "add") == ADD["function"]["parameters"]
    bare = {"type": "function", "function": {"name": "now"}}
    assert schema.named_schema([bare], "now") == {"type": "object"}


@pytest.mark.parametrize("parallel", [True, False])
def test_required_schema_accepts_calls_and_rejects_others(parallel):
    s = schema.required_schema(TOOLS, parallel)
    jsonschema.Draft202012Validator.check_schema(s)
    good = [
        {"name": "add", "arguments": {"a": 1, "b": 2}},
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
    ]
    bad = [
        {"name": "sub", "arguments": {"a": 1, "b": 2}},  # unknown tool
        {"name": "add", "arguments": {"a": 1}},  # missing argument
        {"name": "add", "arguments": {"a": "1", "b": 2}},  # wrong type
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}},
        {"name": "add"},  # no arguments
        {"name": "add", "arguments": {"a": 1, "b": 2}, "extra": 1},
    ]
    wrap = (lambda c: [c]) if parallel else (lambda c: c)
    for call in good:
        jsonschema.validate(wrap(call), s)
    for call in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrap(call), s)
    if parallel:
        jsonschema.validate(good, s)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate([], s)


def test_required_schema_keeps_each_tools_refs():
    point = {
        "type": "function",
        "function": {
            "name": "move",
            "parameters": {
                "type": "object",
                "$defs": {
                    "point": {
                        "type": "object",
                        "properties": {"x": {"type": "integer"}},
                        "required": ["x"],
                    }
                },  # fmt: skip
                "properties": {"to": {"$ref": "#/$defs/point"}},
                "required": ["to"],
            },
        },
    }
    s = schema.required_schema([point, ADD], parallel=True)
    jsonschema.validate([{"name": "move", "arguments": {"to": {"x": 3}}}], s)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "move", "arguments": {"to": {"x": "3"}}}], s)


@pytest.mark.parametrize(
    "tools, words",
    [
        ([], "non-empty list"),
        ([{"type": "function", "function": {"name": "bad name"}}], "function.name"),
        ([ADD, ADD], "unique"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
         "must describe an object"),
        ([{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "integer", "minimum": "zero"}}}}}],
         "tools[0].function.parameters['properties']['a']['minimum'] is not a valid JSON schema"),
    ],
)  # fmt: skip
def test_bad_tools_are_refused_naming_tools(tools, words):
    with pytest.raises(InvalidRequestError) as info:
        schema.check_tools(tools)
    assert info.value.param == "tools" and words in info.value.message


def test_tool_choice_of_an_unknown_function():
    with pytest.raises(InvalidRequestError) as info:
        schema.named_schema(TOOLS, "sub")
    assert info.value.param == "tool_choice" and "'sub'" in info.value.message


# ---- templates ------------------------------------------------------------------------------
TOOLS_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}|{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments.a }}]"
    "{% endfor %} | {% endfor %}"
)


def test_template_without_tools_gets_the_fallback_preamble_and_history():
    tok = char_tokenizer()
    assert tok.chat_template == CHAT_TEMPLATE and not template_supports_tools(tok)
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 1 and 2."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
        {"role": "tool", "tool_call_id": "call_2", "content": "4"},
    ]  # fmt: skip
    messages, kwargs = template_inputs(tok, history, TOOLS)
    assert kwargs == {}
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    preamble = TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t) for t in TOOLS))
    assert messages[0]["content"] == "Be brief.\n\n" + preamble
    assert messages[2]["content"] == (
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    )
    assert messages[3]["content"] == (
        "<tool_response>\n3\n</tool_response>\n<tool_response>\n4\n</tool_response>"
    )
    # Without a system message the preamble is one.
    assert fallback_messages(history[1:2], TOOLS)[0] == {"role": "system", "content": preamble}


def test_template_with_tools_gets_them_as_they_are():
    tok = char_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    assert template_supports_tools(tok)
    history = [
        {"role": "user", "content": "Add."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "add",
                                                         "arguments": '{"a": 7}'}}]},
    ]  # fmt: skip
    messages, kwargs = template_inputs(tok, history, TOOLS)
    assert kwargs == {"tools": TOOLS}
    text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    assert text == "TOOLS:get_weather;add;|user: Add. | assistant: [add 7] | "


def test_intake_renders_tools_and_checks_template_kwargs():
    from xlaserve.engine.intake import RequestIntake

    intake = RequestIntake(char_tokenizer(), vocab_size=97, max_model_len=4096)
    prompt = {"messages": [{"role": "user", "content": "Hi"}], "tools": [ADD]}
    text, ids = intake.parse_prompt(prompt)
    assert text.startswith("system: # Tools") and '"name": "add"' in text
    assert text.endswith("user: Hi | assistant:") and len(ids) > 500
    with pytest.raises(InvalidRequestError) as info:
        intake.parse_prompt({**prompt, "chat_template_kwargs": {"tools": []}})
    assert info.value.param == "chat_template_kwargs"
    with pytest.raises(InvalidRequestError) as info:
        intake.parse_prompt({**prompt, "tools": "add"})
    assert info.value.param == "tools"
