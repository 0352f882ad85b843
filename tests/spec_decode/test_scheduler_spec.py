"""Drafts in the ragged batch, device-free: outputs equal plain decoding whatever the drafts'
quality, requests advance by the accepted count only, rejected drafts never reach the prefix
cache, look-ahead slots are reserved, and speculation yields before anyone is preempted."""

import pytest

from tests.engine.mock_runner import reference_output
from tests.spec_decode.spec_mock import SpecMockRunner, run_spec
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.engine.scheduler import Scheduler, SchedulerConfig
from xlaserve.spec_decode.config import SpeculativeConfig
from xlaserve.spec_decode.policy import SpecDecodePolicy

PROMPTS = [[1, 2, 3], [5] * 9, [7, 1], list(range(1, 20)), [4, 4, 4, 4], [9, 8, 7, 6, 5]]


def make(k=3, lookahead=0, adaptive=False, **overrides):
    kwargs = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, page_size=4,
                  num_pages=64, num_lookahead_tokens=lookahead)  # fmt: skip
    kwargs.update(overrides)
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=k, adaptive=adaptive)
    return Scheduler(SchedulerConfig(**kwargs), SpecDecodePolicy(spec))


def add_all(scheduler, prompts, max_tokens=20):
    return [
        scheduler.add_request(f"r{i}", p, SamplingParams(max_tokens=max_tokens), arrival_time=i)[0]
        for i, p in enumerate(prompts)
    ]


@pytest.mark.parametrize("good", [0, 1, 3])
def test_outputs_equal_plain_decoding_whatever_the_drafts(good):
    scheduler = make()
    runner = SpecMockRunner(scheduler, k=3, good=good)
    seqs = add_all(scheduler, PROMPTS)
    steps = run_spec(scheduler, runner)
    for seq, prompt in zip(seqs, PROMPTS, strict=True):
        tokens, status, _ = reference_output(prompt, seq.params, max_model_len=64)
        assert seq.output_token_ids == tokens and seq.status is status
    stats = scheduler.spec.stats
    assert runner.fed_drafts == stats.num_draft_tokens > 0
    assert stats.num_accepted_tokens == (stats.num_draft_tokens if good == 3 else
                                         min(good, 3) * stats.num_drafts)  # fmt: skip
    if good == 3:  # every verification emits up to 4 tokens: far fewer steps than 20 each
        assert steps < 12
    bm = scheduler.block_manager
    assert bm.num_free_pages == bm.num_pages


def test_drafts_stop_at_max_tokens_and_max_model_len():
    scheduler = make(k=4, max_model_len=24)
    runner = SpecMockRunner(scheduler, k=4, good=4)
    [short] = scheduler.add_request("a", [1, 2], SamplingParams(max_tokens=6), arrival_time=0)
    [long] = scheduler.add_request("b", [3] * 15, SamplingParams(max_tokens=None), arrival_time=1)
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        for seq in (short, long):
            if seq.seq_id not in out.num_scheduled_tokens:
                continue
            drafts = out.spec_token_ids.get(seq.seq_id, ())
            assert seq.num_tokens + len(drafts) + 1 <= 24
            if seq.params.max_tokens is not None:
                assert seq.num_output_tokens + len(drafts) + 1 <= seq.params.max_tokens
        scheduler.update_from_output(out, *runner.execute(out))
    assert short.output_token_ids == reference_output([1, 2], short.params, max_model_len=24)[0]
    assert len(long.all_token_ids) == 24


def test_rejected_drafts_never_enter_the_prefix_cache():
    """Every draft is wrong after the first: pages hold rejected tokens until overwritten. A
    second wave of the same prompts takes prefix hits, and the runner checks that every hit
    position holds the committed token."""
    scheduler = make(page_size=2)
    runner = SpecMockRunner(scheduler, k=3, good=1)
    add_all(scheduler, PROMPTS, max_tokens=12)
    run_spec(scheduler, runner)
    bm = scheduler.block_manager
    assert bm.prefix_cache_hits == 0
    second = [p + reference_output(p, SamplingParams(max_tokens=12), max_model_len=64)[0]
              for p in PROMPTS]  # fmt: skip
    seqs = [scheduler.add_request(f"s{i}", p, SamplingParams(max_tokens=4), arrival_time=9)[0]
            for i, p in enumerate(second)]  # fmt: skip
    run_spec(scheduler, runner)
    assert bm.prefix_cache_hits > 0
    for seq, prompt in zip(seqs, second, strict=True):
        assert seq.output_token_ids == reference_output(prompt, seq.params, max_model_len=64)[0]


def test_lookahead_slots_are_reserved_for_a_draft_model():
    scheduler = make(k=3, lookahead=3)
    runner = SpecMockRunner(scheduler, k=3, good=3)
    [seq] = scheduler.add_request("a", [1] * 5, SamplingParams(max_tokens=30), arrival_time=0)
    for _ in range(4):
        out = scheduler.schedule()
        end = seq.num_computed_tokens + out.num_scheduled_tokens[seq.seq_id]
        pages = scheduler.block_manager.page_ids(seq)
        assert len(pages) * 4 >= end + 3  # room for the draft's own K/V past this step
        assert out.propose_seq_ids == {seq.seq_id}
        scheduler.update_from_output(out, *runner.execute(out))


def test_speculation_gives_way_before_anyone_is_preempted():
    """A pool with room for both sequences' tokens but not for their drafts: drafts are
    dropped, nobody is preempted, outputs are still exact."""
    scheduler = make(k=4, lookahead=4, num_pages=16, max_model_len=32, page_size=4)
    runner = SpecMockRunner(scheduler, k=4, good=4)
    seqs = add_all(scheduler, [[1] * 20, [2] * 20], max_tokens=11)
    run_spec(scheduler, runner)
    assert scheduler.num_preemptions == 0
    for seq in seqs:
        assert seq.output_token_ids == reference_output(seq.prompt_token_ids, seq.params,
                                                        max_model_len=32)[0]  # fmt: skip


def test_preemption_drops_drafts_and_outputs_stay_exact():
    scheduler = make(k=3, num_pages=20, page_size=4, max_model_len=40, max_num_batched_tokens=32)
    runner = SpecMockRunner(scheduler, k=3, good=2)
    prompts = [[i + 1] * 10 for i in range(5)]
    seqs = add_all(scheduler, prompts, max_tokens=25)
    run_spec(scheduler, runner)
    assert scheduler.num_preemptions > 0
    for seq, prompt in zip(seqs, prompts, strict=True):
        assert seq.output_token_ids == reference_output(prompt, seq.params, max_model_len=40)[0]


def test_structured_requests_never_draft():
    from xlaserve.structured.params import StructuredOutputsParams

    scheduler = make()
    params = SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(regex="a+"))
    [seq] = scheduler.add_request("a", [1, 2], params, arrival_time=0)
    out = scheduler.schedule()
    assert seq.seq_id not in out.propose_seq_ids
