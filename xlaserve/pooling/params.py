"""`PoolingParams` (vLLM's names) and `PoolingTask`, what the engine resolves them to.

A pooling request asks for one task: "embed" (a vector), "classify" (class probabilities),
"score" (a cross-encoder's relevance of a text pair) or "reward" (the raw head outputs). Options
left unset take the model's defaults (its sentence-transformers pooling and Normalize module,
its classifier's activation); every bad value raises `InvalidRequestError` naming the field.
Imports nothing from jax (the scheduling core carries `PoolingTask`).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from xlaserve.errors import InvalidRequestError

TASKS = ("embed", "classify", "score", "reward")
# How a sequence's hidden states become one vector: the mean over its tokens, its first token
# ([CLS]) or its last token (decoder embedders, e.g. Qwen3-Embedding).
POOLING_TYPES = ("MEAN", "CLS", "LAST")


def _optional_int(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidRequestError(name, f"{name} must be an int or None, got {value!r}")
    return int(value)


def _optional_bool(name: str, value: object) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise InvalidRequestError(name, f"{name} must be a bool or None, got {value!r}")
    return value


@dataclass(frozen=True)
class PoolingParams:
    """Per-request pooling options.

    dimensions: keep the first `dimensions` values of the embedding (then normalize); only for
        models that declare Matryoshka support, refused otherwise.
    normalize: L2-normalize the embedding (default: the model's, i.e. whether its
        sentence-transformers modules end with Normalize; decoder embedders: True).
    truncate_prompt_tokens: cut prompts longer than this many tokens (-1: the model's
        limit) instead of refusing them. Text keeps the tokenizer's special tokens and is cut
        on its truncation side (right for BERT, as sentence-transformers does); token ids keep
        their first tokens.
    pooling_type: "MEAN", "CLS" or "LAST", overriding the model's pooling.
    activation: classify/score: apply the head's activation (softmax over several labels,
        sigmoid for one); default True. False returns the raw logits.
    task: set by `LLM.embed` / `classify` / `score` / `reward` and the servers; None means
        the model's own task.
    """

    dimensions: int | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None
    pooling_type: str | None = None
    activation: bool | None = None
    task: str | None = None

    def __post_init__(self) -> None:
        dims = _optional_int("dimensions", self.dimensions)
        if dims is not None and dims < 1:
            raise InvalidRequestError("dimensions", f"dimensions must be >= 1, got {dims}")
        trunc = _optional_int("truncate_prompt_tokens", self.truncate_prompt_tokens)
        if trunc is not None and trunc < 1 and trunc != -1:
            raise InvalidRequestError(
                "truncate_prompt_tokens",
                f"truncate_prompt_tokens must be >= 1 or -1 (the model's limit), got {trunc}",
            )
        _optional_bool("normalize", self.normalize)
        _optional_bool("activation", self.activation)
        if self.pooling_type is not None and self.pooling_type not in POOLING_TYPES:
            raise InvalidRequestError(
                "pooling_type",
                f"pooling_type must be one of {POOLING_TYPES}, got {self.pooling_type!r}",
            )
        if self.task is not None and self.task not in TASKS:
            raise InvalidRequestError("task", f"task must be one of {TASKS}, got {self.task!r}")


@dataclass(frozen=True)
class PoolingTask:
    """A request's pooling with every default resolved against the model (engine-internal:
    carried by the scheduler's sequences to the runner)."""

    task: str  # one of TASKS
    pooling_type: str  # one of POOLING_TYPES (embed)
    normalize: bool  # embed
    dimensions: int | None  # embed: Matryoshka truncation
    activation: bool  # classify / score
    # Sentence pairs (cross-encoder scores): the index of the first token of the second text,
    # from where token type ids are 1. None: one text, all token types 0.
    pair_start: int | None = None

    @property
    def uses_head(self) -> bool:
        """Whether the output is the model's classification head (else a pooled vector)."""
        return self.task != "embed"
