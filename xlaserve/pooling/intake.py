"""Pooling requests through the one intake (engine/intake.py hands them here): the prompt
parsed and tokenized (with truncation when the request asks for it), its length checked, its
`PoolingParams` resolved against the model. A generative engine refuses pooling requests and a
pooling engine refuses generation, each naming what the model serves.

Prompts: text, token ids, {"prompt": text}, {"prompt_token_ids": ids}, and for cross-encoder
scores a text pair {"prompt": text_1, "prompt_pair": text_2}, tokenized together (token type
ids 1 from the second text on).
"""

from __future__ import annotations

from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.errors import InvalidRequestError
from xlaserve.pooling.params import PoolingParams, PoolingTask

POOLING_PROMPT_KEYS = frozenset({"prompt", "prompt_token_ids", "prompt_pair"})
# What the scheduler sees of a pooling request: one sequence, never detokenized.
SCHEDULED_PARAMS = SamplingParams(max_tokens=1, detokenize=False)


def refuse_generation() -> InvalidRequestError:
    return InvalidRequestError(
        "model",
        "this model is served for pooling (runner 'pooling'): it does not generate text; ask "
        "for embeddings, classification or scores (LLM.embed / classify / score, "
        "/v1/embeddings, /v1/score, /v1/rerank)",
    )


def refuse_pooling() -> InvalidRequestError:
    return InvalidRequestError(
        "model",
        "this model is served for text generation (runner 'generate'): it does not serve "
        "embeddings, classification or scores; serve a pooling model (runner 'pooling')",
    )


def parse_pooling_prompt(prompt: object) -> tuple[str | None, str | None, list | None]:
    """(text, pair text, token ids) of a pooling prompt; exactly one of text / ids is set."""
    if isinstance(prompt, dict):
        unknown = set(prompt) - POOLING_PROMPT_KEYS
        if unknown:
            raise InvalidRequestError("prompt", f"unknown prompt keys {sorted(unknown)}")
        pair = prompt.get("prompt_pair")
        if pair is not None and not isinstance(pair, str):
            raise InvalidRequestError("prompt", f"prompt_pair must be text, got {pair!r}"[:200])
        if "prompt_token_ids" in prompt:
            if pair is not None:
                raise InvalidRequestError("prompt", "prompt_pair needs a text prompt")
            return None, None, prompt["prompt_token_ids"]
        if "prompt" not in prompt:
            raise InvalidRequestError(
                "prompt", "a dict prompt needs 'prompt' or 'prompt_token_ids'"
            )
        text = prompt["prompt"]
        if not isinstance(text, str):
            raise InvalidRequestError("prompt", f"prompt must be text, got {text!r}"[:200])
        return text, pair, None
    if isinstance(prompt, str):
        return prompt, None, None
    if isinstance(prompt, list | tuple):
        return None, None, list(prompt)
    raise InvalidRequestError(
        "prompt", f"prompt must be text, token ids or a dict, got {type(prompt).__name__}"
    )


def pooling_request(
    intake, prompt, params, *, priority: int, add_special_tokens: bool, check_unicode
) -> tuple[str | None, list[int], PoolingTask]:
    """(text, token ids, resolved pooling) of a pooling request for `intake` (an
    engine/intake.py `RequestIntake`, which calls this), validated as the module docstring
    says."""
    pooler = intake.pooler
    if pooler is None:
        raise refuse_pooling()
    if params is None:
        params = PoolingParams()
    if not isinstance(params, PoolingParams):
        raise refuse_generation()
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidRequestError("priority", f"priority must be an int, got {priority!r}")
    limit = intake.max_model_len
    trunc = params.truncate_prompt_tokens
    trunc = limit if trunc == -1 else trunc
    if trunc is not None and trunc > limit:
        raise InvalidRequestError(
            "truncate_prompt_tokens",
            f"truncate_prompt_tokens {trunc} exceeds max_model_len {limit}",
        )
    text, pair, ids = parse_pooling_prompt(prompt)
    pair_start = None
    if text is not None:
        for t, name in ((text, "prompt"), (pair, "prompt_pair")):
            if t is not None and not t:
                raise InvalidRequestError("prompt", f"{name} is empty")
            if t is not None:
                check_unicode(t)
        if intake.tokenizer is None:
            raise InvalidRequestError("prompt", "this model has no tokenizer: pass token ids")
        kwargs = {"truncation": True, "max_length": trunc} if trunc is not None else {}
        enc = intake.tokenizer(text, pair, add_special_tokens=add_special_tokens, **kwargs)
        ids = list(enc["input_ids"])
        if pair is not None:
            types = list(enc.get("token_type_ids") or [])
            if 1 not in types:
                raise InvalidRequestError(
                    "prompt", "this model's tokenizer gives no token types for text pairs"
                )
            pair_start = types.index(1)
    else:
        ids = intake.check_token_ids(ids)
        if trunc is not None:
            ids = ids[:trunc]
    if not ids:
        raise InvalidRequestError("prompt", "prompt tokenizes to no tokens")
    if len(ids) > limit:
        raise InvalidRequestError(
            "prompt",
            f"prompt has {len(ids)} tokens, more than max_model_len {limit}; shorten it or "
            "set truncate_prompt_tokens to cut it",
        )
    if pair is not None and not pooler.is_cross_encoder:
        raise InvalidRequestError(
            "prompt", "text pairs need a cross-encoder (a classifier with one label)"
        )
    return text, ids, pooler.resolve(params, pair_start=pair_start)
