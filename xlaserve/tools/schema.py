"""Tool definitions checked, and the JSON schema that enforces `tool_choice="required"` or a
named function.

Tools are OpenAI's dicts: {"type": "function", "function": {"name", "description"?,
"parameters"? (a JSON schema of an object), "strict"?}}. The constraint for
- a named function: that function's `parameters` (the output *is* the arguments object);
- `required`: a JSON array of one or more calls (one call object when `parallel_tool_calls` is
  false), each {"name": <const name>, "arguments": <that tool's parameters>}, over all tools
  (vLLM's form). Local `$ref`s of each tool are rewritten to point into the combined schema.
"""

from __future__ import annotations

import copy
import re

from xlaserve.errors import InvalidRequestError

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
PARAM = "tools"


def _invalid(message: str, param: str = PARAM) -> InvalidRequestError:
    return InvalidRequestError(param, message)


def check_tools(tools: object) -> list[dict]:
    """The tools, checked: a non-empty list of function tools with unique valid names and
    parameters that are JSON schemas of objects. Raises `InvalidRequestError("tools", ...)`."""
    if not isinstance(tools, list | tuple) or not tools:
        raise _invalid(f"tools must be a non-empty list of tools, got {tools!r}"[:200])
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _invalid(f'{where} must be {{"type": "function", "function": {{...}}}}')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _invalid(f"{where}.function must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise _invalid(
                f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', got {name!r}"
            )
        if name in seen:
            raise _invalid(f"{where}: tool names must be unique, {name!r} appears twice")
        seen.add(name)
        check_parameters(function.get("parameters"), f"{where}.function.parameters")
    return list(tools)


def check_parameters(parameters: object, where: str) -> None:
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise _invalid(f"{where} must be a JSON schema object, got {type(parameters).__name__}")
    kind = parameters.get("type", "object")
    if kind != "object":
        raise _invalid(f'{where} must describe an object ("type": "object"), got type {kind!r}')
    import jsonschema

    validator = jsonschema.validators.validator_for(
        parameters, default=jsonschema.Draft202012Validator
    )
    try:
        validator.check_schema(parameters)
    except jsonschema.SchemaError as e:
        path = "".join(f"[{p!r}]" for p in e.path)
        raise _invalid(f"{where}{path} is not a valid JSON schema: {e.message}") from None


def find_tool(tools: list[dict], name: str) -> dict:
    for tool in tools:
        if tool["function"]["name"] == name:
            return tool
    known = ", ".join(repr(t["function"]["name"]) for t in tools)
    raise _invalid(f"tool_choice names function {name!r}, which is not in tools ({known})",
                   param="tool_choice")  # fmt: skip


def arguments_schema(tool: dict) -> dict:
    """The JSON schema of a tool's arguments (an object; no parameters: any object)."""
    parameters = tool["function"].get("parameters") or {}
    return parameters if "type" in parameters else {"type": "object", **parameters}


def named_schema(tools: list[dict], name: str) -> dict:
    return arguments_schema(find_tool(tools, name))


def required_schema(tools: list[dict], parallel: bool = True) -> dict:
    defs: dict[str, dict] = {}
    calls = []
    for i, tool in enumerate(tools):
        arguments = arguments_schema(tool)
        if _has_local_ref(arguments):
            arguments = _relocate(arguments, f"tool_{i}", defs)
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool["function"]["name"]}, "arguments": arguments},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {"type": "array", "items": call, "minItems": 1} if parallel else dict(call)
    if defs:
        schema["$defs"] = defs
    return schema


def _has_local_ref(node: object) -> bool:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            return True
        return any(_has_local_ref(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_local_ref(v) for v in node)
    return False


def _relocate(schema: dict, key: str, defs: dict[str, dict]) -> dict:
    """Moves a tool's schema under the combined schema's $defs: its own $defs/definitions
    become `<key>__<name>` there, its body `<key>`, and every local $ref is rewritten; returns
    the reference to use in its place."""
    body = copy.deepcopy(schema)
    own = {**body.pop("definitions", {}), **body.pop("$defs", {})}

    def ref(target: str) -> str:
        for prefix in ("#/$defs/", "#/definitions/"):
            if target.startswith(prefix):
                return f"#/$defs/{key}__{target[len(prefix) :]}"
        return f"#/$defs/{key}{target[1:]}"

    def rewrite(node):
        if isinstance(node, dict):
            return {
                k: ref(v)
                if k == "$ref" and isinstance(v, str) and v.startswith("#")
                else rewrite(v)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for name, sub in own.items():
        defs[f"{key}__{name}"] = rewrite(sub)
    defs[key] = rewrite(body)
    return {"$ref": f"#/$defs/{key}"}
