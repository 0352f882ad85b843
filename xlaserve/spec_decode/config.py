"""`speculative_config`: which proposer drafts tokens and how many, with vLLM's names.

    LLM(model, speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                   "prompt_lookup_min": 2, "prompt_lookup_max": 5})
    LLM(model, speculative_config={"method": "draft_model", "model": "<draft>",
                                   "num_speculative_tokens": 3})
    LLM(model, speculative_config={"method": "eagle", "model": "<EAGLE head folder>",
                                   "num_speculative_tokens": 3})

Validated once, at start-up; a bad value raises ValueError naming the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

METHODS = ("ngram", "draft_model", "eagle", "eagle3")
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    # n-gram (prompt lookup): the longest suffix of prompt+output, between these lengths, that
    # occurred before proposes the tokens that followed it.
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    # draft_model / eagle / eagle3: the draft checkpoint and its dtype/load format.
    model: str | None = None
    dtype: str = "auto"
    load_format: str = "auto"
    # Adaptive speculation. A request whose acceptance rate (moving average) falls below
    # `backoff_acceptance` stops drafting for a while, doubling up to `max_backoff_steps`, then
    # tries again. The engine drafts for nobody while the measured step costs say verification
    # costs more than it saves; `disable_by_batch_size` (vLLM's name) is a hard cap on top.
    adaptive: bool = True
    backoff_acceptance: float = 0.25
    max_backoff_steps: int = 64
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config method must be one of {METHODS}, "
                             f"got {self.method!r}")  # fmt: skip
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                f"speculative_config num_speculative_tokens must be an int in "
                f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}"
            )
        for name in ("prompt_lookup_min", "prompt_lookup_max", "max_backoff_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative_config {name} must be an int >= 1, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"speculative_config prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )
        b = self.backoff_acceptance
        if isinstance(b, bool) or not isinstance(b, int | float) or not 0.0 <= b < 1.0:
            raise ValueError(f"speculative_config backoff_acceptance must be in [0, 1), got {b!r}")
        cap = self.disable_by_batch_size
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 2):
            raise ValueError(
                f"speculative_config disable_by_batch_size must be an int >= 2, got {cap!r}"
            )
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative_config adaptive must be a bool, got {self.adaptive!r}")
        if self.uses_draft_model and not self.model:
            raise ValueError(f"speculative_config method {self.method!r} needs 'model' (the "
                             "draft checkpoint)")  # fmt: skip
        if self.method == "ngram" and self.model is not None:
            raise ValueError("speculative_config method 'ngram' takes no 'model'")

    @property
    def uses_draft_model(self) -> bool:
        return self.method != "ngram"

    @property
    def num_lookahead_tokens(self) -> int:
        """KV slots a step reserves past its scheduled tokens: a draft model writes its own
        proposals' K/V there while drafting the next step."""
        return self.num_speculative_tokens if self.uses_draft_model else 0

    @classmethod
    def from_value(cls, value) -> SpeculativeConfig | None:
        """From a dict (vLLM's keys), a JSON string of one, an instance or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known: "
                             f"{sorted(known)}")  # fmt: skip
        for required in ("method", "num_speculative_tokens"):
            if required not in value:
                raise ValueError(f"speculative_config needs {required!r}")
        return cls(**value)
