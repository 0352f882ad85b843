"""Pooling sequences in the device-free scheduler: scheduled whole (never chunked), no
prefix-cache hits, finished by their pooled output without a token, pages freed."""

import pytest

from xlaserve.engine.request import RequestStatus
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.engine.scheduler import Scheduler, SchedulerConfig
from xlaserve.pooling.params import PoolingTask

TASK = PoolingTask("embed", "MEAN", True, None, False)
ONE = SamplingParams(max_tokens=1, detokenize=False)


def scheduler(**kw) -> Scheduler:
    config = dict(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=256, page_size=16,
                  num_pages=64, enable_prefix_caching=True)  # fmt: skip
    return Scheduler(SchedulerConfig(**{**config, **kw}))


def add(s: Scheduler, rid: str, n: int, pooling=TASK, first: int = 0):
    return s.add_request(rid, list(range(first, first + n)), ONE, arrival_time=0.0,
                         pooling=pooling)[0]  # fmt: skip


def test_pooling_prompts_are_never_chunked():
    s = scheduler()
    a, b = add(s, "a", 200), add(s, "b", 200, first=1000)
    out = s.schedule()
    assert out.num_scheduled_tokens == {a.seq_id: 200}  # b would need chunking: it waits
    assert out.new_seqs[0].pooling == TASK
    finished = s.update_from_output(out, {}, pooled={a.seq_id})
    assert finished == [a] and a.status is RequestStatus.FINISHED_STOPPED
    assert a.output_token_ids == []
    out = s.schedule()
    assert out.num_scheduled_tokens == {b.seq_id: 200}
    assert a.seq_id in out.finished_seq_ids
    s.update_from_output(out, {}, pooled={b.seq_id})
    assert s.block_manager.num_free_pages == 64 and not s.has_unfinished()


def test_pooling_skips_prefix_cache_hits_but_generation_still_uses_them():
    s = scheduler()
    first = add(s, "a", 64)
    s.update_from_output(s.schedule(), {}, pooled={first.seq_id})
    again = add(s, "b", 64)
    out = s.schedule()
    assert out.new_seqs[0].num_computed_tokens == 0  # every token's hidden state is needed
    assert out.num_scheduled_tokens == {again.seq_id: 64}
    s.update_from_output(out, {}, pooled={again.seq_id})
    add(s, "c", 64, pooling=None)
    assert s.schedule().new_seqs[0].num_computed_tokens == 48  # full pages, one token left


def test_a_pooling_sequence_without_its_output_is_an_error():
    s = scheduler()
    add(s, "a", 10)
    with pytest.raises(ValueError, match="no sampled token"):
        s.update_from_output(s.schedule(), {})


def test_pooling_requests_fit_one_step():
    s = scheduler(max_num_batched_tokens=128)
    with pytest.raises(ValueError, match="at most 128 tokens"):
        add(s, "a", 129)
    add(s, "b", 128)  # a prompt of the whole budget: no room for an output token is needed
    s2 = scheduler()
    with pytest.raises(ValueError, match="at most 256 tokens"):
        add(s2, "c", 257)
    add(s2, "d", 256)
