"""The scheduler under random workloads (hypothesis): every step keeps the page, budget and
diff invariants, and every request ends with exactly the tokens it gets alone."""

import math
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.engine.mock_runner import MockRunner, reference_output
from tests.engine.test_scheduler import ABORTED, assert_all_free, expected
from xlaserve.engine.request import Sequence
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.engine.scheduler import POLICIES, Scheduler, SchedulerConfig


def check_invariants(scheduler: Scheduler, output, running_before: set[int]) -> None:
    bm, config = scheduler.block_manager, scheduler.config
    scheduled = set(output.num_scheduled_tokens)
    new_ids = [s.seq_id for s in output.new_seqs]
    cached_ids = [s.seq_id for s in output.cached_seqs]
    # Sequences already in the batch arrive as diffs, newly admitted ones whole; nothing else.
    assert set(new_ids) == scheduled - running_before and len(new_ids) == len(set(new_ids))
    assert sorted(cached_ids) == sorted(scheduled & running_before)
    # Of the sequences that left since the last step only this step's victims were running.
    assert set(output.preempted_seq_ids) <= output.finished_seq_ids
    assert output.finished_seq_ids & running_before == set(output.preempted_seq_ids)
    if output.preempted_seq_ids:  # a step that had to preempt admits nobody
        assert scheduled <= running_before and not new_ids
        assert not scheduled & set(output.preempted_seq_ids)
    owners = Counter(p for s in scheduler.running for p in bm.page_ids(s))
    for seq in scheduler.running:
        pages = bm.page_ids(seq)
        assert len(set(pages)) == len(pages)
        assert all(0 <= p < bm.num_pages for p in pages)
    for seq in scheduler.waiting:
        assert not bm.page_ids(seq) and seq.num_computed_tokens == 0
    assert [bm.ref_counts[p] for p in range(bm.num_pages)] == [
        owners[p] for p in range(bm.num_pages)
    ]
    assert bm.num_free_pages == sum(1 for c in bm.ref_counts if c == 0)
    shared = {p for p, c in owners.items() if c > 1}
    for seq in scheduler.running:  # a shared page is full, computed and (if caching) cached
        for i, p in enumerate(bm.page_ids(seq)):
            if p in shared:
                assert (i + 1) * config.page_size <= seq.num_computed_tokens
                assert bm.is_cached(p) or not bm.enable_prefix_caching
    if not bm.enable_prefix_caching:  # only siblings share
        for p in shared:
            assert len({s.request_id for s in scheduler.running if p in bm.page_ids(s)}) == 1
    assert len(scheduler.running) <= config.max_num_seqs
    assert output.total_num_scheduled_tokens <= config.max_num_batched_tokens
    assert all(n >= 1 for n in output.num_scheduled_tokens.values())


@st.composite
def scenarios(draw):
    page_size = draw(st.sampled_from([1, 2, 4]))
    max_model_len = draw(st.integers(4, 20))
    min_pages = math.ceil(max_model_len / page_size)
    chunked = draw(st.booleans())
    config = SchedulerConfig(
        max_num_seqs=draw(st.integers(1, 4)),
        max_num_batched_tokens=draw(
            st.integers(1, 24) if chunked else st.integers(max_model_len, max_model_len + 8)
        ),
        max_model_len=max_model_len,
        page_size=page_size,
        num_pages=draw(st.integers(min_pages, 2 * min_pages + 2)),
        enable_prefix_caching=draw(st.booleans()),
        enable_chunked_prefill=chunked,
        policy=draw(st.sampled_from(POLICIES)),
    )
    base = draw(st.lists(st.integers(0, 96), min_size=max_model_len, max_size=max_model_len))
    requests = []
    for _ in range(draw(st.integers(1, 8))):
        length = draw(st.integers(1, max_model_len - 1))
        shared = draw(st.integers(0, length))  # a shared prefix makes prefix-cache hits
        prompt = base[:shared] + draw(
            st.lists(st.integers(0, 96), min_size=length - shared, max_size=length - shared)
        )
        stream = reference_output(prompt, SamplingParams(max_tokens=None), max_model_len=99)[0]
        max_tokens = draw(st.none() | st.integers(1, 8))
        params = SamplingParams(
            n=draw(st.integers(1, 3)),
            max_tokens=max_tokens,
            min_tokens=draw(st.integers(0, max_tokens or 3)),
            stop_token_ids=draw(st.lists(st.sampled_from(stream[:6]), max_size=1)),
            ignore_eos=draw(st.booleans()),
        )
        eos = tuple(draw(st.lists(st.sampled_from(stream[:6]), max_size=1)))
        arrival = draw(st.integers(0, 8))
        abort = draw(st.none() | st.tuples(st.integers(arrival, arrival + 12), st.booleans()))
        priority = draw(st.integers(0, 2))
        requests.append((arrival, prompt, params, eos, priority, abort))
    return config, requests


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_workloads_keep_invariants_and_exact_outputs(scenario):
    config, requests = scenario
    scheduler = Scheduler(config)
    runner = MockRunner(scheduler)
    seqs: dict[str, list[Sequence]] = {}
    aborted: set[str] = set()
    for t in range(1000):
        for i, (arrival, prompt, params, eos, priority, _) in enumerate(requests):
            if arrival == t:
                seqs[str(i)] = scheduler.add_request(
                    str(i), prompt, params, arrival_time=t, priority=priority, eos_token_ids=eos
                )
        abort_now = {str(i) for i, r in enumerate(requests) if r[5] and r[5] == (t, False)}
        abort_mid = {str(i) for i, r in enumerate(requests) if r[5] and r[5] == (t, True)}
        for rid in abort_now:
            if scheduler.abort_request(rid):
                aborted.add(rid)
        if scheduler.has_unfinished():
            running_before = {s.seq_id for s in scheduler.running}
            output = scheduler.schedule()
            check_invariants(scheduler, output, running_before)
            assert not output.is_empty, "stalled"
            sampled = runner.execute(output)
            for rid in abort_mid:  # the client left while the step ran
                if scheduler.abort_request(rid):
                    aborted.add(rid)
            scheduler.update_from_output(output, sampled)
        elif t > max(r[0] for r in requests):
            break
    else:
        pytest.fail("workload did not finish in 1000 steps")

    assert_all_free(scheduler)
    for rid, request_seqs in seqs.items():
        for seq in request_seqs:
            assert seq.is_finished and not scheduler.block_manager.page_ids(seq)
            want, status, reason = expected(seq)
            if seq.status is ABORTED:
                assert rid in aborted and seq.output_token_ids == want[: seq.num_output_tokens]
            else:
                assert (seq.output_token_ids, seq.status, seq.stop_reason) == (want, status, reason)
