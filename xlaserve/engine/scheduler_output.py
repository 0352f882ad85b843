"""What the scheduler decided for one step, as plain data: the only thing runners consume.

It is a diff against the previous step (as vLLM v1's `SchedulerOutput`): a sequence entering
the batch (first admission, or readmission after a preemption) arrives whole as a
`NewSequence`; a sequence already in the batch arrives as a `CachedSequence` carrying only the
tokens appended since it was last scheduled and the pages added to its table. Sequences that
left the batch (finished, aborted, preempted) are listed in `finished_seq_ids`, so a runner can
drop whatever it keeps for them. Runners never read live scheduler objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.pooling.params import PoolingTask

if TYPE_CHECKING:
    from xlaserve.lora.adapter import LoRAAdapter


@dataclass(frozen=True)
class NewSequence:
    """A sequence entering the runner's batch, with everything needed to run it."""

    seq_id: int
    request_id: str
    sample_index: int  # which of the request's n samples (seeded streams use it)
    token_ids: tuple[int, ...]  # prompt + outputs so far
    num_prompt_tokens: int
    params: SamplingParams
    page_ids: tuple[int, ...]  # the page table after this step's allocation
    num_computed_tokens: int  # tokens already in the cache (prefix-cache hits)
    lora: LoRAAdapter | None = None  # the adapter it runs under (its weights, by reference)
    pooling: PoolingTask | None = None  # a pooling request: its output is pooled, not sampled
    mm_items: tuple = ()  # the prompt's images (multimodal/inputs.ImageItem), in prompt order


@dataclass(frozen=True)
class CachedSequence:
    """A sequence already in the runner's batch: what changed since it was last scheduled."""

    seq_id: int
    new_token_ids: tuple[int, ...]  # tokens appended since (the tokens sampled for it)
    new_page_ids: tuple[int, ...]  # pages appended to its table
    num_computed_tokens: int  # tokens in the cache before this step


@dataclass(frozen=True)
class SchedulerOutput:
    new_seqs: tuple[NewSequence, ...] = ()
    cached_seqs: tuple[CachedSequence, ...] = ()
    # seq_id -> tokens fed this step, in batch order (every scheduled sequence, new or cached).
    num_scheduled_tokens: dict[int, int] = field(default_factory=dict)
    # Sequences that left the batch since the previous step: their runner state can go.
    finished_seq_ids: frozenset[int] = frozenset()
    preempted_seq_ids: tuple[int, ...] = ()  # preempted in this step (also in finished_seq_ids)
    # Structured outputs: seq_id -> int32[ceil(V/32)] allowed next tokens (bit t%32 of word
    # t//32), for constrained sequences that sample this step. The engine may hand a mapping
    # still being filled on another thread (`PendingBitmasks`): reading it waits for it.
    token_bitmasks: Mapping[int, np.ndarray] = field(default_factory=dict)
    # Speculative decoding: seq_id -> draft tokens fed after its last committed token (they
    # are counted in num_scheduled_tokens), and the sequences that sample in this step and
    # should get drafts proposed for the next one.
    spec_token_ids: dict[int, tuple[int, ...]] = field(default_factory=dict)
    propose_seq_ids: frozenset[int] = frozenset()

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def num_seqs(self) -> int:
        return len(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens
