"""A device-free speculative runner for scheduler tests (the mock rule: next token = sum of all
tokens so far % 97, as tests/engine/mock_runner.py).

It writes every fed token, drafts included, into a fake KV cache, checks that each chunk's
committed positions already hold the right tokens (so a page hashed with a rejected draft in it
would be caught on a later prefix hit), verifies drafts greedily by the rule and drafts for the
next step with an oracle that is right for the first `good` tokens and wrong after.
"""

from __future__ import annotations

import math

from tests.engine.mock_runner import VOCAB_SIZE
from xlaserve.engine.input_batch import InputBatch
from xlaserve.engine.scheduler import Scheduler


class SpecMockRunner:
    def __init__(self, scheduler: Scheduler, k: int, good: int) -> None:
        c = scheduler.config
        self.scheduler, self.k, self.good = scheduler, k, good
        self.page_size = c.page_size
        self.batch = InputBatch(
            max_num_seqs=c.max_num_seqs,
            pages_per_seq=math.ceil(c.max_model_len / c.page_size),
            page_size=c.page_size,
            vocab_size=VOCAB_SIZE,
            num_speculative_tokens=k,
        )
        self.kv: dict[int, list[int | None]] = {}
        self.fed_drafts = 0

    def read(self, pages, n):
        size = self.page_size
        return [self.kv.get(pages[p // size], [None] * size)[p % size] for p in range(n)]

    def execute(self, out):
        bm = self.scheduler.block_manager
        chunks = self.batch.update(out)
        sampled, accepted, drafts = {}, {}, {}
        for c in chunks:
            committed = self.batch.token_ids(c.seq_id)
            assert self.read(c.page_ids, c.start_pos) == committed[: c.start_pos]
            for pos, token in enumerate(c.token_ids, c.start_pos):
                page = c.page_ids[pos // self.page_size]
                assert bm.ref_counts[page] == 1, f"write to shared page {page}"
                self.kv.setdefault(page, [None] * self.page_size)[pos % self.page_size] = token
            if not c.sample:
                continue
            self.fed_drafts += c.num_drafts
            context, ok = list(committed), []
            for d in c.token_ids[len(c.token_ids) - c.num_drafts :]:
                if d != sum(context) % VOCAB_SIZE:
                    break
                ok.append(d)
                context.append(d)
            final = sum(context) % VOCAB_SIZE
            sampled[c.seq_id], accepted[c.seq_id] = final, ok
            if c.seq_id in out.propose_seq_ids:
                context.append(final)
                guess = []
                for j in range(self.k):
                    t = sum(context) % VOCAB_SIZE
                    guess.append(t if j < self.good else (t + 1) % VOCAB_SIZE)
                    context.append(guess[-1])
                drafts[c.seq_id] = guess
        return sampled, accepted, drafts


def run_spec(scheduler, runner, max_steps=10_000):
    steps = 0
    while scheduler.has_unfinished():
        assert steps < max_steps, "did not finish"
        out = scheduler.schedule()
        assert not out.is_empty, "stalled"
        scheduler.update_from_output(out, *runner.execute(out))
        steps += 1
    return steps
