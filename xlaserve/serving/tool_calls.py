"""OpenAI tool calling on /v1/chat/completions: the request's `tools` and `tool_choice`
checked into a `ToolPlan`, and the model's text turned into `tool_calls` (whole responses and
stream deltas).

- `tool_choice="none"`: the tools reach the chat template; the output is plain content.
- `"auto"` (the default with tools): the server's `--tool-call-parser` (hermes, llama3_json)
  reads the free output; text outside calls stays `content`. A server without a parser refuses
  it (param "tool_choice").
- `"required"` / {"type": "function", "function": {"name": ...}}: the output is constrained to
  a JSON schema built from the tools' parameters (`xlaserve.tools.schema`), so it always parses.

Calls get ids "call_<24 hex>", `arguments` is the JSON text the model wrote, and
`finish_reason` becomes "tool_calls" when a sample that called tools stopped by itself. Stream
deltas carry `tool_calls` entries (index, id, type, function.name first, then
function.arguments fragments) that concatenate to the non-streamed call.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from xlaserve.errors import InvalidRequestError
from xlaserve.structured.params import StructuredOutputsParams
from xlaserve.tools import schema
from xlaserve.tools.parsers import (
    Extraction,
    NamedCall,
    RequiredCalls,
    ToolCallParser,
    get_parser,
)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # required/named calls are always enforced; auto never is


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(_Strict):
    name: str
    arguments: str  # JSON text


class MessageToolCall(_Strict):
    """A call in an assistant message of the history."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


def _invalid(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(param, message)


def check_messages(messages) -> None:
    """Tool turns of the history: `tool_calls` only on assistant messages, `tool` messages
    with a `tool_call_id` and content, no content only for an assistant that called tools."""
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.tool_calls is not None and m.role != "assistant":
            raise _invalid("messages", f"{where}: tool_calls is only allowed on assistant messages")
        if m.role == "tool":
            if not m.tool_call_id:
                raise _invalid("messages", f"{where}: a tool message needs tool_call_id")
        elif m.tool_call_id is not None:
            raise _invalid("messages", f"{where}: tool_call_id is only allowed on tool messages")
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise _invalid(
                "messages", f"{where}: content is required (it may be null only for an "
                "assistant message with tool_calls)"
            )  # fmt: skip


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for its prompt, its constraint and its response."""

    tools: list[dict]  # OpenAI tool dicts, for the chat template
    choice: str  # "none" | "auto" | "required" | "function"
    function: str | None = None  # the named function
    parallel: bool = True
    parser: ToolCallParser | None = field(default=None, compare=False)

    @classmethod
    def of(cls, req, parser_name: str | None) -> ToolPlan | None:
        """The plan of a ChatCompletionRequest (None: no tools), checked; bad values raise
        `InvalidRequestError` naming "tools", "tool_choice" or "messages"."""
        check_messages(req.messages)
        choice = req.tool_choice
        if req.tools is None:
            if choice is not None:
                raise _invalid("tool_choice", "tool_choice is only allowed when tools are given")
            return None
        tools = schema.check_tools([t.model_dump(exclude_none=True) for t in req.tools])
        parallel = req.parallel_tool_calls is not False
        if isinstance(choice, NamedToolChoice):
            name = choice.function.name
            schema.find_tool(tools, name)
            return cls(tools, "function", name, parallel, NamedCall(name))
        choice = choice or "auto"
        if choice == "none":
            return cls(tools, "none", parallel=parallel)
        if choice == "required":
            return cls(tools, "required", parallel=parallel, parser=RequiredCalls(parallel))
        if parser_name is None:
            raise _invalid(
                "tool_choice",
                'tool_choice "auto" (the default with tools) needs a tool-call parser: start the '
                'server with --tool-call-parser (hermes, llama3_json), or send "required", '
                '"none" or a named function',
            )
        return cls(tools, "auto", parallel=parallel, parser=get_parser(parser_name))

    @property
    def enforced(self) -> bool:
        return self.choice in ("required", "function")

    def constraint(self) -> StructuredOutputsParams | None:
        """The JSON-schema constraint of a required or named call (None otherwise)."""
        if self.choice == "function":
            return StructuredOutputsParams(json=schema.named_schema(self.tools, self.function))
        if self.choice == "required":
            return StructuredOutputsParams(json=schema.required_schema(self.tools, self.parallel))
        return None

    def formatter(self) -> ToolCallFormatter | None:
        return None if self.parser is None else ToolCallFormatter(self.parser)


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _content(extraction: Extraction, final: bool) -> str:
    """The content of a sample: as written, but without trailing whitespace where it
    preceded tool calls (held back while streaming, since calls may follow)."""
    if final and not extraction.named_calls:
        return extraction.content
    return extraction.content.rstrip()


def _finish(finish_reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and finish_reason == "stop" else finish_reason


@dataclass
class _SampleStream:
    text: str = ""
    content_sent: str = ""
    calls_sent: list[list] = field(default_factory=list)  # [id, arguments sent] per call


class ToolCallFormatter:
    """Turns a chat sample's text into message / delta fields with `tool_calls`."""

    def __init__(self, parser: ToolCallParser) -> None:
        self.parser = parser
        self._streams: dict[int, _SampleStream] = {}

    def choice_body(self, index: int, text: str, finish_reason: str | None, *, stream: bool,
                    first: bool) -> tuple[dict, str | None]:  # fmt: skip
        """({"message": ...} or {"delta": ...}, finish_reason) for choice `index`; a stream
        passes each new piece of text, a whole response the whole text."""
        if stream:
            return self._delta(index, text, finish_reason, first)
        extraction = self.parser.parse(text)
        calls = [
            {"id": new_call_id(), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for c in extraction.named_calls
        ]  # fmt: skip
        text = _content(extraction, final=True)
        message = {"role": "assistant", "content": text if text.strip() else None, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        return {"message": message}, _finish(finish_reason, bool(calls))

    def _delta(self, index: int, text: str, finish_reason: str | None, first: bool):
        s = self._streams.setdefault(index, _SampleStream())
        s.text += text
        final = finish_reason is not None
        extraction = self.parser.parse(s.text) if final else self._partial(s.text)
        settled = final
        if not extraction.valid and s.calls_sent:
            # A call that broke after its name was sent: the calls end where it broke (the
            # whole-text answer would be plain content; a stream cannot take sent calls back).
            extraction, settled = self._partial(s.text), False
        # Content: none while it is only whitespace (it may all be around tool calls).
        text, content = _content(extraction, settled), ""
        if text.startswith(s.content_sent) and (s.content_sent or text.strip()):
            content = text[len(s.content_sent) :]
            s.content_sent = text
        tool_deltas = []
        for i, call in enumerate(extraction.named_calls):
            if i == len(s.calls_sent):
                call_id = new_call_id()
                s.calls_sent.append([call_id, call.arguments])
                tool_deltas.append(
                    {"index": i, "id": call_id, "type": "function",
                     "function": {"name": call.name, "arguments": call.arguments}}
                )  # fmt: skip
            else:
                sent = s.calls_sent[i][1]
                if call.arguments.startswith(sent) and len(call.arguments) > len(sent):
                    tool_deltas.append(
                        {"index": i, "function": {"arguments": call.arguments[len(sent) :]}}
                    )
                    s.calls_sent[i][1] = call.arguments
        delta: dict = {"role": "assistant"} if first else {}
        delta["content"] = content or (None if s.calls_sent else "")
        if tool_deltas:
            delta["tool_calls"] = tool_deltas
        if final:
            self._streams.pop(index, None)
        return {"delta": delta}, _finish(finish_reason, bool(s.calls_sent))

    def _partial(self, text: str) -> Extraction:
        try:
            return self.parser.extract(text, final=False)
        except ValueError:  # malformed so far: wait for the end, where it becomes content
            return Extraction("")


def plan_tools(req, params, parser_name: str | None) -> ToolPlan | None:
    """The tool plan of a ChatCompletionRequest (None: no tools); a required or named call sets
    its constraint on `params` (SamplingParams), which must not have another one."""
    plan = ToolPlan.of(req, parser_name)
    if plan is not None and plan.enforced:
        if params.structured_outputs is not None:
            raise _invalid(
                "tool_choice",
                f"tool_choice {req.tool_choice.model_dump() if plan.function else plan.choice!r} "
                "constrains the output to tool calls; it cannot be combined with "
                f"{', '.join(req.constraint_sources())}",
            )
        params.structured_outputs = plan.constraint()
    return plan
