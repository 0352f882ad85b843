"""A device-free runner stand-in whose outputs can be checked by hand.

Rule: the token sampled for a sequence is the sum of all its tokens so far (prompt + outputs,
i.e. everything up to and including the chunk fed this step) modulo `vocab_size` (97).
Example: prompt [1, 2, 3] -> 6 (1+2+3), then 12 (1+2+3+6), 24, 48, 96, 95 (192 % 97), ...

The mock keeps a fake KV cache (page id -> token id per slot) and computes that sum from what it
reads back through the page table, the way attention would. Before each chunk it checks that
every earlier position already holds the right token (this covers prefix-cache hits and shared
sibling pages), that the fed tokens are the sequence's next ones, and that no page it writes is
shared with another sequence. A wrong page table therefore fails loudly or yields wrong tokens.
"""

from __future__ import annotations

from xlaserve.engine.request import RequestStatus
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.engine.scheduler import Scheduler, SchedulerOutput

VOCAB_SIZE = 97


class MockRunner:
    def __init__(self, scheduler: Scheduler, vocab_size: int = VOCAB_SIZE) -> None:
        self.block_manager = scheduler.block_manager
        self.page_size = scheduler.config.page_size
        self.vocab_size = vocab_size
        self.kv: dict[int, list[int | None]] = {}  # page id -> token id in each slot

    def read(self, page_ids: list[int], num_tokens: int) -> list[int | None]:
        """Tokens at positions 0..num_tokens-1 as stored in the pages."""
        size = self.page_size
        return [
            self.kv.get(page_ids[p // size], [None] * size)[p % size] for p in range(num_tokens)
        ]

    def execute(self, output: SchedulerOutput) -> dict[int, int]:
        """Writes every fed token into its slot, returns seq_id -> next token for sample=True."""
        size = self.page_size
        writer: dict[int, int] = {}  # page -> the sequence writing it this step
        sampled: dict[int, int] = {}
        for item in output.scheduled:
            seq = item.seq
            start, end = item.start_pos, item.start_pos + len(item.token_ids)
            assert item.token_ids, f"seq {seq.seq_id}: empty chunk"
            assert item.token_ids == seq.all_token_ids[start:end], f"seq {seq.seq_id}: wrong tokens"
            assert item.sample == (end == seq.num_tokens)
            pages = item.page_ids
            assert len(set(pages)) == len(pages), f"seq {seq.seq_id}: page twice in {pages}"
            assert all(0 <= p < self.block_manager.num_pages for p in pages), pages
            assert len(pages) * size >= end, f"seq {seq.seq_id}: {pages} too small for {end}"
            assert self.read(pages, start) == seq.all_token_ids[:start], (
                f"seq {seq.seq_id}: pages {pages} do not hold its first {start} tokens"
            )
            for pos, token in enumerate(item.token_ids, start):
                page = pages[pos // size]
                assert writer.setdefault(page, seq.seq_id) == seq.seq_id, f"page {page} shared"
                assert self.block_manager.ref_counts[page] == 1, f"write to shared page {page}"
                self.kv.setdefault(page, [None] * size)[pos % size] = token
            if item.sample:
                sampled[seq.seq_id] = sum(self.read(pages, end)) % self.vocab_size
        return sampled


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
) -> list[SchedulerOutput]:
    """Steps until nothing is left unfinished; returns every step's SchedulerOutput."""
    outputs = []
    while scheduler.has_unfinished():
        assert len(outputs) < max_steps, "scheduler did not finish"
        output = scheduler.schedule()
        assert output.scheduled, "scheduler stalled with unfinished sequences"
        scheduler.update_from_output(output, runner.execute(output))
        outputs.append(output)
    return outputs


class EngineMockRunner:
    """The mock behind `LLMEngine`'s runner interface (warmup / execute / release / counters).

    Sampled tokens follow MockRunner's rule; when logprobs are asked for, the sampled token's
    logprob is -(token % 10) / 10 and the top list is the sampled token alone (checkable by hand).
    """

    def __init__(self, scheduler: Scheduler, vocab_size: int = VOCAB_SIZE) -> None:
        from xlaserve.engine.runner import CompileCounter

        self.mock = MockRunner(scheduler, vocab_size)
        self.compiles = CompileCounter()
        self.compiles_after_warmup = 0
        self.warmup_seconds = 0.0
        self.released: list[int] = []

    def warmup(self) -> None:
        pass

    def release(self, seq_id: int) -> None:
        self.released.append(seq_id)

    def execute(self, output: SchedulerOutput):
        from xlaserve.engine.runner import RunnerOutput, SampledToken

        sampled = self.mock.execute(output)
        result = RunnerOutput()
        seqs = {item.seq.seq_id: item.seq for item in output.scheduled}
        for seq_id, token in sampled.items():
            if seqs[seq_id].params.logprobs is None:
                result.sampled[seq_id] = SampledToken(token)
            else:
                lp = -(token % 10) / 10
                result.sampled[seq_id] = SampledToken(token, lp, [(token, lp)])
        return result


def mock_engine(*, num_pages: int = 64, max_num_seqs: int = 8, tokenizer=None, **scheduler_kw):
    """An LLMEngine over the mock runner: page size 4, max_model_len 64, vocab 97, eos 0."""
    from xlaserve.engine.llm_engine import LLMEngine
    from xlaserve.engine.scheduler import SchedulerConfig

    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=scheduler_kw.pop("max_num_batched_tokens", 32),
        max_model_len=64,
        page_size=4,
        num_pages=num_pages,
        **scheduler_kw,
    )
    scheduler = Scheduler(config)
    return LLMEngine(
        scheduler,
        EngineMockRunner(scheduler),
        tokenizer=tokenizer,
        vocab_size=VOCAB_SIZE,
        eos_token_ids=(0,),
        model_name="mock",
        dtype="none",
    )
