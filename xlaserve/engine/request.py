"""One sample stream of a request (`Sequence`) and its lifecycle status.

A request with `SamplingParams.n == k` becomes k sequences that share a prompt. The scheduler
moves them WAITING -> RUNNING (-> PREEMPTED -> RUNNING ...) -> FINISHED_*; token-level stop
conditions are checked here in `Sequence.append_token`, stop strings by the detokenizer (which
ends the sequence through the scheduler's `finish_sequence`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.pooling.params import PoolingTask

if TYPE_CHECKING:
    from xlaserve.lora.adapter import LoRAAdapter


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()  # eos, a stop token id or a stop string
    FINISHED_LENGTH = enum.auto()  # max_tokens or max_model_len reached
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


# Async scheduling: the output slot of a token still being sampled on the device. The step
# after it feeds the device's copy; the host fills in the real id when the step's tokens arrive.
PENDING_TOKEN = -1

_FINISHED = frozenset(
    {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED}
)


@dataclass(eq=False, kw_only=True)
class Sequence:
    """One sample stream: prompt + generated tokens, its KV pages and progress.

    `num_computed_tokens` counts the leading tokens of `all_token_ids` whose K/V are in the
    cache. A running sequence always has at least one uncomputed token (the last sampled one,
    or the rest of its prompt); after a preemption it recomputes prompt + outputs so far.
    Equality is identity (two sequences are never "equal" by content).
    """

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_model_len: int
    sample_index: int = 0
    arrival_time: float = 0.0
    priority: int = 0  # lower value = more important (like vLLM)
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    stop_reason: int | str | None = None
    num_cached_prompt_tokens: int = 0  # prefix-cache hits at the last admission
    held: bool = False  # not schedulable yet (its grammar is compiling)
    # Speculative decoding: tokens drafted for the next step (never part of the outputs until
    # the target model accepts them).
    spec_token_ids: list[int] = field(default_factory=list)
    lora: LoRAAdapter | None = None  # LoRA adapter (None: the base model)
    # A pooling request: scheduled whole (never chunked, no prefix-cache hits) and finished
    # once its prompt is processed, with a pooled output instead of a token.
    pooling: PoolingTask | None = None
    # Async scheduling: trailing outputs that are PENDING_TOKEN (0, 1, or 2 while one step's
    # tokens arrive and the next step's are already on their way).
    num_pending: int = 0
    # Multimodal: the prompt's images (multimodal/inputs.ImageItem), in prompt order.
    mm_items: tuple = ()

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.output_token_ids = list(self.output_token_ids)
        self.eos_token_ids = tuple(self.eos_token_ids)
        self._token_ids = self.prompt_token_ids + self.output_token_ids

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + outputs (the live list: read it, never mutate it)."""
        return self._token_ids

    @property
    def lora_key(self) -> str | None:
        """The adapter's identity (what its KV pages are cached under), None for the base."""
        return None if self.lora is None else self.lora.identity

    @property
    def num_tokens(self) -> int:
        return len(self._token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens to feed before the next token can be sampled (1 for a decode)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True until the prompt (plus, after a preemption, the outputs) is computed.

        A decode feeds exactly the last sampled token; anything else, including the very first
        step of a one-token prompt, is a prefill.
        """
        return self.num_uncomputed_tokens > 1 or not self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def resolved_output_token_ids(self) -> list[int]:
        """The outputs whose ids are known (all but the pending ones)."""
        end = self.num_output_tokens - self.num_pending
        return self.output_token_ids if not self.num_pending else self.output_token_ids[:end]

    @property
    def awaits_last_token(self) -> bool:
        """A pending token ends it by length: nothing is left to compute."""
        if not self.num_pending:
            return False
        max_tokens = self.params.max_tokens
        return self.num_tokens >= self.max_model_len or (
            max_tokens is not None and self.num_output_tokens >= max_tokens
        )

    def append_pending(self) -> None:
        """Appends a token that is still being sampled (async scheduling); its stop conditions
        are checked when `resolve_pending` gives its id."""
        if self.is_finished:
            raise RuntimeError(f"sequence {self.seq_id} is {self.status.name}; cannot append")
        self.output_token_ids.append(PENDING_TOKEN)
        self._token_ids.append(PENDING_TOKEN)
        self.num_pending += 1

    def resolve_pending(self, token_id: int) -> RequestStatus:
        """Fills in the oldest pending token and applies the stop conditions at its position
        (as `append_token` does); a stop drops the pending tokens after it."""
        if not self.num_pending:
            raise RuntimeError(f"sequence {self.seq_id} has no pending token")
        index = self.num_output_tokens - self.num_pending
        self.output_token_ids[index] = token_id
        self._token_ids[self.num_prompt_tokens + index] = token_id
        self.num_pending -= 1
        status = self._check_stop(token_id, index + 1, self.num_prompt_tokens + index + 1)
        return status

    def append_token(self, token_id: int) -> RequestStatus:
        """Appends a sampled token and applies the token-level stop conditions, in order:
        max_model_len reached (LENGTH), eos unless ignore_eos (STOPPED, stop_reason None),
        a stop token id (STOPPED, stop_reason = the id), max_tokens reached (LENGTH).
        eos and stop token ids do not count before `min_tokens` outputs exist.
        Returns the new status.
        """
        if self.is_finished:
            raise RuntimeError(f"sequence {self.seq_id} is {self.status.name}; cannot append")
        if self.num_pending:
            raise RuntimeError(f"sequence {self.seq_id} has pending tokens; resolve them first")
        self.output_token_ids.append(token_id)
        self._token_ids.append(token_id)
        return self._check_stop(token_id, self.num_output_tokens, self.num_tokens)

    def _check_stop(self, token_id: int, num_outputs: int, num_tokens: int) -> RequestStatus:
        """The stop conditions for the token that makes `num_outputs` outputs and
        `num_tokens` tokens."""
        params = self.params
        if num_tokens >= self.max_model_len:
            return self.finish(RequestStatus.FINISHED_LENGTH)
        if num_outputs >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return self.finish(RequestStatus.FINISHED_STOPPED)
            if token_id in params.stop_token_ids:
                return self.finish(RequestStatus.FINISHED_STOPPED, token_id)
        if params.max_tokens is not None and num_outputs >= params.max_tokens:
            return self.finish(RequestStatus.FINISHED_LENGTH)
        return self.status

    def truncate_outputs(self, num_outputs: int) -> None:
        """Drops outputs past the first `num_outputs` of a finished sequence (several tokens
        accepted in one step, and a stop string ended it at an earlier one)."""
        if not self.is_finished:
            raise RuntimeError(f"sequence {self.seq_id} is running; cannot drop its outputs")
        drop = self.num_output_tokens - num_outputs
        if drop > 0:
            del self.output_token_ids[num_outputs:]
            del self._token_ids[len(self._token_ids) - drop :]

    def finish(self, status: RequestStatus, stop_reason: int | str | None = None) -> RequestStatus:
        """Marks the sequence finished (pages are freed by the scheduler, not here)."""
        if not status.is_finished:
            raise ValueError(f"finish needs a FINISHED_* status, got {status.name}")
        self.status = status
        self.stop_reason = stop_reason
        if self.num_pending:  # tokens sampled after the end are not outputs
            del self.output_token_ids[-self.num_pending :]
            del self._token_ids[-self.num_pending :]
            self.num_pending = 0
        return status
