"""Per-request sampling options, normalized and validated at construction (like vLLM's).

Every bad value raises an `InvalidRequestError` (a ValueError) whose `param` is the field and
whose message names the field and the value, so a server can hand it back to the client as is.
Checks that need the model (token ids against the vocab) live in
`SamplingParams.validate_for_model`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from xlaserve.errors import InvalidRequestError
from xlaserve.structured.params import StructuredOutputsParams

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0


def _invalid(name: str, message: str) -> InvalidRequestError:
    """The error for field `name` ("logit_bias[3]" and "stop_token_ids entry" name their field)."""
    return InvalidRequestError(name.split("[")[0].split(" ")[0], message)


def _int(name: str, value: object, *, optional: bool = False) -> int | None:
    """`value` as a plain int; bools and floats are rejected (True is not a count)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "an int or None" if optional else "an int"
        raise _invalid(name, f"{name} must be {kind}, got {value!r}")
    return int(value)


def _real(name: str, value: object, rule: str = "finite") -> float:
    """`value` as a finite float; bools, strings, NaN and infinities are rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _invalid(name, f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise _invalid(name, f"{name} must be {rule}, got {value}")
    return value


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _invalid(name, f"{name} must be a bool, got {value!r}")
    return value


def _require(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise _invalid(name, f"{name} must be {rule}, got {value!r}")


@dataclass
class SamplingParams:
    """How to sample one request's completions.

    After construction `stop` is a list of non-empty strings, `stop_token_ids` a list of ints,
    `logit_bias` a dict (token id -> bias), `top_k == -1` is normalized to 0 (off) and numbers
    are plain Python ints/floats.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    # A constraint the output must follow (JSON schema, regex, choice, grammar): see
    # xlaserve/structured/params.py. A dict is read as StructuredOutputsParams(**dict).
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self.n = _int("n", self.n)
        _require(self.n >= 1, "n", ">= 1", self.n)

        rule = ">= 0 and finite"
        self.temperature = _real("temperature", self.temperature, rule)
        _require(self.temperature >= 0, "temperature", rule, self.temperature)
        self.top_k = _int("top_k", self.top_k)
        _require(self.top_k >= -1, "top_k", "-1 or 0 (off) or >= 1", self.top_k)
        self.top_k = max(self.top_k, 0)
        self.top_p = _real("top_p", self.top_p)
        _require(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        self.min_p = _real("min_p", self.min_p)
        _require(0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)

        for name in ("presence_penalty", "frequency_penalty"):
            value = _real(name, getattr(self, name))
            _require(-2 <= value <= 2, name, "in [-2, 2]", value)
            setattr(self, name, value)
        self.repetition_penalty = _real("repetition_penalty", self.repetition_penalty)
        _require(self.repetition_penalty > 0, "repetition_penalty", "> 0", self.repetition_penalty)

        self.seed = _int("seed", self.seed, optional=True)
        self.stop = self._normalize_stop(self.stop)
        self.stop_token_ids = self._normalize_token_ids("stop_token_ids", self.stop_token_ids)
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            _bool(name, getattr(self, name))
        _bool("detokenize", self.detokenize)

        self.max_tokens = _int("max_tokens", self.max_tokens, optional=True)
        if self.max_tokens is not None:
            _require(self.max_tokens >= 1, "max_tokens", ">= 1 or None", self.max_tokens)
        self.min_tokens = _int("min_tokens", self.min_tokens)
        _require(self.min_tokens >= 0, "min_tokens", ">= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _invalid(
                "min_tokens",
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )

        for name in ("logprobs", "prompt_logprobs"):
            value = _int(name, getattr(self, name), optional=True)
            if value is not None:
                _require(0 <= value <= MAX_LOGPROBS, name, f"in [0, {MAX_LOGPROBS}]", value)
            setattr(self, name, value)

        self.logit_bias = self._normalize_logit_bias(self.logit_bias)
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)

    @staticmethod
    def _normalize_stop(stop: object) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list | tuple):
            raise _invalid(
                "stop", f"stop must be a string, a list of strings or None, got {stop!r}"
            )
        for s in stop:
            if not isinstance(s, str):
                raise _invalid("stop", f"stop must contain only strings, got {s!r}")
            if not s:
                raise _invalid("stop", f"stop strings must be non-empty, got {s!r}")
        return list(stop)

    @staticmethod
    def _normalize_token_ids(name: str, ids: object) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, list | tuple):
            raise _invalid(name, f"{name} must be a list of ints or None, got {ids!r}")
        out = [_int(f"{name} entry", i) for i in ids]
        for i in out:
            _require(i >= 0, f"{name} entry", ">= 0", i)
        return out

    @staticmethod
    def _normalize_logit_bias(bias: object) -> dict[int, float]:
        if bias is None:
            return {}
        if not isinstance(bias, dict):
            raise _invalid(
                "logit_bias", f"logit_bias must be a dict of token id -> float, got {bias!r}"
            )
        out: dict[int, float] = {}
        for key, value in bias.items():
            token = _int("logit_bias key", key)
            _require(token >= 0, "logit_bias key", ">= 0", token)
            value = _real(f"logit_bias[{token}]", value)
            limit = MAX_LOGIT_BIAS
            _require(
                -limit <= value <= limit, f"logit_bias[{token}]", f"in [-{limit}, {limit}]", value
            )
            out[token] = value
        return out

    @property
    def greedy(self) -> bool:
        """True when sampling is argmax: temperature 0 or top-k of 1."""
        return self.temperature == 0 or self.top_k == 1

    def validate_for_model(self, vocab_size: int) -> None:
        """Checks that need the model: every token id named here must be in [0, vocab_size)."""
        vocab_size = _int("vocab_size", vocab_size)
        _require(vocab_size >= 1, "vocab_size", ">= 1", vocab_size)
        for token in self.stop_token_ids:
            if token >= vocab_size:
                raise _invalid(
                    "stop_token_ids",
                    f"stop_token_ids entry must be in [0, {vocab_size}) (the vocab), got {token}",
                )
        for token in self.logit_bias:
            if token >= vocab_size:
                raise _invalid(
                    "logit_bias",
                    f"logit_bias key must be in [0, {vocab_size}) (the vocab), got {token}",
                )
