"""Tool calls found in a model's text, whole or while it streams.

Every parser is one function of the text so far, `extract(text, final)`; streaming calls it on
each longer prefix and sends what grew, so a stream reassembles exactly to the whole-text answer:

- `content`: the text outside tool calls. While streaming (`final=False`), text that may still
  turn out to start a tool call (a prefix of a marker at the end) is held back, so `content`
  only ever grows.
- `calls`: one `CallDraft` per call seen so far; a call's `name` is None until its name string
  is complete, and its `arguments` is the raw JSON text of the arguments object as the model
  wrote it (a prefix of the final text while streaming).
- `valid` (final only): False when the output had a tool-call marker but not well-formed calls;
  it is then plain content (the whole text), as vLLM's parsers do.

Parsers for `tool_choice="auto"` (free text, selected with `--tool-call-parser`):
- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen
  and the fallback prompt of `xlaserve.tools.template`); text around the blocks is content; a
  last block the model ended without `</tool_call>` counts when its JSON is complete.
- `llama3_json`: Llama 3.x JSON tool calls: the output starts with a JSON object
  `{"name": ..., "parameters": {...}}` (or "arguments"), optionally after `<|python_tag|>`;
  several calls are separated by ";". Text before `<|python_tag|>` and after the calls is
  content.

For `tool_choice="required"` or a named function the output is constrained to JSON
(`xlaserve.tools.schema`) and read by `RequiredCalls` / `NamedCall`, which keep whatever
complete calls a length-cut output holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from xlaserve.tools.json_scan import Malformed, container_end, object_members, skip_ws


@dataclass
class CallDraft:
    name: str | None
    arguments: str  # raw JSON text of the arguments object (so far)
    complete: bool = False


@dataclass
class Extraction:
    content: str
    calls: list[CallDraft] = field(default_factory=list)
    valid: bool = True

    @property
    def named_calls(self) -> list[CallDraft]:
        """The calls whose name is known, in order (a nameless call hides those after it)."""
        named = []
        for call in self.calls:
            if call.name is None:
                break
            named.append(call)
        return named


class ToolCallParser:
    """`extract(text, final)`; `parse(text)` is the whole-text answer, where malformed calls
    make the text plain content."""

    name = ""

    def extract(self, text: str, final: bool) -> Extraction:
        raise NotImplementedError

    def parse(self, text: str) -> Extraction:
        try:
            result = self.extract(text, final=True)
        except Malformed:
            result = Extraction(text, valid=False)
        if not result.valid:
            return Extraction(text, valid=False)
        return result


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def call_draft(
    text: str, start: int, final: bool, arg_keys: tuple[str, ...]
) -> tuple[CallDraft, int | None]:
    """The call in the object opening at text[start] ({"name": ..., <arg key>: {...}}) and the
    index after it (None while incomplete). Raises `Malformed` for what cannot be a call."""
    members, end = object_members(text, start, final)
    name, arguments = None, ""
    for key, value_start, value_end in members:
        if key == "name" and value_end is not None:
            try:
                name = json.loads(text[value_start:value_end])
            except json.JSONDecodeError as e:
                raise Malformed(f"a tool call's name is not valid JSON: {e}") from None
            if not isinstance(name, str):
                raise Malformed(f"a tool call's name must be a string, got {name!r}")
        elif key in arg_keys:
            if value_start < len(text) and text[value_start] != "{":
                raise Malformed(f"a tool call's {key} must be an object")
            arguments = text[value_start:value_end]  # to the end while incomplete
    if end is None:
        return CallDraft(name, arguments), None
    if name is None:
        raise Malformed("a tool call needs a name")
    try:  # what the scanner cannot see, e.g. mismatched brackets
        json.loads(text[start:end])
    except json.JSONDecodeError as e:
        raise Malformed(str(e)) from None
    return CallDraft(name, arguments or "{}", complete=True), end


class HermesParser(ToolCallParser):
    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"
    arg_keys = ("arguments", "parameters")

    def extract(self, text: str, final: bool) -> Extraction:
        content, calls = [], []
        i = 0
        while True:
            k = text.find(self.start, i)
            if k < 0:
                tail = text[i:]
                content.append(tail if final else tail[: len(tail) - held_back(tail, self.start)])
                break
            content.append(text[i:k])
            begin = k + len(self.start)
            close = text.find(self.end, begin)
            block = text[begin:] if close < 0 else text[begin:close]
            draft = self._block(block, final or close >= 0)
            if draft is None:  # nothing usable yet (or ever: `parse` decides at the end)
                if final or close >= 0:
                    return Extraction("".join(content), calls, valid=False)
                calls.append(CallDraft(None, ""))
                break
            calls.append(draft)
            if close < 0:
                if final and not draft.complete:
                    return Extraction("".join(content), calls, valid=False)
                break
            i = close + len(self.end)
        return Extraction("".join(content), calls)

    def _block(self, block: str, closed: bool) -> CallDraft | None:
        j = skip_ws(block, 0)
        if j == len(block):
            return None if closed else CallDraft(None, "")
        if block[j] != "{":
            return None
        try:
            draft, end = call_draft(block, j, closed, self.arg_keys)
        except Malformed:
            return None
        if closed and (end is None or block[end:].strip()):
            return None
        return draft


class Llama3JsonParser(ToolCallParser):
    name = "llama3_json"
    tag = "<|python_tag|>"
    arg_keys = ("parameters", "arguments")

    def extract(self, text: str, final: bool) -> Extraction:
        lead = skip_ws(text, 0)
        if lead < len(text) and text[lead] == "{":
            before, i = "", lead
        else:
            k = text.find(self.tag)
            if k < 0:
                cut = 0 if final else held_back(text, self.tag)
                return Extraction(text[: len(text) - cut])
            before, i = text[:k], k + len(self.tag)
        calls: list[CallDraft] = []
        while True:
            i = skip_ws(text, i)
            if i == len(text):
                after = ""
                break
            if text[i] != "{":
                if not calls:  # e.g. a built-in tool's python after the tag: not ours
                    return _invalid(text) if final else Extraction(before)
                after = text[i:]
                break
            try:
                draft, end = call_draft(text, i, final, self.arg_keys)
            except Malformed:
                if final:
                    return _invalid(text)
                calls.append(CallDraft(None, ""))
                return Extraction(before, calls)
            calls.append(draft)
            if end is None:
                if final:
                    return _invalid(text)
                return Extraction(before, calls)
            i = skip_ws(text, end)
            if i < len(text) and text[i] == ";":
                i += 1
        if final and not calls:
            return _invalid(text)
        return Extraction(before + after, calls)


def _invalid(text: str) -> Extraction:
    return Extraction(text, valid=False)


class NamedCall(ToolCallParser):
    """Output constrained to the arguments object of one named function."""

    def __init__(self, function: str) -> None:
        self.function = function

    def extract(self, text: str, final: bool) -> Extraction:
        j = skip_ws(text, 0)
        if j == len(text) or text[j] != "{":
            return Extraction("", [CallDraft(self.function, "")] if j == len(text) else [])
        try:
            end = container_end(text, j)
        except Malformed:
            end = None
        return Extraction("", [CallDraft(self.function, text[j:end], end is not None)])


class RequiredCalls(ToolCallParser):
    """Output constrained to a JSON array of calls (`parallel`) or to one call object:
    {"name": ..., "arguments": {...}}."""

    def __init__(self, parallel: bool) -> None:
        self.parallel = parallel

    def extract(self, text: str, final: bool) -> Extraction:
        calls: list[CallDraft] = []
        i = skip_ws(text, 0)
        if self.parallel:
            if i == len(text) or text[i] != "[":
                return Extraction("", calls)
            i += 1
        try:
            while True:
                i = skip_ws(text, i)
                if i < len(text) and text[i] == "," and self.parallel and calls:
                    i = skip_ws(text, i + 1)
                if i == len(text) or text[i] != "{":
                    break
                draft, end = call_draft(text, i, final, ("arguments",))
                calls.append(draft)
                if end is None or not self.parallel:
                    break
                i = end
        except Malformed:
            pass  # a length-cut or odd output: keep the calls before it
        if final:
            calls = [c for c in calls if c.name is not None]
        return Extraction("", calls)


PARSERS: dict[str, type[ToolCallParser]] = {
    HermesParser.name: HermesParser,
    Llama3JsonParser.name: Llama3JsonParser,
}


def get_parser(name: str) -> ToolCallParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown tool-call parser {name!r}; choose one of {sorted(PARSERS)}"
        ) from None
