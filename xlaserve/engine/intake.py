"""The one request intake: prompts parsed and tokenized, prompt and `SamplingParams` validated,
once, for every front (`LLM`, `LLMEngine`, `AsyncEngine`, the data-parallel front, servers).

Bad input raises `InvalidRequestError(param, message)` (a ValueError) naming the field, which
serving maps to HTTP 400 / gRPC INVALID_ARGUMENT without reading the message.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass

from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.errors import InvalidRequestError
from xlaserve.multimodal.intake import split_images
from xlaserve.multimodal.media import MediaPolicy
from xlaserve.pooling.intake import SCHEDULED_PARAMS, pooling_request
from xlaserve.pooling.params import PoolingParams, PoolingTask
from xlaserve.structured.params import StructuredOutputsParams
from xlaserve.tools.template import template_inputs

# A prompt: text, token ids, {"prompt": text} / {"prompt_token_ids": ids} (or both keys), or
# a conversation {"messages": [...], "add_generation_prompt": True} for the chat template,
# optionally with "tools" (OpenAI tool dicts) and "chat_template_kwargs" (extra template vars).
PromptType = str | list[int] | dict
PROMPT_KEYS = frozenset({"prompt", "prompt_token_ids"})
CHAT_KEYS = frozenset({"messages", "add_generation_prompt", "tools", "chat_template_kwargs"})
# Template arguments that chat_template_kwargs may not set (the intake sets them).
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"conversation", "messages", "tools", "add_generation_prompt", "tokenize", "return_dict"}
)
Conversation = list[dict]


def check_unicode(text: str, param: str = "prompt") -> None:
    """Refuses text that cannot be encoded (a lone UTF-16 surrogate, as JSON's "\\ud800" gives):
    the tokenizer would fail with a message about its own types."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            param,
            f"{param} is not valid Unicode text: lone surrogate {text[e.start]!r} at position "
            f"{e.start}",
        ) from None


@dataclass(frozen=True)
class EngineRequest:
    """A validated request, ready for a scheduler."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    arrival_time: float
    pooling: PoolingTask | None = None  # a pooling request (xlaserve/pooling/intake.py)
    mm_items: tuple = ()  # its images (xlaserve/multimodal/inputs.ImageItem), prompt order


def check_request_id(request_id: object, in_use: Container[str]) -> str:
    if not isinstance(request_id, str) or not request_id:
        raise InvalidRequestError("request_id", f"request_id must be a non-empty string, "
                                  f"got {request_id!r}")  # fmt: skip
    if request_id in in_use:
        raise InvalidRequestError("request_id", f"request id {request_id!r} is already in use")
    return request_id


def prompt_list(prompts: object) -> list[PromptType]:
    """One prompt or a non-empty list of them, as a list (a bare list of ints is refused: it
    would be ambiguous between one token-id prompt and many prompts)."""
    if isinstance(prompts, str | dict):
        return [prompts]
    if (
        isinstance(prompts, list | tuple)
        and prompts
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts)
    ):
        raise InvalidRequestError(
            "prompt",
            'token-id prompts must be given as {"prompt_token_ids": [...]} '
            "(a bare list is read as a list of prompts)",
        )
    if not isinstance(prompts, list | tuple) or not prompts:
        raise InvalidRequestError(
            "prompt", "prompts must be a prompt or a non-empty list of prompts"
        )
    return list(prompts)


class RequestIntake:
    """Tokenizes and validates requests for one model (not thread-safe: the tokenizer is not;
    an async engine runs it on its engine thread)."""

    def __init__(
        self,
        tokenizer,
        *,
        vocab_size: int,
        max_model_len: int,
        check_structured: Callable[[StructuredOutputsParams], None] | None = None,
        pooler=None,
        image_processor=None,
        media_policy: MediaPolicy | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        # A vision-language model's ImageProcessor (xlaserve/multimodal); None: text only.
        self.image_processor = image_processor
        self.media_policy = MediaPolicy() if media_policy is None else media_policy
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        # Checks a structured-outputs constraint (the grammar backend's); None: not offered.
        self.check_structured = check_structured
        # A pooling model's defaults (pooling/model_config.PoolerConfig): the engine serves
        # pooling requests only; None: generation only.
        self.pooler = pooler

    # ---- prompts ---------------------------------------------------------------------------
    def parse_prompt(
        self, prompt: PromptType, *, add_special_tokens: bool = True
    ) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt; ids given with the text win."""
        if isinstance(prompt, dict):
            if "messages" in prompt:
                unknown = set(prompt) - CHAT_KEYS
                if unknown:
                    raise InvalidRequestError("messages", f"unknown keys {sorted(unknown)}")
                chat = self.chat_prompt(
                    prompt["messages"],
                    add_generation_prompt=prompt.get("add_generation_prompt", True),
                    tools=prompt.get("tools"),
                    chat_template_kwargs=prompt.get("chat_template_kwargs"),
                )
                return chat["prompt"], chat["prompt_token_ids"]
            unknown = set(prompt) - PROMPT_KEYS
            if unknown:
                raise InvalidRequestError("prompt", f"unknown prompt keys {sorted(unknown)}")
            if "prompt_token_ids" in prompt:
                text = prompt.get("prompt")
                if text is not None and not isinstance(text, str):
                    raise InvalidRequestError("prompt", f"prompt must be text, got {text!r}")
                return text, self.check_token_ids(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise InvalidRequestError(
                    "prompt", "a dict prompt needs 'prompt' or 'prompt_token_ids'"
                )
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "prompt is empty")
            check_unicode(prompt)
            if self.tokenizer is None:
                raise InvalidRequestError(
                    "prompt", "this model has no tokenizer: pass prompt_token_ids"
                )
            ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
            if not ids:
                raise InvalidRequestError("prompt", "prompt tokenizes to no tokens")
            return prompt, list(ids)
        if isinstance(prompt, list | tuple):
            return None, self.check_token_ids(prompt)
        raise InvalidRequestError(
            "prompt", f"prompt must be text, token ids or a dict, got {type(prompt).__name__}"
        )

    def check_token_ids(self, ids: object) -> list[int]:
        if not isinstance(ids, list | tuple):
            raise InvalidRequestError(
                "prompt", f"prompt_token_ids must be a list of ints, got {type(ids).__name__}"
            )
        if not ids:
            raise InvalidRequestError("prompt", "prompt is empty (no prompt_token_ids)")
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise InvalidRequestError(
                    "prompt",
                    f"prompt token id {t!r} at position {i} is outside the vocabulary "
                    f"[0, {self.vocab_size})",
                )
        return list(ids)

    def chat_prompt(
        self,
        messages: Conversation,
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> dict:
        """{"prompt", "prompt_token_ids"} of a conversation through the model's chat template
        (the template holds any BOS, so the tokenizer adds none). `tools` go to the template,
        or, where it has no tools section, into a fallback system prompt
        (`xlaserve.tools.template`)."""
        tok = self.tokenizer
        if tok is None or not tok.chat_template:
            raise InvalidRequestError("messages", "this model has no chat template")
        if not isinstance(messages, list | tuple) or not messages:
            raise InvalidRequestError("messages", "messages must be a non-empty list")
        if not all(isinstance(m, dict) for m in messages):
            raise InvalidRequestError("messages", "every message must be a dict")
        if tools is not None and (
            not isinstance(tools, list | tuple) or not all(isinstance(t, dict) for t in tools)
        ):
            raise InvalidRequestError("tools", "tools must be a list of tool dicts")
        extra = {} if chat_template_kwargs is None else chat_template_kwargs
        if not isinstance(extra, dict) or RESERVED_TEMPLATE_KWARGS & set(extra):
            raise InvalidRequestError(
                "chat_template_kwargs",
                "chat_template_kwargs must be a dict without "
                f"{sorted(RESERVED_TEMPLATE_KWARGS)}, got {chat_template_kwargs!r}"[:300],
            )
        messages, tool_kwargs = template_inputs(tok, list(messages), tools)
        try:
            text = tok.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **tool_kwargs,
                **extra,
            )
        except Exception as e:  # noqa: BLE001 - a template error is the caller's input
            raise InvalidRequestError("messages", f"the chat template failed: {e}") from e
        check_unicode(text, "messages")  # a lone surrogate in any message or tool
        return {
            "prompt": text,
            "prompt_token_ids": tok(text, add_special_tokens=False)["input_ids"],
        }

    # ---- whole requests ----------------------------------------------------------------------
    def process(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None,
        *,
        arrival_time: float,
        priority: int = 0,
        add_special_tokens: bool = True,
        check_length: bool = False,
    ) -> EngineRequest:
        """Validates everything about one request. With `check_length`, a `max_tokens` that
        cannot fit after the prompt in `max_model_len` is refused instead of being cut short."""
        if self.pooler is not None or isinstance(params, PoolingParams):
            text, ids, task = pooling_request(
                self, prompt, params, priority=priority, add_special_tokens=add_special_tokens,
                check_unicode=check_unicode,
            )  # fmt: skip
            return EngineRequest(request_id, text, ids, SCHEDULED_PARAMS, priority,
                                 arrival_time, task)  # fmt: skip
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(
                None, f"sampling params must be SamplingParams, got {type(params).__name__}"
            )
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidRequestError("priority", f"priority must be an int, got {priority!r}")
        prompt, images = split_images(prompt, self.media_policy)
        if images and self.image_processor is None:
            raise InvalidRequestError("multi_modal_data", "this model takes no images (a "
                                      "text-only model)")  # fmt: skip
        text, ids = self.parse_prompt(prompt, add_special_tokens=add_special_tokens)
        mm_items = ()
        if self.image_processor is not None and text is not None:
            chat = isinstance(prompt, dict) and "messages" in prompt  # the template holds BOS
            ids, mm_items = self.image_processor.process(
                text, images, add_special_tokens=add_special_tokens and not chat
            )
        limit = self.max_model_len
        if len(ids) >= limit:
            raise InvalidRequestError(
                "prompt",
                f"prompt has {len(ids)} tokens; max_model_len is {limit} "
                "(room for at least one output token is needed)",
            )
        room = limit - len(ids)
        if check_length and params.max_tokens is not None and params.max_tokens > room:
            raise InvalidRequestError(
                "max_tokens",
                f"max_tokens {params.max_tokens} does not fit: the prompt has {len(ids)} tokens "
                f"and max_model_len is {limit}, leaving room for {room}",
            )
        params.validate_for_model(self.vocab_size)
        if params.structured_outputs is not None:
            if self.check_structured is None:
                raise InvalidRequestError(
                    "structured_outputs",
                    "structured outputs need the model's tokenizer; this model has none",
                )
            self.check_structured(params.structured_outputs)
        if params.stop and (not params.detokenize or self.tokenizer is None):
            raise InvalidRequestError(
                "stop", "stop strings need detokenization (detokenize=True, a tokenizer)"
            )
        return EngineRequest(request_id, text, ids, params, priority, arrival_time,
                             mm_items=mm_items)  # fmt: skip
