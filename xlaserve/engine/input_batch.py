"""The one host-side packer: scheduler outputs -> the numpy arrays of one step.

`InputBatch` persists across steps (like vLLM's `InputBatch` and tpu-inference's persistent
batch manager): it applies each `SchedulerOutput` diff to its per-sequence state (tokens, page
table, sampling options, penalty row) and packs the step: token arrays padded to a token bucket
T, per-sequence metadata padded to the sequence cap R, sampling rows padded to a sequence bucket
S. Every backend consumes exactly these arrays (the JAX runner, the torch runner, multi-host
followers, the bucket sweep); a backend that needs its own tensors only wraps them.

numpy only: no device library is imported here.
Axis letters (docs/glossary.md): T tokens, R sequence cap, S sequence bucket, V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from xlaserve.engine.request import PENDING_TOKEN
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.engine.scheduler_output import SchedulerOutput
from xlaserve.lora.slots import SlotManager
from xlaserve.multimodal.mrope import step_mrope_positions
from xlaserve.multimodal.placement import image_placements

GREEDY_EPS = 1e-5  # temperatures below this are greedy (the samplers use the same bound)
# A step that scores prompt tokens runs in a token bucket of at least this many tokens, so
# only those buckets need a prompt-logprobs graph (decode-sized buckets never score prompts).
MIN_PROMPT_LOGPROBS_TOKENS = 16


def prompt_logprobs_buckets(token_buckets: Sequence[int]) -> tuple[int, ...]:
    """The token buckets a prompt-scoring step can run in."""
    floor = min(MIN_PROMPT_LOGPROBS_TOKENS, token_buckets[-1])
    return tuple(b for b in token_buckets if b >= floor)


class StepInputs(NamedTuple):
    """One step's forward inputs. A NamedTuple, so it is a pytree as is."""

    input_ids: np.ndarray  # i32[T]
    positions: np.ndarray  # i32[T] (M-RoPE models: i32[3, T])
    slot_mapping: np.ndarray  # i32[T] page * page_size + offset, -1 for padding
    cu_q_lens: np.ndarray  # i32[R + 1] cumulative new tokens per sequence
    kv_lens: np.ndarray  # i32[R] tokens in the cache per sequence after the step
    page_indices: np.ndarray  # i32[R, pages_per_seq] page tables
    num_seqs: np.ndarray  # i32[1] real sequences
    logits_indices: np.ndarray  # i32[R] each sequence's last new token (padding: the last real one)
    # i32[R, Q] (Q = 1 + drafts per step): a sequence's last committed token then its drafts,
    # the rows speculative decoding verifies; repeats the last one past its drafts.
    spec_indices: np.ndarray
    # LoRA: i32[T] each token's adapter slot (0 = none: always so without LoRA).
    lora_slots: np.ndarray | None = None
    # Async scheduling: i32[T] the previous step's sampling row whose token (still on the
    # device) this position feeds, -1 where input_ids holds the token.
    prev_token_rows: np.ndarray | None = None


class SamplingRows(NamedTuple):
    """Per-row sampling options, all [S]; padding rows are greedy with no penalties."""

    temperature: np.ndarray  # f32, 0 = greedy
    top_k: np.ndarray  # i32, V = off
    top_p: np.ndarray  # f32, 1 = off
    min_p: np.ndarray  # f32, 0 = off
    presence_penalty: np.ndarray  # f32
    frequency_penalty: np.ndarray  # f32
    repetition_penalty: np.ndarray  # f32, 1 = off
    penalty_row: np.ndarray  # i32 penalty-state row, R = none
    seed: np.ndarray  # u32 request seed (or the engine seed for unseeded rows)
    stream: np.ndarray  # i32 sample index (seeded) or sequence id (unseeded)
    step: np.ndarray  # i32 output tokens so far
    # Scalars: which optional stages any row needs.
    use_penalties: np.ndarray  # bool[]
    use_filters: np.ndarray  # bool[] top-k / top-p / min-p
    use_random: np.ndarray  # bool[]
    use_logprobs: np.ndarray  # bool[]
    # Structured outputs: i32[S, ceil(V/32)] allowed tokens (all bits set = unconstrained) and
    # whether any row is constrained. None only where a caller builds rows by hand.
    token_bitmask: np.ndarray | None = None
    use_bitmask: np.ndarray = np.bool_(False)


@dataclass(frozen=True)
class Chunk:
    """One sequence's share of a step, in batch order."""

    seq_id: int
    token_ids: list[int]  # tokens fed, at positions start_pos ...
    start_pos: int
    page_ids: list[int]  # the page table (the live list: read, never mutate)
    sample: bool  # the chunk ends at the last known token: sample the next one
    num_drafts: int = 0  # speculative drafts at the end of token_ids (sample is then True)


@dataclass(frozen=True)
class PenaltyInit:
    """A penalty-state row to write before sampling (a sequence starts or resumes)."""

    row: int
    prompt_mask: np.ndarray  # bool[V]
    output_counts: np.ndarray  # i32[V]
    logit_bias: np.ndarray  # f32[V]


@dataclass(frozen=True)
class PromptLogprobSpan:
    seq_id: int
    first_position: int  # prompt position of the first scored token (>= 1)
    rows: np.ndarray  # rows of the step's token batch that score it, in order
    num_logprobs: int


class DraftRows(NamedTuple):
    """Per sampling row [S]: the drafts it feeds (speculative decoding)."""

    draft_token_ids: np.ndarray  # i32[S, K], 0 past num_draft_tokens
    num_draft_tokens: np.ndarray  # i32[S]


@dataclass(frozen=True)
class PreparedStep:
    chunks: list[Chunk]
    inputs: StepInputs
    sampling: SamplingRows | None  # None: nothing to sample this step
    sampling_seq_ids: dict[int, int]  # row -> seq_id of every row that samples
    penalty_inits: list[PenaltyInit]
    prompt_logprob_targets: np.ndarray | None  # i32[T], the token each row scores
    prompt_logprob_spans: list[PromptLogprobSpan]
    want_logprobs: dict[int, int]  # row -> top logprobs asked for, for rows that want them
    drafts: DraftRows | None = None  # None: no row feeds drafts this step
    # LoRA: (slot, adapter) writes the runner makes before the forward (adapters entering
    # the device for this step).
    lora_writes: list = dataclasses.field(default_factory=list)
    # Multimodal: which step rows take which image feature rows (multimodal/placement.py).
    image_placements: list = dataclasses.field(default_factory=list)


@dataclass
class _SeqState:
    seq_id: int
    sample_index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    page_ids: list[int]
    num_computed_tokens: int
    penalty_row: int | None = None
    lora: object | None = None  # the LoRAAdapter the sequence runs under
    mm_items: tuple = ()  # the prompt's images (multimodal/inputs.ImageItem)


def needs_penalty_state(params: SamplingParams) -> bool:
    return bool(
        params.presence_penalty
        or params.frequency_penalty
        or params.repetition_penalty != 1.0
        or params.logit_bias
    )


def penalty_row_values(
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    logit_bias: dict[int, float] | None,
    vocab: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host-side contents of a penalty row: prompt mask, output counts, logit bias [V]."""
    mask = np.zeros(vocab, np.bool_)
    mask[np.asarray(prompt_ids, np.int64)] = True
    counts = np.bincount(np.asarray(output_ids, np.int64), minlength=vocab).astype(np.int32)
    bias = np.zeros(vocab, np.float32)
    for token, value in (logit_bias or {}).items():
        bias[int(token)] = value
    return mask, counts[:vocab], bias


def bucket_for(n: int, buckets: Sequence[int] | None) -> int:
    """The smallest bucket >= n (n itself when there are no buckets)."""
    if buckets is None:
        return n
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def pack_tokens(
    chunks: Iterable[Chunk],
    num_tokens: int,
    num_rows: int,
    pages_per_seq: int,
    page_size: int,
    spec_width: int = 1,
    chunk_lora_slots: Sequence[int] | None = None,
) -> StepInputs:
    """The step's forward inputs for `chunks`, padded to `num_tokens` and `num_rows` rows;
    `spec_width` = 1 + the drafts a sequence may feed. `chunk_lora_slots`: one LoRA adapter
    slot per chunk (None: all 0, no adapter); each token carries its chunk's slot in
    `lora_slots` (padding: slot 0)."""
    drafts = np.zeros(num_rows, np.int32)
    lora_slots = np.zeros(num_tokens, np.int32)
    ids = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slots = np.full(num_tokens, -1, np.int32)
    cu_q_lens = np.zeros(num_rows + 1, np.int32)
    kv_lens = np.zeros(num_rows, np.int32)
    page_indices = np.zeros((num_rows, pages_per_seq), np.int32)
    offset = i = 0
    for i, c in enumerate(chunks, 1):
        n = len(c.token_ids)
        pos = np.arange(c.start_pos, c.start_pos + n, dtype=np.int32)
        pages = np.asarray(c.page_ids, np.int32)
        ids[offset : offset + n] = c.token_ids
        positions[offset : offset + n] = pos
        slots[offset : offset + n] = pages[pos // page_size] * page_size + pos % page_size
        page_indices[i - 1, : len(pages)] = pages
        kv_lens[i - 1] = c.start_pos + n
        drafts[i - 1] = c.num_drafts
        if chunk_lora_slots is not None:
            lora_slots[offset : offset + n] = chunk_lora_slots[i - 1]
        offset += n
        cu_q_lens[i] = offset
    cu_q_lens[i + 1 :] = offset
    last = np.maximum(cu_q_lens[1:] - 1, 0)
    spec = (last - drafts)[:, None] + np.minimum(np.arange(spec_width)[None, :], drafts[:, None])
    return StepInputs(
        input_ids=ids,
        positions=positions,
        slot_mapping=slots,
        cu_q_lens=cu_q_lens,
        kv_lens=kv_lens,
        page_indices=page_indices,
        num_seqs=np.asarray([i], np.int32),
        logits_indices=last,
        spec_indices=spec.astype(np.int32),
        lora_slots=lora_slots,
        prev_token_rows=np.full(num_tokens, -1, np.int32),
    )


def feed_pending_tokens(
    chunks: Iterable[Chunk], inputs: StepInputs, pending_rows: Mapping[int, int]
) -> None:
    """Points each pending token (async scheduling) at the previous step's sampling row that
    is producing it. A pending token is always its sequence's last, so it ends its chunk."""
    offset = 0
    for c in chunks:
        n = len(c.token_ids)
        if c.token_ids[-1] == PENDING_TOKEN:
            if c.seq_id not in pending_rows or PENDING_TOKEN in c.token_ids[:-1]:
                raise RuntimeError(f"sequence {c.seq_id}: a pending token no step produces")
            inputs.prev_token_rows[offset + n - 1] = pending_rows[c.seq_id]
            inputs.input_ids[offset + n - 1] = 0
        offset += n


def default_sampling_rows(num_rows: int, *, vocab_size: int, none_row: int, seed: int) -> dict:
    """Field -> array of `num_rows` padding rows (greedy, no penalties), as `SamplingRows`."""
    return dict(
        temperature=np.zeros(num_rows, np.float32),
        top_k=np.full(num_rows, vocab_size, np.int32),
        top_p=np.ones(num_rows, np.float32),
        min_p=np.zeros(num_rows, np.float32),
        presence_penalty=np.zeros(num_rows, np.float32),
        frequency_penalty=np.zeros(num_rows, np.float32),
        repetition_penalty=np.ones(num_rows, np.float32),
        penalty_row=np.full(num_rows, none_row, np.int32),
        seed=np.full(num_rows, np.uint32(seed % 2**32), np.uint32),
        stream=np.zeros(num_rows, np.int32),
        step=np.zeros(num_rows, np.int32),
        use_penalties=np.bool_(False),
        use_filters=np.bool_(False),
        use_random=np.bool_(False),
        use_logprobs=np.bool_(False),
        token_bitmask=np.full((num_rows, (vocab_size + 31) // 32), -1, np.int32),
        use_bitmask=np.bool_(False),
    )


class InputBatch:
    """Per-sequence host state of the runner's batch, updated by scheduler-output diffs.

    token_buckets / seq_buckets: the padded sizes T and S (None: exactly what is scheduled, for
    eager backends). The penalty-state rows [0, max_num_seqs) are handed out here; row
    `max_num_seqs` means "no penalties".
    """

    def __init__(
        self,
        *,
        max_num_seqs: int,
        pages_per_seq: int,
        page_size: int,
        vocab_size: int,
        seed: int = 0,
        token_buckets: Sequence[int] | None = None,
        seq_buckets: Sequence[int] | None = None,
        num_speculative_tokens: int = 0,
        max_loras: int = 0,
        multimodal: bool = False,
        mrope: bool = False,
    ) -> None:
        self.multimodal = multimodal  # place image features (a vision-language model)
        self.mrope = mrope  # positions i32[3, T] (Qwen2.5-VL's M-RoPE; multimodal/mrope.py)
        self.max_num_seqs = max_num_seqs
        self.pages_per_seq = pages_per_seq
        self.page_size = page_size
        self.vocab_size = vocab_size
        self.seed = seed % 2**32
        self.token_buckets = tuple(token_buckets) if token_buckets else None
        self.seq_buckets = tuple(seq_buckets) if seq_buckets else None
        self.num_speculative_tokens = num_speculative_tokens
        self._seqs: dict[int, _SeqState] = {}
        self._free_penalty_rows = list(range(max_num_seqs))
        # LoRA adapter slots on the device (None: the engine serves the base model only).
        self.lora_slots = SlotManager(max_loras) if max_loras else None

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def token_ids(self, seq_id: int) -> list[int]:
        """Prompt + outputs known for the sequence (the live list: read, never mutate)."""
        return self._seqs[seq_id].token_ids

    def page_ids(self, seq_id: int) -> list[int]:
        """The sequence's page table (the live list: read, never mutate)."""
        return self._seqs[seq_id].page_ids

    def output_token_ids(self, seq_id: int) -> list[int]:
        s = self._seqs[seq_id]
        return s.token_ids[s.num_prompt_tokens :]

    def resolve_pending(self, seq_id: int, token: int) -> None:
        """Async scheduling: the sequence's oldest pending token (one of its last two) now
        has its sampled id."""
        state = self._seqs.get(seq_id)
        if state is None:
            return
        ids = state.token_ids
        for i in range(max(0, len(ids) - 2), len(ids)):
            if ids[i] == PENDING_TOKEN:
                ids[i] = token
                return

    def params(self, seq_id: int) -> SamplingParams:
        return self._seqs[seq_id].params

    # ---- applying the diff ----------------------------------------------------------------
    def update(self, out: SchedulerOutput) -> list[Chunk]:
        """Applies the diff; returns the scheduled chunks in batch order."""
        for seq_id in out.finished_seq_ids:
            state = self._seqs.pop(seq_id, None)
            if state is not None and state.penalty_row is not None:
                self._free_penalty_rows.append(state.penalty_row)
        for new in out.new_seqs:
            if new.seq_id in self._seqs:
                raise ValueError(f"sequence {new.seq_id} is already in the batch")
            self._seqs[new.seq_id] = _SeqState(
                seq_id=new.seq_id,
                sample_index=new.sample_index,
                token_ids=list(new.token_ids),
                num_prompt_tokens=new.num_prompt_tokens,
                params=new.params,
                page_ids=list(new.page_ids),
                num_computed_tokens=new.num_computed_tokens,
                lora=new.lora,
                mm_items=new.mm_items,
            )
        for cached in out.cached_seqs:
            state = self._seqs.get(cached.seq_id)
            if state is None:
                raise ValueError(f"sequence {cached.seq_id} is not in the batch")
            state.token_ids.extend(cached.new_token_ids)
            state.page_ids.extend(cached.new_page_ids)
            state.num_computed_tokens = cached.num_computed_tokens
        chunks = []
        for seq_id, n in out.num_scheduled_tokens.items():
            state = self._seqs[seq_id]
            drafts = out.spec_token_ids.get(seq_id, ())
            if len(drafts) > self.num_speculative_tokens:
                raise ValueError(f"sequence {seq_id}: {len(drafts)} drafts, more than "
                                 f"{self.num_speculative_tokens} per step")  # fmt: skip
            start = state.num_computed_tokens
            end = start + n - len(drafts)
            known = len(state.token_ids)
            if n < 1 or end > known or (drafts and end != known):
                raise ValueError(f"sequence {seq_id}: {n} tokens ({len(drafts)} drafts) "
                                 f"scheduled from {start}, but {known} are known")  # fmt: skip
            tokens = state.token_ids[start:end]
            if drafts:
                tokens = tokens + list(drafts)
            chunks.append(Chunk(seq_id, tokens, start, state.page_ids, end == known, len(drafts)))
        return chunks

    # ---- packing --------------------------------------------------------------------------
    def prepare(
        self,
        out: SchedulerOutput,
        *,
        sampling: bool = True,
        pending_rows: Mapping[int, int] | None = None,
    ) -> PreparedStep:
        """Applies the diff and packs the step. With `sampling=False` the sampling rows are
        left for `with_sampling` (a runner packs them after dispatching the forward, so the
        structured-output bitmasks can be filled meanwhile). `pending_rows` (async
        scheduling): seq_id -> the previous step's sampling row, for sequences whose last
        token is still pending; the forward takes it from the device."""
        chunks = self.update(out)
        num_tokens = out.total_num_scheduled_tokens
        if self.token_buckets and self._scores_prompt(chunks):
            num_tokens = max(num_tokens, min(MIN_PROMPT_LOGPROBS_TOKENS, self.token_buckets[-1]))
        num_tokens = bucket_for(num_tokens, self.token_buckets)
        num_rows = self.max_num_seqs if self.token_buckets else len(chunks)
        slots, writes = self._lora_slots(chunks)
        inputs = pack_tokens(chunks, num_tokens, num_rows, self.pages_per_seq, self.page_size,
                             1 + self.num_speculative_tokens, chunk_lora_slots=slots)  # fmt: skip
        feed_pending_tokens(chunks, inputs, pending_rows or {})
        targets, spans = self._prompt_logprob_targets(chunks, num_tokens)
        step = PreparedStep(chunks, inputs, None, {}, [], targets, spans, {}, lora_writes=writes)
        if self.multimodal:
            placed = image_placements(chunks, lambda seq_id: self._seqs[seq_id].mm_items)
            step = dataclasses.replace(step, image_placements=placed)
        if self.mrope:
            wide = step_mrope_positions(chunks, num_tokens, lambda i: self._seqs[i].mm_items)
            step = dataclasses.replace(step, inputs=inputs._replace(positions=wide))
        return self.with_sampling(step, out) if sampling else step

    def _lora_slots(self, chunks: list[Chunk]) -> tuple[list[int] | None, list]:
        """Each chunk's adapter slot, and the slot writes that make the step's adapters
        resident (least recently used ones leave)."""
        if self.lora_slots is None:
            return None, []
        adapters = [self._seqs[c.seq_id].lora for c in chunks]
        writes = self.lora_slots.assign(a for a in adapters if a is not None)
        slots = [0 if a is None else self.lora_slots.slot_of(a.identity) for a in adapters]
        return slots, writes

    def with_sampling(self, step: PreparedStep, out: SchedulerOutput) -> PreparedStep:
        """The step with its sampling rows (None when no chunk samples)."""
        if not any(c.sample for c in step.chunks):
            return step
        sampling, rows, inits, want = self._sampling_rows(step.chunks, out.token_bitmasks)
        return dataclasses.replace(
            step, sampling=sampling, sampling_seq_ids=rows, penalty_inits=inits,
            want_logprobs=want, drafts=self._draft_rows(step.chunks, len(sampling.temperature)),
        )  # fmt: skip

    def _draft_rows(self, chunks: list[Chunk], num_rows: int) -> DraftRows | None:
        if not any(c.num_drafts for c in chunks):
            return None
        ids = np.zeros((num_rows, self.num_speculative_tokens), np.int32)
        counts = np.zeros(num_rows, np.int32)
        for i, c in enumerate(chunks):
            if c.num_drafts:
                ids[i, : c.num_drafts] = c.token_ids[-c.num_drafts :]
                counts[i] = c.num_drafts
        return DraftRows(ids, counts)

    def _sampling_rows(self, chunks: list[Chunk], bitmasks: Mapping[int, np.ndarray]):
        R, V = self.max_num_seqs, self.vocab_size
        num_rows = bucket_for(len(chunks), self.seq_buckets)
        f = default_sampling_rows(num_rows, vocab_size=V, none_row=R, seed=self.seed)
        rows: dict[int, int] = {}
        inits: list[PenaltyInit] = []
        want: dict[int, int] = {}
        for i, c in enumerate(chunks):
            if not c.sample:
                continue
            s = self._seqs[c.seq_id]
            p = s.params
            rows[i] = c.seq_id
            f["temperature"][i] = p.temperature
            f["top_k"][i] = p.top_k if p.top_k > 0 else V
            f["top_p"][i], f["min_p"][i] = p.top_p, p.min_p
            f["presence_penalty"][i] = p.presence_penalty
            f["frequency_penalty"][i] = p.frequency_penalty
            f["repetition_penalty"][i] = p.repetition_penalty
            if needs_penalty_state(p):
                if s.penalty_row is None:
                    s.penalty_row = self._free_penalty_rows.pop()
                    values = penalty_row_values(
                        s.token_ids[: s.num_prompt_tokens],
                        s.token_ids[s.num_prompt_tokens :],
                        p.logit_bias,
                        V,
                    )
                    inits.append(PenaltyInit(s.penalty_row, *values))
                f["penalty_row"][i] = s.penalty_row
            if p.seed is not None:
                f["seed"][i], f["stream"][i] = p.seed % 2**32, s.sample_index
            else:
                f["stream"][i] = s.seq_id
            f["step"][i] = len(s.token_ids) - s.num_prompt_tokens
            if p.logprobs is not None:
                want[i] = p.logprobs
            bitmask = bitmasks.get(c.seq_id)
            if bitmask is not None:
                f["token_bitmask"][i] = bitmask
                f["use_bitmask"] = np.bool_(True)
        t = f["temperature"]
        random_rows = t >= GREEDY_EPS
        f["use_penalties"] = np.bool_((f["penalty_row"] < R).any())
        f["use_filters"] = np.bool_(
            (random_rows & ((f["top_k"] < V) | (f["top_p"] < 1.0) | (f["min_p"] > 0.0))).any()
        )
        f["use_random"] = np.bool_(random_rows.any())
        f["use_logprobs"] = np.bool_(bool(want))
        return SamplingRows(**f), rows, inits, want

    def _scores_prompt(self, chunks: list[Chunk]) -> bool:
        for c in chunks:
            s = self._seqs[c.seq_id]
            if s.params.prompt_logprobs is not None and c.start_pos < s.num_prompt_tokens - 1:
                return True
        return False

    def _prompt_logprob_targets(self, chunks: list[Chunk], num_tokens: int):
        """Row at prompt position p scores the prompt token at p + 1."""
        targets, spans, offset = None, [], 0
        for c in chunks:
            n = len(c.token_ids)
            s = self._seqs[c.seq_id]
            k = s.params.prompt_logprobs
            last = min(c.start_pos + n, s.num_prompt_tokens - 1)
            if k is not None and last > c.start_pos:
                if targets is None:
                    targets = np.zeros(num_tokens, np.int32)
                rows = np.arange(offset, offset + last - c.start_pos)
                targets[rows] = s.token_ids[c.start_pos + 1 : last + 1]
                spans.append(PromptLogprobSpan(c.seq_id, c.start_pos + 1, rows, k))
            offset += n
        return targets, spans
