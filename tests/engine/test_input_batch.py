"""InputBatch and pack_tokens on small cases worked out by hand (numpy only, no device)."""

import numpy as np
import pytest

from xlaserve.engine.input_batch import (
    Chunk,
    InputBatch,
    bucket_for,
    pack_tokens,
    penalty_row_values,
    prompt_logprobs_buckets,
)
from xlaserve.engine.request import PENDING_TOKEN
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.engine.scheduler_output import CachedSequence, NewSequence, SchedulerOutput

# ---------------------------------------------------------------- pack_tokens


def test_pack_tokens_by_hand():
    # Pages of 4 tokens, shuffled page tables, 3 pages per sequence; T = 8 tokens, R = 5 rows.
    chunks = [
        Chunk(10, [7], 0, [6], True),  # one token at position 0: page 6 slot 0 = 24
        # positions 3 | 4, 5 cross a page boundary: 9*4+3 = 39 | page 2: 8, 9
        Chunk(11, [1, 2, 3], 3, [9, 2], True),
        Chunk(12, [], 4, [3, 0, 8], False),  # no tokens: a row with an empty query
        Chunk(13, [5], 7, [1, 4], True),  # position 7, the last slot of page 4: 4*4+3 = 19
    ]
    x = pack_tokens(chunks, num_tokens=8, num_rows=5, pages_per_seq=3, page_size=4)
    assert x.input_ids.tolist() == [7, 1, 2, 3, 5, 0, 0, 0]
    assert x.positions.tolist() == [0, 3, 4, 5, 7, 0, 0, 0]
    assert x.slot_mapping.tolist() == [24, 39, 8, 9, 19, -1, -1, -1]  # padding writes nowhere
    assert x.cu_q_lens.tolist() == [0, 1, 4, 4, 5, 5]
    assert x.kv_lens.tolist() == [1, 6, 4, 8, 0]
    assert x.page_indices.tolist() == [[6, 0, 0], [9, 2, 0], [3, 0, 8], [1, 4, 0], [0, 0, 0]]
    assert x.num_seqs.tolist() == [4]
    # Each row's last new token; the empty row and the padding row repeat the last one before.
    assert x.logits_indices.tolist() == [0, 3, 3, 4, 4]
    assert all(a.dtype == np.int32 for a in x)


def test_pack_tokens_with_nothing_scheduled_is_all_padding():
    x = pack_tokens([], num_tokens=4, num_rows=2, pages_per_seq=2, page_size=4)
    assert x.input_ids.tolist() == x.positions.tolist() == [0, 0, 0, 0]
    assert x.slot_mapping.tolist() == [-1] * 4
    assert x.cu_q_lens.tolist() == [0, 0, 0] and x.kv_lens.tolist() == [0, 0]
    assert x.page_indices.tolist() == [[0, 0], [0, 0]]
    assert x.num_seqs.tolist() == [0] and x.logits_indices.tolist() == [0, 0]


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("start", [0, 1, 3, 4, 5])
@pytest.mark.parametrize("length", [0, 1, 3, 4, 5])
def test_pack_tokens_around_page_boundaries(page_size, start, length):
    # A chunk of `length` tokens from `start` (lengths 0 and 1, page boundaries +-1) between two
    # one-token sequences, with a shuffled page table; 2 padding tokens and 1 padding row.
    rng = np.random.default_rng(100 * page_size + 10 * start + length)
    end = start + length
    pages = [int(p) for p in rng.permutation(12)[: -(-end // page_size)]]
    tokens = [int(t) for t in rng.integers(1, 100, length)]
    chunks = [
        Chunk(0, [42], 0, [15], True),
        Chunk(1, tokens, start, pages, False),
        Chunk(2, [43], 0, [14], True),
    ]
    x = pack_tokens(
        chunks, num_tokens=length + 4, num_rows=4, pages_per_seq=12, page_size=page_size
    )
    slots = [pages[p // page_size] * page_size + p % page_size for p in range(start, end)]
    assert x.input_ids.tolist() == [42, *tokens, 43, 0, 0]
    assert x.positions.tolist() == [0, *range(start, end), 0, 0, 0]
    assert x.slot_mapping.tolist() == [15 * page_size, *slots, 14 * page_size, -1, -1]
    assert x.cu_q_lens.tolist() == [0, 1, 1 + length, 2 + length, 2 + length]
    assert x.kv_lens.tolist() == [1, end, 1, 0]
    assert x.page_indices[1].tolist() == pages + [0] * (12 - len(pages))
    assert x.num_seqs.tolist() == [3]
    assert x.logits_indices.tolist() == [0, length, 1 + length, 1 + length]


# ---------------------------------------------------------------- InputBatch

V = 10  # vocab
GREEDY = SamplingParams(temperature=0)


def new(seq_id, tokens, num_prompt, params, pages, computed=0, sample_index=0) -> NewSequence:
    return NewSequence(
        seq_id=seq_id,
        request_id=f"r{seq_id}",
        sample_index=sample_index,
        token_ids=tuple(tokens),
        num_prompt_tokens=num_prompt,
        params=params,
        page_ids=tuple(pages),
        num_computed_tokens=computed,
    )


def cached(seq_id, tokens=(), pages=(), computed=0) -> CachedSequence:
    return CachedSequence(seq_id, tuple(tokens), tuple(pages), computed)


def output(scheduled, new_seqs=(), cached_seqs=(), finished=()) -> SchedulerOutput:
    return SchedulerOutput(
        new_seqs=tuple(new_seqs),
        cached_seqs=tuple(cached_seqs),
        num_scheduled_tokens=scheduled,
        finished_seq_ids=frozenset(finished),
    )


def input_batch(**kw) -> InputBatch:
    return InputBatch(max_num_seqs=4, pages_per_seq=4, page_size=4, vocab_size=V, seed=123, **kw)


def stages(s) -> list[bool]:
    """The optional sampler stages switched on: penalties, filters, random, logprobs."""
    return [bool(s.use_penalties), bool(s.use_filters), bool(s.use_random), bool(s.use_logprobs)]


def test_update_applies_each_diff_and_returns_the_chunks_in_batch_order():
    b = input_batch()
    # Step 1: a whole prompt and a partial prefill (5 of 6 tokens).
    step1 = output(
        {10: 3, 11: 5},
        [new(10, [1, 2, 3], 3, GREEDY, [5]), new(11, [4, 5, 6, 7, 8, 9], 6, GREEDY, [2, 7])],
    )
    assert b.update(step1) == [
        Chunk(10, [1, 2, 3], 0, [5], True),
        Chunk(11, [4, 5, 6, 7, 8], 0, [2, 7], False),
    ]
    # Step 2: 10 brings its sampled token; 11 brings nothing new and feeds its last token.
    step2 = output(
        {11: 1, 10: 1}, cached_seqs=[cached(10, [6], computed=3), cached(11, computed=5)]
    )
    assert b.update(step2) == [Chunk(11, [9], 5, [2, 7], True), Chunk(10, [6], 3, [5], True)]
    # Step 3: 11 left; 10 decodes into a new page.
    step3 = output({10: 1}, cached_seqs=[cached(10, [12], [0], 4)], finished=[11])
    assert b.update(step3) == [Chunk(10, [12], 4, [5, 0], True)]
    assert len(b) == 1 and 11 not in b and 10 in b
    assert (b.token_ids(10), b.output_token_ids(10)) == ([1, 2, 3, 6, 12], [6, 12])
    # 10 is preempted and readmitted in one output: it leaves first, then enters whole.
    step4 = output(
        {10: 1}, [new(10, [1, 2, 3, 6, 12], 3, GREEDY, [9, 1], computed=4)], finished=[10]
    )
    assert b.update(step4) == [Chunk(10, [12], 4, [9, 1], True)]
    assert b.params(10) is GREEDY


@pytest.mark.parametrize(
    "out, match",
    [
        (output({99: 1}, cached_seqs=[cached(99, [1], computed=1)]), "sequence 99 is not in"),
        (output({10: 1}, [new(10, [1], 1, GREEDY, [0])]), "sequence 10 is already in"),
        (output({10: 2}, cached_seqs=[cached(10, [6], computed=3)]), "2 tokens .* 4 are known"),
    ],
)
def test_update_rejects_a_diff_that_does_not_fit_the_batch(out, match):
    b = input_batch()
    b.update(output({10: 3}, [new(10, [1, 2, 3], 3, GREEDY, [5])]))
    with pytest.raises(ValueError, match=match):
        b.update(out)


def test_prepare_sampling_rows_penalty_rows_and_buckets():
    b = input_batch(token_buckets=(8, 16), seq_buckets=(2, 4))
    greedy_lp = SamplingParams(temperature=0, logprobs=2)
    filtered = SamplingParams(temperature=0.5, top_k=3, top_p=0.9, min_p=0.1, seed=42)
    penalized = SamplingParams(repetition_penalty=1.2, logit_bias={7: 2.0})
    # Step 1: 10 and 11 sample, 12 is a partial prefill (its row stays padding, no penalty row).
    # 11 is sample 1 of a seeded request, readmitted with one output token (6): step 1.
    p = b.prepare(
        output(
            {10: 3, 11: 3, 12: 2},
            [
                new(10, [1, 2, 3], 3, greedy_lp, [5]),
                new(11, [4, 5, 6], 2, filtered, [2], sample_index=1),
                new(12, [7, 7, 8, 9, 1, 1], 6, penalized, [3]),
            ],
        )
    )
    assert p.inputs.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 7]  # 8 tokens: bucket 8
    assert p.inputs.cu_q_lens.tolist() == [0, 3, 6, 8, 8]  # R = max_num_seqs = 4 rows
    s = p.sampling
    assert s.temperature.tolist() == pytest.approx([0, 0.5, 0, 0])  # S = 4 (3 chunks)
    assert s.top_k.tolist() == [V, 3, V, V]  # off = V
    assert s.top_p.tolist() == pytest.approx([1, 0.9, 1, 1])
    assert s.min_p.tolist() == pytest.approx([0, 0.1, 0, 0])
    assert s.repetition_penalty.tolist() == [1, 1, 1, 1]
    assert s.penalty_row.tolist() == [4, 4, 4, 4]  # R = none
    assert s.seed.tolist() == [123, 42, 123, 123]  # the engine seed unless the request has one
    assert s.stream.tolist() == [10, 1, 0, 0]  # seq id when unseeded, sample index when seeded
    assert s.step.tolist() == [0, 1, 0, 0]  # outputs so far
    assert stages(s) == [False, True, True, True]  # penalties, filters, random, logprobs
    assert (p.sampling_seq_ids, p.want_logprobs, p.penalty_inits) == ({0: 10, 1: 11}, {0: 2}, [])
    assert p.prompt_logprob_targets is None and p.prompt_logprob_spans == []
    dtypes = {"temperature": np.float32, "top_k": np.int32, "seed": np.uint32, "step": np.int32}
    assert all(getattr(s, f).dtype == t for f, t in dtypes.items())

    # Step 2: 12 samples for the first time and 13 (seeded, readmitted with output 3) enters:
    # each gets a penalty row (handed out from the top: 3, then 2) and one PenaltyInit.
    seeded = SamplingParams(temperature=0.8, presence_penalty=0.5, seed=-1)  # u32: 2**32 - 1
    p = b.prepare(
        output(
            {10: 1, 11: 1, 12: 4, 13: 3},
            [new(13, [2, 2, 3], 2, seeded, [6])],
            [cached(10, [6], (), 3), cached(11, [5], (), 3), cached(12, (), [4], 2)],
        )
    )
    assert len(p.inputs.input_ids) == 16  # 9 tokens: bucket 16
    s = p.sampling
    assert s.temperature.tolist() == pytest.approx([0, 0.5, 1.0, 0.8])
    assert s.presence_penalty.tolist() == [0, 0, 0, 0.5]
    assert s.repetition_penalty.tolist() == pytest.approx([1, 1, 1.2, 1])
    assert s.penalty_row.tolist() == [4, 4, 3, 2]
    assert s.seed.tolist() == [123, 42, 123, 2**32 - 1] and s.stream.tolist() == [10, 1, 12, 0]
    assert s.step.tolist() == [1, 2, 0, 1]
    assert stages(s) == [True, True, True, True]
    assert p.sampling_seq_ids == {0: 10, 1: 11, 2: 12, 3: 13}
    [init12, init13] = p.penalty_inits
    assert (init12.row, init13.row) == (3, 2)
    mask = [False] * V
    for t in (1, 7, 8, 9):
        mask[t] = True
    assert init12.prompt_mask.tolist() == mask
    assert init12.output_counts.tolist() == [0] * V
    assert init12.logit_bias.tolist() == [0, 0, 0, 0, 0, 0, 0, 2.0, 0, 0]
    assert init13.prompt_mask.tolist() == [t == 2 for t in range(V)]
    assert init13.output_counts.tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert not init13.logit_bias.any()
    # The same contents as the shared helper gives (the JAX and torch runners write these).
    for init, values in (
        (init12, penalty_row_values([7, 7, 8, 9, 1, 1], [], {7: 2.0}, V)),
        (init13, penalty_row_values([2, 2], [3], None, V)),
    ):
        fields = (init.prompt_mask, init.output_counts, init.logit_bias)
        for got, want in zip(fields, values, strict=True):
            np.testing.assert_array_equal(got, want)

    # Step 3: 12 left, so its row 3 is free again and goes to 14; 13 keeps row 2 (no new init).
    p = b.prepare(
        output(
            {13: 1, 14: 1},
            [new(14, [1], 1, SamplingParams(frequency_penalty=0.3), [7])],
            [cached(13, [8], (), 3)],
            finished=[12],
        )
    )
    assert len(p.inputs.input_ids) == 8 and len(p.sampling.temperature) == 2  # buckets 8, 2
    assert p.sampling.penalty_row.tolist() == [2, 3]
    assert p.sampling.frequency_penalty.tolist() == pytest.approx([0, 0.3])
    assert p.sampling.step.tolist() == [2, 0]
    [init14] = p.penalty_inits
    assert init14.row == 3 and init14.prompt_mask.tolist() == [t == 1 for t in range(V)]
    assert stages(p.sampling) == [True, False, True, False] and p.want_logprobs == {}


def test_prepare_without_buckets_and_without_sampling():
    b = input_batch()
    p = b.prepare(output({10: 2}, [new(10, [1, 2, 3], 3, GREEDY, [5])]))
    assert p.sampling is None and p.sampling_seq_ids == {} and p.penalty_inits == []
    assert p.inputs.input_ids.tolist() == [1, 2] and p.inputs.cu_q_lens.tolist() == [0, 2]
    assert p.inputs.page_indices.shape == (1, 4)
    p = b.prepare(output({10: 1}, cached_seqs=[cached(10, computed=2)]))
    assert p.sampling.temperature.shape == (1,) and p.sampling_seq_ids == {0: 10}


def test_prepare_prompt_logprob_targets_and_spans():
    # Row at prompt position p scores the prompt token at p + 1; the last prompt position
    # produces the first output token instead.
    b = input_batch()
    scored = SamplingParams(prompt_logprobs=2)
    p = b.prepare(
        output(
            {20: 2, 21: 3},
            [new(20, [9, 9], 2, GREEDY, [0]), new(21, [3, 1, 4, 1, 5], 5, scored, [1, 2])],
        )
    )
    assert p.prompt_logprob_targets.tolist() == [0, 0, 1, 4, 1]  # positions 0-2 score 1, 4, 1
    [span] = p.prompt_logprob_spans
    assert (span.seq_id, span.first_position, span.num_logprobs) == (21, 1, 2)
    assert span.rows.tolist() == [2, 3, 4]
    p = b.prepare(
        output({21: 2, 20: 1}, cached_seqs=[cached(21, computed=3), cached(20, [8], (), 2)])
    )
    assert p.prompt_logprob_targets.tolist() == [5, 0, 0]  # position 3 scores 5; 4 samples
    [span] = p.prompt_logprob_spans
    assert (span.first_position, span.rows.tolist()) == (4, [0])
    p = b.prepare(output({21: 1}, cached_seqs=[cached(21, [7], (), 5)]))  # a decode
    assert p.prompt_logprob_targets is None and p.prompt_logprob_spans == []


def test_penalty_row_values_by_hand():
    mask, counts, bias = penalty_row_values([1, 1, 3], [2, 2, 5], {4: -1.5}, 6)
    assert mask.tolist() == [False, True, False, True, False, False]
    assert counts.tolist() == [0, 0, 2, 0, 0, 1] and counts.dtype == np.int32
    assert bias.tolist() == [0, 0, 0, 0, -1.5, 0] and bias.dtype == np.float32


def test_bucket_for():
    assert [bucket_for(n, (4, 8)) for n in (0, 1, 4, 5, 8)] == [4, 4, 4, 8, 8]
    assert bucket_for(13, None) == 13
    with pytest.raises(ValueError, match="9 exceeds the largest bucket 8"):
        bucket_for(9, (4, 8))


def test_prompt_scoring_steps_run_in_a_scoring_bucket():
    # Buckets 1..32: a 3-token prompt that asks for prompt logprobs runs in 16 tokens (the
    # smallest bucket with a prompt-logprobs graph); its decodes and plain prompts do not.
    buckets = (1, 2, 4, 8, 16, 32)
    assert prompt_logprobs_buckets(buckets) == (16, 32)
    assert prompt_logprobs_buckets((1, 2, 8)) == (8,)  # a budget below 16: its largest bucket
    b = input_batch(token_buckets=buckets, seq_buckets=(1, 2, 4))
    scored = SamplingParams(prompt_logprobs=1)
    p = b.prepare(output({1: 3}, [new(1, [5, 6, 7], 3, scored, [0])]))
    assert len(p.inputs.input_ids) == 16 and p.prompt_logprob_targets.tolist()[:2] == [6, 7]
    p = b.prepare(output({1: 1}, cached_seqs=[cached(1, [9], (), 3)]))  # its decode
    assert len(p.inputs.input_ids) == 1 and p.prompt_logprob_targets is None
    p = b.prepare(output({2: 3}, [new(2, [5, 6, 7], 3, GREEDY, [1])]))
    assert len(p.inputs.input_ids) == 4


def test_pending_tokens_are_fed_from_the_previous_steps_rows():
    # Async scheduling: a pending last token is read from the device (row 3 of the previous
    # sampling step); known tokens come from the host.
    b = input_batch(token_buckets=(4, 8), seq_buckets=(1, 2, 4))
    b.prepare(output({1: 2, 2: 1}, [new(1, [5, 6], 2, GREEDY, [0]), new(2, [4], 1, GREEDY, [1])]))
    p = b.prepare(
        output(
            {1: 1, 2: 1}, cached_seqs=[cached(1, [PENDING_TOKEN], (), 2), cached(2, [8], (), 1)]
        ),
        pending_rows={1: 3},
    )
    assert p.inputs.input_ids.tolist() == [0, 8, 0, 0]
    assert p.inputs.prev_token_rows.tolist() == [3, -1, -1, -1]
    b.resolve_pending(1, 11)
    assert b.token_ids(1) == [5, 6, 11]
    with pytest.raises(RuntimeError, match="pending token"):  # no previous step produces it
        b.prepare(output({1: 1}, cached_seqs=[cached(1, [PENDING_TOKEN], (), 3)]))
