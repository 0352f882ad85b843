"""Scheduler tests against the mock runner (next token = sum of all tokens so far % 97)."""

import pytest

from tests.engine.mock_runner import MockRunner, reference_output, run_to_completion
from xlaserve.engine.request import RequestStatus, Sequence
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.engine.scheduler import POLICIES, Scheduler, SchedulerConfig
from xlaserve.engine.scheduler_output import CachedSequence, NewSequence

STOPPED, LENGTH = RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH
ABORTED = RequestStatus.FINISHED_ABORTED


def make(**overrides) -> tuple[Scheduler, MockRunner]:
    kwargs = dict(
        max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, page_size=4, num_pages=64
    )
    kwargs.update(overrides)
    scheduler = Scheduler(SchedulerConfig(**kwargs))
    return scheduler, MockRunner(scheduler)


def step(scheduler, runner):
    """One schedule / execute / update; returns (output, chunks the runner ran)."""
    output = scheduler.schedule()
    scheduler.update_from_output(output, runner.execute(output))
    return output, runner.last_chunks


def layout(chunks):
    """(seq_id, start_pos, number of tokens, sample) per chunk, in batch order."""
    return [(c.seq_id, c.start_pos, len(c.token_ids), c.sample) for c in chunks]


def new_seq(output, seq: Sequence) -> NewSequence:
    [entry] = [s for s in output.new_seqs if s.seq_id == seq.seq_id]
    return entry


def expected(seq: Sequence):
    return reference_output(
        seq.prompt_token_ids,
        seq.params,
        max_model_len=seq.max_model_len,
        eos_token_ids=seq.eos_token_ids,
    )


def assert_all_free(scheduler):
    bm = scheduler.block_manager
    assert bm.num_free_pages == bm.num_pages and not any(bm.ref_counts)


# ---------------------------------------------------------------- by hand


def test_single_request_worked_by_hand():
    scheduler, runner = make()
    [seq] = scheduler.add_request("a", [1, 2, 3], SamplingParams(max_tokens=5), arrival_time=0)
    steps = run_to_completion(scheduler, runner)
    # 1+2+3 = 6; 6+6 = 12; 24; 48; 96
    assert seq.output_token_ids == [6, 12, 24, 48, 96]
    assert seq.status is LENGTH and seq.stop_reason is None
    assert [c.token_ids for _, cs in steps for c in cs] == [[1, 2, 3], [6], [12], [24], [48]]
    assert [c.start_pos for _, cs in steps for c in cs] == [0, 3, 4, 5, 6]
    assert_all_free(scheduler)
    assert not scheduler.has_unfinished()


def test_token_budget_and_seq_cap():
    scheduler, runner = make(max_num_seqs=2, max_num_batched_tokens=8)
    a, b, c = (
        scheduler.add_request(r, [1] * 5, SamplingParams(max_tokens=3), arrival_time=i)[0]
        for i, r in enumerate("abc")
    )
    out, cs = step(scheduler, runner)
    assert layout(cs) == [(a.seq_id, 0, 5, True), (b.seq_id, 0, 3, False)]
    assert out.num_scheduled_tokens == {a.seq_id: 5, b.seq_id: 3}
    assert out.total_num_scheduled_tokens == 8
    out, cs = step(scheduler, runner)  # c stays out: the cap is 2 sequences
    assert layout(cs) == [(a.seq_id, 5, 1, True), (b.seq_id, 3, 2, True)]
    assert c.status is RequestStatus.WAITING
    run_to_completion(scheduler, runner)
    assert [s.output_token_ids for s in (a, b, c)] == [expected(s)[0] for s in (a, b, c)]


def test_decodes_go_before_prefills():
    # Priority policy: b is more important, but a's decode is scheduled before b's prefill chunk.
    scheduler, runner = make(max_num_batched_tokens=4, policy="priority")
    [a] = scheduler.add_request("a", [5], SamplingParams(max_tokens=9), arrival_time=0, priority=1)
    step(scheduler, runner)
    [b] = scheduler.add_request("b", [1] * 20, SamplingParams(max_tokens=2), arrival_time=1)
    _, cs = step(scheduler, runner)
    assert layout(cs) == [(a.seq_id, 1, 1, True), (b.seq_id, 0, 3, False)]
    _, cs = step(scheduler, runner)
    assert layout(cs) == [(a.seq_id, 2, 1, True), (b.seq_id, 3, 3, False)]


def test_chunked_prefill_equals_unchunked_run():
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    params = SamplingParams(max_tokens=6)
    scheduler, runner = make(max_num_batched_tokens=4)
    [seq] = scheduler.add_request("a", prompt, params, arrival_time=0)
    steps = run_to_completion(scheduler, runner)
    first_chunks = [layout(cs)[0][1:] for _, cs in steps[:3]]
    assert first_chunks == [(0, 4, False), (4, 4, False), (8, 2, True)]

    whole, whole_runner = make(enable_chunked_prefill=False)
    [ref] = whole.add_request("a", prompt, params, arrival_time=0)
    _, first_chunks = run_to_completion(whole, whole_runner)[0]
    assert layout(first_chunks)[0][1:] == (0, 10, True)
    assert seq.output_token_ids == ref.output_token_ids == expected(seq)[0]


def test_prefill_that_does_not_fit_waits_when_chunking_is_off():
    scheduler, runner = make(max_num_batched_tokens=64, enable_chunked_prefill=False)
    [a] = scheduler.add_request("a", [1] * 60, SamplingParams(max_tokens=3), arrival_time=0)
    [b] = scheduler.add_request("b", [2] * 10, SamplingParams(max_tokens=3), arrival_time=1)
    _, cs = step(scheduler, runner)
    assert layout(cs) == [(a.seq_id, 0, 60, True)]  # b's 10 tokens exceed the 4 left
    _, cs = step(scheduler, runner)
    assert layout(cs) == [(a.seq_id, 60, 1, True), (b.seq_id, 0, 10, True)]


def test_prefix_cache_hit_skips_full_pages():
    scheduler, runner = make()
    bm = scheduler.block_manager
    prompt = list(range(1, 11))  # 10 tokens: pages [1..4] [5..8] [9 10]
    [a] = scheduler.add_request("a", prompt, SamplingParams(max_tokens=1), arrival_time=0)
    _, [chunk] = step(scheduler, runner)
    a_pages = list(chunk.page_ids)
    assert a.is_finished and bm.num_free_pages == bm.num_pages  # freed, still cached

    [b] = scheduler.add_request("b", prompt[:8] + [50, 51, 52], SamplingParams(), arrival_time=1)
    out, [chunk] = step(scheduler, runner)
    assert out.finished_seq_ids == {a.seq_id}
    assert (chunk.start_pos, chunk.token_ids) == (8, [50, 51, 52])
    assert new_seq(out, b).num_computed_tokens == 8  # two cached pages
    assert chunk.page_ids[:2] == a_pages[:2]
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (10 + 11, 8)

    # An identical, page-aligned prompt: the last page is recomputed so logits exist.
    [c] = scheduler.add_request("c", prompt[:8], SamplingParams(max_tokens=2), arrival_time=2)
    _, cs = step(scheduler, runner)
    assert layout(cs)[-1] == (c.seq_id, 4, 4, True)
    run_to_completion(scheduler, runner)
    assert b.output_token_ids == expected(b)[0] and c.output_token_ids == expected(c)[0]
    assert_all_free(scheduler)


def test_prefix_caching_off_never_hits():
    scheduler, runner = make(enable_prefix_caching=False)
    for i in range(2):
        [seq] = scheduler.add_request(str(i), list(range(1, 11)), SamplingParams(), arrival_time=i)
        out, cs = step(scheduler, runner)
        assert [c.start_pos for c in cs if c.seq_id == seq.seq_id] == [0]
        assert new_seq(out, seq).num_computed_tokens == 0
    bm = scheduler.block_manager
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (0, 0)


@pytest.mark.parametrize("caching", [True, False])
def test_siblings_share_prompt_pages(caching):
    scheduler, runner = make(enable_prefix_caching=caching)
    bm = scheduler.block_manager
    prompt = [7, 1, 2, 8, 1, 8, 2, 8, 4]  # 9 tokens: 2 full pages + 1 token
    seqs = scheduler.add_request("a", prompt, SamplingParams(n=3, max_tokens=4), arrival_time=0)
    _, cs = step(scheduler, runner)
    assert layout(cs) == [(seqs[0].seq_id, 0, 9, True)]  # siblings wait for the prompt
    out, cs = step(scheduler, runner)
    first = cs[0].page_ids
    assert layout(cs) == [(seqs[0].seq_id, 9, 1, True)] + [(s.seq_id, 8, 1, True) for s in seqs[1:]]
    for sibling, chunk in zip(seqs[1:], cs[1:], strict=True):
        assert chunk.page_ids[:2] == first[:2] and new_seq(out, sibling).num_computed_tokens == 8
        assert chunk.page_ids[2] not in first  # the partial page is private
    assert [bm.ref_counts[p] for p in first[:2]] == [3, 3]
    run_to_completion(scheduler, runner)
    assert seqs[0].output_token_ids == seqs[1].output_token_ids == seqs[2].output_token_ids
    assert seqs[0].output_token_ids == expected(seqs[0])[0]
    assert_all_free(scheduler)


def test_preemption_in_a_tiny_pool_gives_the_big_pool_result():
    prompts = [[i + 1] * 6 for i in range(4)]
    results = []
    for num_pages in (8, 64):  # 8 pages of 2 tokens = one max_model_len sequence
        scheduler, runner = make(max_model_len=16, page_size=2, num_pages=num_pages)
        seqs = [
            scheduler.add_request(str(i), p, SamplingParams(max_tokens=8), arrival_time=i)[0]
            for i, p in enumerate(prompts)
        ]
        preempted = []
        while scheduler.has_unfinished():
            running_before = {s.seq_id for s in scheduler.running}
            out, _ = step(scheduler, runner)
            preempted += out.preempted_seq_ids
            if out.preempted_seq_ids:  # a step that had to preempt admits nobody
                scheduled = set(out.num_scheduled_tokens)
                assert scheduled <= running_before and not out.new_seqs
                assert not scheduled & set(out.preempted_seq_ids)
        assert len(preempted) == scheduler.num_preemptions
        assert (scheduler.num_preemptions > 0) == (num_pages == 8)
        results.append([s.output_token_ids for s in seqs])
        assert all(s.status is LENGTH for s in seqs)
        assert_all_free(scheduler)
    assert results[0] == results[1] == [expected(s)[0] for s in seqs]


@pytest.mark.parametrize("policy", POLICIES)
def test_preemption_victim(policy):
    # low arrives first with priority 5, high second with priority 0; 4 pages of 4 tokens.
    scheduler, runner = make(max_model_len=16, page_size=4, num_pages=4, policy=policy)
    params = SamplingParams(max_tokens=10)
    [low] = scheduler.add_request("low", [1, 2, 3, 4], params, arrival_time=0, priority=5)
    step(scheduler, runner)
    [high] = scheduler.add_request("high", [4, 3, 2, 1], params, arrival_time=1, priority=0)
    preempted = []
    while scheduler.has_unfinished():
        out, _ = step(scheduler, runner)
        preempted += out.preempted_seq_ids
    victim = low if policy == "priority" else high  # fcfs: the latest arrival
    assert preempted[0] == victim.seq_id
    assert [low.output_token_ids, high.output_token_ids] == [expected(low)[0], expected(high)[0]]
    assert_all_free(scheduler)


def test_abort_waiting_and_running_frees_pages():
    scheduler, runner = make(max_num_seqs=1)
    bm = scheduler.block_manager
    [a] = scheduler.add_request("a", [1] * 9, SamplingParams(), arrival_time=0)
    [b] = scheduler.add_request("b", [2] * 9, SamplingParams(n=1), arrival_time=1)
    step(scheduler, runner)
    assert a.status is RequestStatus.RUNNING and b.status is RequestStatus.WAITING
    assert len(bm.page_ids(a)) == 3
    assert scheduler.abort_request("b") == [b]
    assert scheduler.abort_request("a") == [a]
    assert a.status is b.status is ABORTED and not bm.page_ids(a)
    assert scheduler.abort_request("a") == [] and scheduler.abort_request("nope") == []
    assert not scheduler.has_unfinished()
    assert_all_free(scheduler)
    scheduler.add_request("a", [1], SamplingParams(), arrival_time=2)  # the id is free again


def test_abort_between_schedule_and_update_is_skipped():
    scheduler, runner = make()
    [a] = scheduler.add_request("a", [1, 2], SamplingParams(), arrival_time=0)
    out = scheduler.schedule()
    sampled = runner.execute(out)
    scheduler.abort_request("a")
    assert scheduler.update_from_output(out, sampled) == []
    assert a.output_token_ids == [] and a.status is ABORTED
    assert_all_free(scheduler)


def test_finish_sequence_for_a_stop_string():
    scheduler, runner = make()
    seqs = scheduler.add_request("a", [1, 2], SamplingParams(n=2), arrival_time=0)
    step(scheduler, runner)
    step(scheduler, runner)
    scheduler.finish_sequence(seqs[0], STOPPED, "###")
    assert seqs[0].stop_reason == "###" and not scheduler.block_manager.page_ids(seqs[0])
    scheduler.finish_sequence(seqs[0], LENGTH)  # already finished: no-op
    assert seqs[0].status is STOPPED
    out, _ = step(scheduler, runner)
    assert out.finished_seq_ids == {seqs[0].seq_id}
    assert seqs[0].seq_id not in out.num_scheduled_tokens and seqs[0].seq_id not in runner.batch
    run_to_completion(scheduler, runner)
    assert seqs[1].status is LENGTH
    assert_all_free(scheduler)


# ---------------------------------------------------------------- the output is a diff


def test_first_step_sends_the_whole_sequence_then_only_what_changed():
    # Prompt of 10 in pages of 4 under a budget of 4: chunks 0-3, 4-7, 8-9, then decodes.
    # Fresh pool: pages are handed out as 0, 1, 2, 3. sum(prompt) = 39 -> 39, 78, 59, 21.
    scheduler, runner = make(max_num_batched_tokens=4)
    params = SamplingParams(max_tokens=4)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    [seq] = scheduler.add_request("a", prompt, params, arrival_time=0)
    out, _ = step(scheduler, runner)
    assert out.new_seqs == (
        NewSequence(
            seq_id=seq.seq_id,
            request_id="a",
            sample_index=0,
            token_ids=tuple(prompt),
            num_prompt_tokens=10,
            params=params,
            page_ids=(0,),
            num_computed_tokens=0,
        ),
    )
    assert (out.cached_seqs, out.num_scheduled_tokens) == ((), {seq.seq_id: 4})
    cached = []
    while scheduler.has_unfinished():
        out, _ = step(scheduler, runner)
        assert out.new_seqs == () and out.finished_seq_ids == frozenset()
        cached += out.cached_seqs
    i = seq.seq_id
    assert cached == [
        CachedSequence(i, new_token_ids=(), new_page_ids=(1,), num_computed_tokens=4),
        CachedSequence(i, new_token_ids=(), new_page_ids=(2,), num_computed_tokens=8),
        CachedSequence(i, new_token_ids=(39,), new_page_ids=(), num_computed_tokens=10),
        CachedSequence(i, new_token_ids=(78,), new_page_ids=(), num_computed_tokens=11),
        CachedSequence(i, new_token_ids=(59,), new_page_ids=(3,), num_computed_tokens=12),
    ]
    assert seq.output_token_ids == [39, 78, 59, 21]


def test_a_preempted_sequence_leaves_the_batch_and_returns_whole():
    scheduler, runner = make(max_model_len=16, page_size=2, num_pages=8)
    seqs = {
        s.seq_id: s
        for i in range(4)
        for s in scheduler.add_request(
            str(i), [i + 1] * 6, SamplingParams(max_tokens=8), arrival_time=i
        )
    }
    away: dict[int, tuple[int, ...]] = {}  # preempted seq -> its tokens when it left
    returned = []  # the NewSequence entries that brought a preempted sequence back
    while scheduler.has_unfinished():
        out, cs = step(scheduler, runner)
        assert set(out.preempted_seq_ids) <= out.finished_seq_ids
        assert not {c.seq_id for c in out.cached_seqs} & set(away)
        for new in out.new_seqs:
            if new.seq_id in away:
                assert new.token_ids == away.pop(new.seq_id)  # prompt + outputs so far
                assert new.num_prompt_tokens == 6
                [chunk] = [c for c in cs if c.seq_id == new.seq_id]
                assert chunk.start_pos == new.num_computed_tokens
                returned.append(new)
        for seq_id in out.preempted_seq_ids:
            assert seq_id not in runner.batch and seq_id not in out.num_scheduled_tokens
            away[seq_id] = tuple(seqs[seq_id].all_token_ids)
    assert scheduler.num_preemptions == len(returned) > 0 and not away
    assert any(len(new.token_ids) > new.num_prompt_tokens for new in returned)
    assert [s.output_token_ids for s in seqs.values()] == [expected(s)[0] for s in seqs.values()]


def test_sequences_that_leave_are_announced_once_in_the_next_output():
    scheduler, runner = make(max_num_seqs=3)
    [done] = scheduler.add_request("done", [1, 2, 3], SamplingParams(max_tokens=1), arrival_time=0)
    [gone] = scheduler.add_request("gone", [4] * 5, SamplingParams(), arrival_time=1)
    [mid] = scheduler.add_request("mid", [6] * 3, SamplingParams(), arrival_time=2)
    [late] = scheduler.add_request("late", [7] * 2, SamplingParams(), arrival_time=3)
    out, _ = step(scheduler, runner)
    assert out.finished_seq_ids == frozenset()
    assert done.is_finished and late.status is RequestStatus.WAITING  # the cap is 3
    scheduler.abort_request("gone")
    scheduler.abort_request("late")  # never entered the batch: nothing to announce
    out = scheduler.schedule()
    assert out.finished_seq_ids == {done.seq_id, gone.seq_id}
    assert list(out.num_scheduled_tokens) == [mid.seq_id]
    sampled = runner.execute(out)
    scheduler.abort_request("mid")  # while the step ran
    scheduler.update_from_output(out, sampled)
    assert not scheduler.has_unfinished()
    out = scheduler.schedule()  # nothing to run, but the runner must still drop mid
    assert out.is_empty and out.finished_seq_ids == {mid.seq_id}
    assert runner.execute(out) == {} and len(runner.batch) == 0
    out = scheduler.schedule()
    assert out.is_empty and out.finished_seq_ids == frozenset()
    assert_all_free(scheduler)


@pytest.mark.parametrize(
    "kwargs, eos, output, status, reason",
    [
        # prompt [1, 2, 3] -> 6, 12, 24, 48, 96, 95, ...
        (dict(stop_token_ids=[24]), (), [6, 12, 24], STOPPED, 24),
        (dict(), (12,), [6, 12], STOPPED, None),
        (dict(min_tokens=3), (12,), [6, 12, 24, 48, 96], LENGTH, None),
        (dict(min_tokens=2), (12,), [6, 12], STOPPED, None),
        (dict(ignore_eos=True), (12,), [6, 12, 24, 48, 96], LENGTH, None),
        (dict(max_tokens=2), (), [6, 12], LENGTH, None),
        (dict(max_tokens=None), (), [6, 12, 24, 48, 96, 95, 93], LENGTH, None),  # 10 tokens
    ],
)
def test_stop_conditions_end_to_end(kwargs, eos, output, status, reason):
    scheduler, runner = make(max_model_len=10)
    params = SamplingParams(**{"max_tokens": 5, **kwargs})
    [seq] = scheduler.add_request("a", [1, 2, 3], params, arrival_time=0, eos_token_ids=eos)
    run_to_completion(scheduler, runner)
    assert (seq.output_token_ids, seq.status, seq.stop_reason) == (output, status, reason)
    assert expected(seq) == (output, status, reason)


def test_append_token_checks_in_order():
    def seq(max_model_len=100, eos=(7,), **kw):
        params = SamplingParams(**{"max_tokens": 10, **kw})
        return Sequence(
            seq_id=0, request_id="r", prompt_token_ids=[1, 2, 3], params=params,
            max_model_len=max_model_len, eos_token_ids=eos,
        )  # fmt: skip

    s = seq(max_model_len=5)
    assert s.append_token(1) is RequestStatus.WAITING
    assert s.append_token(7) is LENGTH and s.stop_reason is None  # max_model_len before eos
    s = seq(stop_token_ids=[7])
    assert s.append_token(7) is STOPPED and s.stop_reason is None  # eos before stop ids
    s = seq(stop_token_ids=[7], ignore_eos=True)
    assert s.append_token(7) is STOPPED and s.stop_reason == 7
    s = seq(stop_token_ids=[9], max_tokens=1)
    assert s.append_token(9) is STOPPED and s.stop_reason == 9  # stop ids before max_tokens
    s = seq(min_tokens=3, stop_token_ids=[9])
    assert s.append_token(7) is s.append_token(9) is RequestStatus.WAITING
    assert s.append_token(7) is STOPPED and s.output_token_ids == [7, 9, 7]
    with pytest.raises(RuntimeError, match="cannot append"):
        s.append_token(1)
    with pytest.raises(ValueError, match="RUNNING"):
        s.finish(RequestStatus.RUNNING)


def test_is_prefill():
    s = Sequence(
        seq_id=0, request_id="r", prompt_token_ids=[5], params=SamplingParams(), max_model_len=9
    )
    assert s.is_prefill  # a one-token prompt's first step is a prefill
    s.num_computed_tokens = 1
    s.append_token(3)
    assert not s.is_prefill and s.num_uncomputed_tokens == 1
    s.num_computed_tokens = 0  # preempted: prompt + outputs are recomputed
    assert s.is_prefill and s.all_token_ids == [5, 3]


@pytest.mark.parametrize(
    "prompt, kwargs, match",
    [
        ([], {}, "prompt_token_ids must not be empty"),
        ([1] * 16, {}, "16 tokens.*max_model_len 16"),
        ([1, -1], {}, "prompt_token_ids.*-1"),
        ([1, True], {}, "prompt_token_ids.*True"),
        ([1], {"priority": 1.5}, "priority.*1.5"),
        ([1], {"eos_token_ids": (None,)}, "eos_token_ids.*None"),
    ],
)
def test_add_request_rejects_bad_inputs(prompt, kwargs, match):
    scheduler, _ = make(max_model_len=16)
    with pytest.raises(ValueError, match=match):
        scheduler.add_request("a", prompt, SamplingParams(), arrival_time=0, **kwargs)
    scheduler.add_request("a", [1] * 15, SamplingParams(), arrival_time=0)  # 15 + 1 fits
    with pytest.raises(ValueError, match="'a' is already in use"):
        scheduler.add_request("a", [1], SamplingParams(), arrival_time=0)
    with pytest.raises(ValueError, match="SamplingParams"):
        scheduler.add_request("b", [1], {"n": 1}, arrival_time=0)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"max_num_seqs": 0}, "max_num_seqs.*0"),
        ({"max_num_batched_tokens": -1}, "max_num_batched_tokens.*-1"),
        ({"page_size": 2.0}, "page_size.*2.0"),
        ({"max_model_len": True}, "max_model_len.*True"),
        ({"num_pages": 15}, "num_pages must be >= 16.*got 15"),
        ({"policy": "lifo"}, "policy.*'lifo'"),
        ({"enable_chunked_prefill": False}, "max_num_batched_tokens.*64.*got 32"),
        ({"max_waiting_requests": 0}, "max_waiting_requests.*0"),
        ({"enable_prefix_caching": 1}, "enable_prefix_caching.*1"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    kwargs = dict(
        max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, page_size=4, num_pages=16
    )
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(**{**kwargs, **overrides})


def test_max_waiting_requests():
    from xlaserve.engine.scheduler import QueueFullError

    scheduler, _ = make(max_waiting_requests=2)
    scheduler.add_request("a", [1], SamplingParams(n=2), arrival_time=0)
    scheduler.add_request("b", [1], SamplingParams(), arrival_time=0)
    with pytest.raises(QueueFullError, match="2 requests"):
        scheduler.add_request("c", [1], SamplingParams(), arrival_time=0)


# ---------------------------------------------------------------- fairness


def test_a_small_request_is_not_starved_by_many_samples():
    # 8 slots. Step 1: "big" (n=64) runs sample 0's prompt alone. Then "small" arrives; two
    # requests compete, so each may fill 8 // 2 = 4 slots before the rest go in order: step 2
    # admits big 1..3, then small (1 token, sampled at once), then big 4..6 into what is left.
    scheduler, runner = make()
    big = scheduler.add_request("big", [1, 2, 3], SamplingParams(n=64, max_tokens=3),
                                arrival_time=0)  # fmt: skip
    _, cs = step(scheduler, runner)
    assert layout(cs) == [(big[0].seq_id, 0, 3, True)]
    [small] = scheduler.add_request("small", [5], SamplingParams(max_tokens=1), arrival_time=1)
    out, cs = step(scheduler, runner)
    admitted = [s.seq_id for s in out.new_seqs]
    assert admitted == [b.seq_id for b in big[1:4]] + [small.seq_id] + [b.seq_id for b in big[4:7]]
    assert (small.seq_id, 0, 1, True) in layout(cs)
    assert small.is_finished and small.output_token_ids == [5]  # 5 % 97, as when alone
    run_to_completion(scheduler, runner)
    assert all(s.output_token_ids == expected(s)[0] == [6, 12, 24] for s in big)
    assert_all_free(scheduler)


@pytest.mark.parametrize(("big_priority", "small_admitted"), [(0, False), (1, True)])
def test_fair_share_keeps_priority_order(big_priority, small_admitted):
    # Under "priority" a request is passed over only for one of the same priority: a more
    # important n=64 request keeps every slot from a less important small one.
    scheduler, runner = make(policy="priority")
    big = scheduler.add_request("big", [1, 2, 3], SamplingParams(n=64, max_tokens=3),
                                arrival_time=0, priority=big_priority)  # fmt: skip
    step(scheduler, runner)
    [small] = scheduler.add_request(
        "small", [5], SamplingParams(max_tokens=1), arrival_time=1, priority=1
    )
    out, _ = step(scheduler, runner)
    admitted = {s.seq_id for s in out.new_seqs}
    assert (small.seq_id in admitted) is small_admitted
    assert len(admitted) == 7  # every free slot is used either way
    run_to_completion(scheduler, runner)
    assert small.output_token_ids == [5]
    assert all(s.output_token_ids == [6, 12, 24] for s in big)
    assert_all_free(scheduler)
