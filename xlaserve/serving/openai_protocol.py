"""OpenAI request bodies: strict parsing (wrong types and unknown fields are errors naming the
field) and their translation to `SamplingParams`.

Besides OpenAI's fields, vLLM's sampling extensions are accepted (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids, include_stop_str_in_output,
skip_special_tokens, priority, return_tokens_as_token_ids). Fields OpenAI defines that xlaserve
cannot honour are refused by name, never silently ignored.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.serving.errors import Kind, ServingError

Number = float | int


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


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

    def _sampling_kwargs(self) -> dict:
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

    def sampling_params(self) -> SamplingParams:
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
        kwargs = self._sampling_kwargs()
        kwargs["max_tokens"] = self.max_tokens
        kwargs["logprobs"] = self.logprobs
        return SamplingParams(**kwargs)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content
        )  # fmt: skip
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": text}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def sampling_params(self) -> SamplingParams:
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
        kwargs = self._sampling_kwargs()
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
