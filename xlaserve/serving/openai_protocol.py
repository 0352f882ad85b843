"""OpenAI request bodies: strict parsing (wrong types and unknown fields are errors naming the
field) and their translation to `SamplingParams`.

Besides OpenAI's fields, vLLM's sampling extensions are accepted (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids, include_stop_str_in_output,
skip_special_tokens, priority, return_tokens_as_token_ids). Fields OpenAI defines that xlaserve
cannot honour are refused by name, never silently ignored.

Structured outputs come from one of: OpenAI's `response_format` (json_object, json_schema),
vLLM's `structured_outputs` object (the fields of `StructuredOutputsParams`), or vLLM's older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` (with
`guided_whitespace_pattern`; vLLM removed these in 0.12, they stay here for older clients).
More than one in a request is refused, naming them. `guided_decoding_backend` may only name
the server's backend (or "auto"): the backend is chosen when the server starts. An error about
the constraint names the field the client sent (`client_param`).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.serving.errors import Kind, ServingError
from xlaserve.serving.tool_calls import MessageToolCall, ToolChoice, ToolDefinition
from xlaserve.structured.params import PARAM as STRUCTURED_PARAM
from xlaserve.structured.params import StructuredOutputsParams

Number = float | int


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Strict):
    name: str
    description: str | None = None
    # Enforced whatever `strict` says (OpenAI only guarantees adherence with strict=true).
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured_outputs(self) -> dict | None:
        """The StructuredOutputsParams fields this format asks for (None: plain text)."""
        if self.type != "json_schema":
            if self.json_schema is not None:
                raise ServingError(
                    Kind.INVALID,
                    "response_format.json_schema is only allowed with type 'json_schema', "
                    f"got type {self.type!r}",
                    param="response_format",
                )
            return {"json_object": True} if self.type == "json_object" else None
        if self.json_schema is None:
            raise ServingError(
                Kind.INVALID,
                "response_format.json_schema is required with type 'json_schema'",
                param="response_format",
            )
        return {"json": self.json_schema.schema_}


# vLLM's older per-kind fields -> the StructuredOutputsParams field each sets.
GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
AUTO_BACKEND = "auto"


class _SamplingFields(_Strict):
    model: str | None = None
    n: int = 1
    temperature: Number | None = None
    top_p: Number | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, Number] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for abuse tracking; recorded nowhere
    # vLLM's extensions
    top_k: int | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    priority: int = 0
    return_tokens_as_token_ids: bool = False
    # Structured outputs (see the module docstring)
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None

    # ---- structured outputs ------------------------------------------------------------------
    def constraint_sources(self) -> list[str]:
        """The fields of this request that set an output constraint, in a fixed order."""
        sources = []
        if self.response_format is not None and self.response_format.type != "text":
            sources.append("response_format")
        if self.structured_outputs is not None:
            sources.append("structured_outputs")
        sources += [name for name in GUIDED_FIELDS if getattr(self, name) is not None]
        return sources

    def client_param(self, param: str | None) -> str | None:
        """The field this client sent that an error about engine-side `param` concerns."""
        if param == STRUCTURED_PARAM:
            sources = self.constraint_sources()
            if len(sources) == 1:
                return sources[0]
        return param

    def _structured_outputs(self, server_backend: str | None) -> StructuredOutputsParams | None:
        backend = self.guided_decoding_backend
        if backend is not None and backend not in (AUTO_BACKEND, server_backend):
            served = f" ({server_backend!r})" if server_backend else ""
            raise ServingError(
                Kind.INVALID,
                f"guided_decoding_backend {backend!r} is not this server's grammar backend"
                f"{served}: the backend is chosen at start-up (--structured-outputs-backend), "
                "not per request; remove the field or send 'auto'",
                param="guided_decoding_backend",
            )
        sources = self.constraint_sources()
        if len(sources) > 1:
            raise ServingError(
                Kind.INVALID,
                f"give at most one structured output constraint, got {', '.join(sources)}",
                param=sources[-1],
            )
        source = sources[0] if sources else None
        if source is None:
            fields = None
        elif source == "response_format":
            fields = self.response_format.structured_outputs()
        elif source == "structured_outputs":
            fields = self.structured_outputs
        else:
            fields = {GUIDED_FIELDS[source]: getattr(self, source)}
        if self.guided_whitespace_pattern is not None:
            if source not in ("response_format", "guided_json"):
                raise ServingError(
                    Kind.INVALID,
                    "guided_whitespace_pattern applies to a JSON constraint (response_format "
                    f"or guided_json), got {source or 'none'}",
                    param="guided_whitespace_pattern",
                )
            fields = {**fields, "whitespace_pattern": self.guided_whitespace_pattern}
        return None if fields is None else StructuredOutputsParams.from_dict(fields)

    def _sampling_kwargs(self, server_backend: str | None) -> dict:
        if self.stream_options is not None and not self.stream:
            raise ServingError(
                Kind.INVALID, "stream_options is only allowed with stream=true", param="stream"
            )
        kwargs = {
            name: getattr(self, name)
            for name in (
                "n",
                "temperature",
                "top_p",
                "presence_penalty",
                "frequency_penalty",
                "seed",
                "stop",
                "top_k",
                "min_p",
                "repetition_penalty",
                "min_tokens",
                "ignore_eos",
                "stop_token_ids",
                "include_stop_str_in_output",
                "skip_special_tokens",
            )  # fmt: skip
            if getattr(self, name) is not None
        }
        if self.logit_bias:
            bias = {}
            for key, value in self.logit_bias.items():
                try:
                    bias[int(key)] = value
                except ValueError:
                    raise ServingError(
                        Kind.INVALID,
                        f"logit_bias keys must be token ids, got {key!r}",
                        param="logit_bias",
                    ) from None
            kwargs["logit_bias"] = bias
        structured = self._structured_outputs(server_backend)
        if structured is not None:
            kwargs["structured_outputs"] = structured
        return kwargs

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: Any  # str | list[str] | list[int] | list[list[int]], checked in `prompts`
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p, list) and p:
            if all(isinstance(x, str) for x in p):
                return list(p)
            if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
                return [{"prompt_token_ids": p}]
            if all(isinstance(x, list) for x in p):
                return [{"prompt_token_ids": x} for x in p]
        if isinstance(p, list) and not p:
            raise ServingError(Kind.INVALID, "prompt is empty", param="prompt")
        raise ServingError(
            Kind.INVALID,
            "prompt must be a string, a list of strings, a list of token ids or a list of "
            f"token-id lists, got {json.dumps(p)[:80]}",
            param="prompt",
        )

    def sampling_params(self, structured_backend: str | None = None) -> SamplingParams:
        """`structured_backend`: the server's grammar backend, which guided_decoding_backend
        may name."""
        if self.echo:
            raise ServingError(Kind.INVALID, "echo is not supported", param="echo")
        if self.suffix:
            raise ServingError(Kind.INVALID, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ServingError(
                Kind.INVALID,
                f"best_of is not supported (it must equal n = {self.n}), got {self.best_of}",
                param="best_of",
            )
        kwargs = self._sampling_kwargs(structured_backend)
        kwargs["max_tokens"] = self.max_tokens
        kwargs["logprobs"] = self.logprobs
        return SamplingParams(**kwargs)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageUrl(_Strict):
    url: str  # data:image/...;base64,... (file:// and http(s):// as the server allows)
    detail: Literal["auto"] | None = None  # low/high resolution hints are not offered


class ImageUrlPart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only for an assistant message with tool_calls (checked in tool_calls.check_messages)
    content: str | list[TextPart | ImageUrlPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this message answers

    def as_template_dict(self) -> dict:
        if isinstance(self.content, list) and any(p.type == "image_url" for p in self.content):
            # Parts stay parts: the intake fetches the images (xlaserve/multimodal/intake.py)
            # and the model's chat template places their placeholders.
            text = [part.model_dump(exclude_none=True) for part in self.content]
        else:
            text = self.content if isinstance(self.content, str | None) else "".join(
                part.text for part in self.content
            )  # fmt: skip
        role = "system" if self.role == "developer" else self.role
        message = {"role": role, "content": text}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # Tool calling (serving/tool_calls.py)
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def client_param(self, param: str | None) -> str | None:
        if param == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        if param == STRUCTURED_PARAM and self.tools and not self.constraint_sources():
            return "tools"  # the constraint built from the tools (required / named calls)
        return super().client_param(param)

    def sampling_params(self, structured_backend: str | None = None) -> SamplingParams:
        if not self.messages:
            raise ServingError(Kind.INVALID, "messages must not be empty", param="messages")
        max_tokens = self.max_tokens
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ServingError(
                    Kind.INVALID,
                    "max_tokens and max_completion_tokens disagree; set only one",
                    param="max_completion_tokens",
                )
            if self.max_completion_tokens < 1:
                raise ServingError(
                    Kind.INVALID,
                    f"max_completion_tokens must be >= 1, got {self.max_completion_tokens}",
                    param="max_completion_tokens",
                )
            max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise ServingError(
                    Kind.INVALID, "top_logprobs needs logprobs=true", param="top_logprobs"
                )
            if not 0 <= self.top_logprobs <= 20:
                raise ServingError(
                    Kind.INVALID,
                    f"top_logprobs must be in [0, 20], got {self.top_logprobs}",
                    param="top_logprobs",
                )
        kwargs = self._sampling_kwargs(structured_backend)
        kwargs["max_tokens"] = max_tokens
        kwargs["logprobs"] = (self.top_logprobs or 0) if self.logprobs else None
        return SamplingParams(**kwargs)


def parse_body(body: bytes, model: type[BaseModel]):
    """The request model for a JSON body; errors name the offending field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ServingError(Kind.INVALID, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ServingError(
            Kind.INVALID, f"request body must be a JSON object, got {type(data).__name__}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _validation_error(e: ValidationError) -> ServingError:
    err = e.errors()[0]
    # Drop the union-member tags pydantic puts in the location ("stop.str", "content.list[...]").
    parts = [
        str(p)
        for p in err["loc"]
        if isinstance(p, int)
        or not (p in _TYPE_TAGS or "[" in p or p[:1].isupper() or p.startswith("function-"))
    ]
    where = ".".join(parts) or "body"
    if err["type"] == "extra_forbidden":
        message = f"unknown or unsupported field {where!r}"
    elif err["type"] == "missing":
        message = f"{where} is required"
    else:
        got = json.dumps(err.get("input"), default=str)
        got = got if len(got) <= 60 else got[:57] + "..."
        message = f"{where}: {err['msg']}, got {got}"
    return ServingError(Kind.INVALID, message, param=parts[0] if parts else None)
