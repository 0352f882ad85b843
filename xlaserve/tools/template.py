"""Tools in the chat template, with a fallback for templates that have no tools section.

A template takes tools when rendering with a probe tool shows the tool's name (transformers'
`apply_chat_template(..., tools=[...])`); then tools and the history (assistant `tool_calls`,
`tool` messages) go to it as they are. Otherwise (SmolLM2's template, for one) the fallback
rewrites the conversation into plain messages the template can render, in the Hermes format
that the `hermes` tool-call parser reads:

- a system-message preamble (added to the first system message, or a new one) lists the
  functions as JSON inside <tools></tools> and asks for calls as
  <tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>;
- an assistant message with `tool_calls` becomes its content followed by one such block per
  call;
- `tool` messages become a user message of <tool_response>...</tool_response> blocks
  (consecutive tool messages share one).
"""

from __future__ import annotations

import json

TOOLS_PREAMBLE = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""

_PROBE_NAME = "xlaserve_probe_function"
_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": _PROBE_NAME,
            "description": "probe",
            "parameters": {"type": "object", "properties": {}},
        },
    }
]
_supports_cache: dict[str, bool] = {}


def template_supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders the tools it is given (cached per
    template text)."""
    key = repr(tokenizer.chat_template)
    if key not in _supports_cache:
        probe = [{"role": "user", "content": "hi"}]
        try:
            text = tokenizer.apply_chat_template(probe, tools=_PROBE_TOOLS, tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip
        except Exception:  # noqa: BLE001 - a template that fails on tools has no tools section
            text = ""
        _supports_cache[key] = _PROBE_NAME in text
    return _supports_cache[key]


def has_tool_history(messages: list[dict]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def tool_call_block(call: dict) -> str:
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI sends a JSON string; templates get objects
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    body = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def fallback_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation with tools and tool turns written as plain text (module docstring)."""
    out: list[dict] = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            parts = [m["content"]] if m.get("content") else []
            parts += [tool_call_block(call) for call in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif role == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_responses"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_responses": True})
        else:
            out.append({k: v for k, v in m.items() if k != "tool_calls"})
    out = [{k: v for k, v in m.items() if k != "_tool_responses"} for m in out]
    if tools:
        listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        preamble = TOOLS_PREAMBLE.format(tools=listed)
        if out and out[0].get("role") == "system":
            system = out[0].get("content") or ""
            out[0] = {**out[0], "content": f"{system}\n\n{preamble}" if system else preamble}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def template_inputs(
    tokenizer, messages: list[dict], tools: list[dict] | None
) -> tuple[list[dict], dict]:
    """(messages, extra apply_chat_template kwargs) for a conversation with these tools."""
    if not tools and not has_tool_history(messages):
        return messages, {}
    if template_supports_tools(tokenizer):
        return [_for_template(m) for m in messages], ({"tools": list(tools)} if tools else {})
    return fallback_messages(messages, tools), {}


def _for_template(message: dict) -> dict:
    """A message as tool-aware templates expect it: call arguments as objects (transformers'
    convention; OpenAI sends JSON strings) and text content (never None)."""
    if message.get("role") != "assistant" or not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = dict(call.get("function", {}))
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError:
                pass
        calls.append({**call, "function": function})
    return {**message, "content": message.get("content") or "", "tool_calls": calls}
