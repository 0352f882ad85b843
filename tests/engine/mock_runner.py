"""A device-free runner stand-in whose outputs can be checked by hand.

Rule: the token sampled for a sequence is the sum of all its tokens so far (prompt + outputs,
i.e. everything up to and including the chunk fed this step) modulo `vocab_size` (97).
Example: prompt [1, 2, 3] -> 6 (1+2+3), then 12 (1+2+3+6), 24, 48, 96, 95 (192 % 97), ...

Like a real runner, the mock sees only the `SchedulerOutput` diff: it keeps its own `InputBatch`
and takes each step's chunks from it. It checks every chunk against the scheduler's live state
(so the diff protocol is under test too: a missing token, page or finished id shows), and keeps
a fake KV cache (page id -> token id per slot) from which it computes that sum, the way
attention would read it. Before each chunk it checks that every earlier position already holds
the right token (this covers prefix-cache hits and shared sibling pages), that the fed tokens
are the sequence's next ones, and that no page it writes is shared with another sequence. A
wrong page table therefore fails loudly or yields wrong tokens.
"""

from __future__ import annotations

import math
from dataclasses import replace

from xlaserve.engine.input_batch import Chunk, InputBatch
from xlaserve.engine.request import PENDING_TOKEN, RequestStatus
from xlaserve.engine.runner_api import (
    DeviceInfo,
    KVCacheSpec,
    RunnerOutput,
    RunnerStats,
    SampledToken,
)
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.engine.scheduler import Scheduler
from xlaserve.engine.scheduler_output import SchedulerOutput

VOCAB_SIZE = 97


class MockRunner:
    def __init__(self, scheduler: Scheduler, vocab_size: int = VOCAB_SIZE) -> None:
        config = scheduler.config
        self.scheduler = scheduler  # read only to check the chunks against the truth
        self.block_manager = scheduler.block_manager
        self.page_size = config.page_size
        self.vocab_size = vocab_size
        self.batch = InputBatch(
            max_num_seqs=config.max_num_seqs,
            pages_per_seq=math.ceil(config.max_model_len / config.page_size),
            page_size=config.page_size,
            vocab_size=vocab_size,
        )
        self.kv: dict[int, list[int | None]] = {}  # page id -> token id in each slot
        self.last_chunks: list[Chunk] = []  # what the latest execute() ran, in batch order
        # Async scheduling: seq_id -> the token the mock last sampled for it, which a pending
        # token (PENDING_TOKEN in the chunk) stands for, as the device's copy does.
        self.last_sampled: dict[int, int] = {}

    def read(self, page_ids: list[int], num_tokens: int) -> list[int | None]:
        """Tokens at positions 0..num_tokens-1 as stored in the pages."""
        size = self.page_size
        return [
            self.kv.get(page_ids[p // size], [None] * size)[p % size] for p in range(num_tokens)
        ]

    def execute(self, output: SchedulerOutput) -> dict[int, int]:
        """Applies the diff, writes every fed token into its slot and returns
        seq_id -> next token for each chunk that samples."""
        # Announced once, and only for sequences the runner holds.
        assert all(i in self.batch for i in output.finished_seq_ids), output.finished_seq_ids
        chunks = self.batch.update(output)
        # Chunks hold the batch's live page tables; keep what this step saw for the tests.
        self.last_chunks = [replace(c, page_ids=list(c.page_ids)) for c in chunks]
        self._check_batch(output, chunks)
        size = self.page_size
        writer: dict[int, int] = {}  # page -> the sequence writing it this step
        sampled: dict[int, int] = {}
        for c in chunks:
            start, end = c.start_pos, c.start_pos + len(c.token_ids)
            pages = c.page_ids
            assert len(set(pages)) == len(pages), f"seq {c.seq_id}: page twice in {pages}"
            assert all(0 <= p < self.block_manager.num_pages for p in pages), pages
            assert len(pages) * size >= end, f"seq {c.seq_id}: {pages} too small for {end}"
            known = self.batch.token_ids(c.seq_id)
            assert self.read(pages, start) == known[:start], (
                f"seq {c.seq_id}: pages {pages} do not hold its first {start} tokens"
            )
            for pos, token in enumerate(c.token_ids, start):
                if token == PENDING_TOKEN:
                    assert pos == end - 1, f"seq {c.seq_id}: a pending token not at the end"
                    token = self.last_sampled[c.seq_id]
                page = pages[pos // size]
                assert writer.setdefault(page, c.seq_id) == c.seq_id, f"page {page} shared"
                assert self.block_manager.ref_counts[page] == 1, f"write to shared page {page}"
                self.kv.setdefault(page, [None] * size)[pos % size] = token
            if c.sample:
                sampled[c.seq_id] = sum(self.read(pages, end)) % self.vocab_size
                self.last_sampled[c.seq_id] = sampled[c.seq_id]
        return sampled

    def _check_batch(self, output: SchedulerOutput, chunks: list[Chunk]) -> None:
        """The batch rebuilt from diffs equals the scheduler's truth, chunk by chunk."""
        scheduler = self.scheduler
        new_ids = [s.seq_id for s in output.new_seqs]
        cached_ids = [s.seq_id for s in output.cached_seqs]
        assert sorted(new_ids + cached_ids) == sorted(output.num_scheduled_tokens)
        assert not set(cached_ids) & output.finished_seq_ids, "a sequence that left is cached"
        # Exactly the running sequences are in the batch: every one that left was announced.
        assert len(self.batch) == scheduler.num_running
        assert all(s.seq_id in self.batch for s in scheduler.running)
        assert [c.seq_id for c in chunks] == list(output.num_scheduled_tokens)
        for c in chunks:
            seq = scheduler.get_sequence(c.seq_id)
            assert seq is not None and seq.status is RequestStatus.RUNNING, c.seq_id
            start, end = c.start_pos, c.start_pos + len(c.token_ids)
            assert c.token_ids, f"seq {c.seq_id}: empty chunk"
            assert len(c.token_ids) == output.num_scheduled_tokens[c.seq_id]
            assert start == seq.num_computed_tokens, f"seq {c.seq_id}: starts at {start}"
            assert self.batch.token_ids(c.seq_id) == seq.all_token_ids, f"seq {c.seq_id}: tokens"
            assert self.batch.output_token_ids(c.seq_id) == seq.output_token_ids
            assert self.batch.params(c.seq_id) is seq.params
            assert c.token_ids == seq.all_token_ids[start:end], f"seq {c.seq_id}: wrong tokens"
            assert c.sample == (end == seq.num_tokens)
            assert c.page_ids == self.block_manager.page_ids(seq), f"seq {c.seq_id}: pages"


def reference_output(
    prompt: list[int],
    params: SamplingParams,
    *,
    max_model_len: int,
    eos_token_ids: tuple[int, ...] = (),
    vocab_size: int = VOCAB_SIZE,
) -> tuple[list[int], RequestStatus, int | None]:
    """What the mock produces for `prompt` run alone, with the stop rules re-derived here:
    (output tokens, final status, stop reason)."""
    tokens, out = list(prompt), []
    while True:
        token = sum(tokens) % vocab_size
        tokens.append(token)
        out.append(token)
        if len(tokens) >= max_model_len:
            return out, RequestStatus.FINISHED_LENGTH, None
        if len(out) >= params.min_tokens:
            if token in eos_token_ids and not params.ignore_eos:
                return out, RequestStatus.FINISHED_STOPPED, None
            if token in params.stop_token_ids:
                return out, RequestStatus.FINISHED_STOPPED, token
        if params.max_tokens is not None and len(out) >= params.max_tokens:
            return out, RequestStatus.FINISHED_LENGTH, None


def run_to_completion(
    scheduler: Scheduler, runner: MockRunner, *, max_steps: int = 10_000
) -> list[tuple[SchedulerOutput, list[Chunk]]]:
    """Steps until nothing is left unfinished; returns every step's (output, chunks run)."""
    steps = []
    while scheduler.has_unfinished():
        assert len(steps) < max_steps, "scheduler did not finish"
        output = scheduler.schedule()
        assert not output.is_empty, "scheduler stalled with unfinished sequences"
        scheduler.update_from_output(output, runner.execute(output))
        steps.append((output, runner.last_chunks))
    return steps


class EngineMockRunner:
    """The mock behind the `Runner` protocol (xlaserve/engine/runner_api.py), for `LLMEngine`.

    Sampled tokens follow MockRunner's rule; when logprobs are asked for, the sampled token's
    logprob is -(token % 10) / 10 and the top list is the sampled token alone (checkable by hand).
    """

    kv_cache_spec = KVCacheSpec(
        num_layers=1, page_size=4, num_kv_heads=1, head_dim=2, dtype="float32"
    )

    def __init__(self, scheduler: Scheduler, vocab_size: int = VOCAB_SIZE) -> None:
        self.mock = MockRunner(scheduler, vocab_size)
        self.warmed_up = False
        self.left_batch: list[int] = []  # seq ids seen in finished_seq_ids, in arrival order
        self._stats = RunnerStats()

    def warmup(self) -> None:
        self.warmed_up = True
        self._stats.warmup_seconds = 0.0

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        self.left_batch.extend(sorted(output.finished_seq_ids))
        sampled = self.mock.execute(output)
        result = RunnerOutput()
        for seq_id, token in sampled.items():
            if self.mock.batch.params(seq_id).logprobs is None:
                result.sampled[seq_id] = SampledToken(token)
            else:
                lp = -(token % 10) / 10
                result.sampled[seq_id] = SampledToken(token, lp, [(token, lp)])
        return result

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(platform="mock", num_devices=1)

    # Async scheduling (used when `supports_async`): the step is computed at dispatch, its
    # tokens handed over at collect, as a device would.
    supports_async = False

    def dispatch(self, output: SchedulerOutput) -> RunnerOutput:
        self.dispatched_while_in_flight += self.in_flight > 0
        self.in_flight += 1
        return self.execute(output)

    def collect(self, flight: RunnerOutput) -> RunnerOutput:
        self.in_flight -= 1
        for seq_id, s in flight.sampled.items():
            self.mock.batch.resolve_pending(seq_id, s.token)
        return flight

    in_flight = 0  # steps dispatched and not collected yet
    dispatched_while_in_flight = 0  # dispatches made before the previous step was collected

    def stats(self) -> RunnerStats:
        return self._stats

    def shutdown(self) -> None:
        pass


def mock_engine(
    *,
    num_pages: int = 64,
    max_num_seqs: int = 8,
    tokenizer=None,
    structured=None,
    async_scheduling: bool = False,
    **scheduler_kw,
):
    """An LLMEngine over the mock runner: page size 4, max_model_len 64, vocab 97, eos 0.
    `structured`: a StructuredOutputManager (the mock ignores token masks).
    `async_scheduling`: the runner overlaps steps (dispatch/collect)."""
    from xlaserve.engine.llm_engine import LLMEngine
    from xlaserve.engine.scheduler import SchedulerConfig

    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=scheduler_kw.pop("max_num_batched_tokens", 32),
        max_model_len=64,
        page_size=EngineMockRunner.kv_cache_spec.page_size,
        num_pages=num_pages,
        **scheduler_kw,
    )
    scheduler = Scheduler(config)
    runner = EngineMockRunner(scheduler)
    runner.supports_async = async_scheduling
    return LLMEngine(
        scheduler,
        runner,
        tokenizer=tokenizer,
        vocab_size=VOCAB_SIZE,
        eos_token_ids=(0,),
        model_name="mock",
        dtype="none",
        structured=structured,
        async_scheduling=async_scheduling,
    )
